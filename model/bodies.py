"""Request bodies read within a size limit and a byte budget shared by all requests, so no burst exhausts memory.

aiohttp's own `request.read()` buffers up to `client_max_size` for every request at once: a burst
of large bodies (54 MiB each by default) could hold gigabytes before one of them is refused. Here

- a body whose Content-Length is over the limit is refused (413) before a byte of it is read, and
  one without a Content-Length (chunked) is counted as it streams and refused once over;
- every body being read, parsed and decoded holds its size in a budget shared by all requests; a
  body that does not fit in what is left is refused at once (429, Retry-After), not queued.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from model.errors import APIError
from smolcord.settings import Settings

__all__ = ["BodyReader", "max_body_size"]

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024


def max_body_size(settings: Settings) -> int:
    """Room for every image a request may carry, base64-encoded (4/3), plus the JSON around them."""
    return settings.max_images * (settings.max_image_bytes * 4 // 3 + 1024) + 1024 * 1024


class BodyReader:
    """Reads JSON bodies of at most `max_size` bytes while at most `budget` bytes are held across requests."""

    def __init__(self, *, max_size: int, budget: int) -> None:
        self.max_size = max_size
        self.budget = max(budget, max_size)  # one body of the largest size must always fit
        self.held = 0  # bytes reserved by the bodies being read or decoded now

    def _take(self, size: int) -> None:
        if self.held + size > self.budget:
            log.info("body of %d bytes refused: %d of %d budget bytes held", size, self.held, self.budget)
            raise APIError(
                429,
                "The worker is reading too many large requests at once; try again in a second.",
                code="too_many_bodies",
                headers={"Retry-After": "1"},
            )
        self.held += size

    def _too_large(self, size: int | str) -> APIError:
        return APIError(
            413,
            f"The request body is {size} bytes; this worker reads at most {self.max_size}.",
            code="too_large",
        )

    @contextlib.asynccontextmanager
    async def json(self, request: web.Request) -> AsyncIterator[Any]:
        """The parsed body; its bytes stay counted against the budget until the block ends."""
        declared = request.content_length
        if declared is not None and declared > self.max_size:
            raise self._too_large(declared)  # nothing read: the claim alone is refused
        held = 0
        try:
            if declared is not None:
                self._take(declared)
                held = declared
            raw = bytearray()
            while chunk := await request.content.read(_CHUNK):
                size = len(raw) + len(chunk)
                if size > self.max_size:
                    raise self._too_large(f"over {self.max_size}")
                if size > held:  # chunked, or more than declared: counted as it arrives
                    self._take(size - held)
                    held = size
                raw += chunk
            body = _parse(raw)
            del raw
            yield body
        finally:
            self.held -= held


def _parse(raw: bytes | bytearray) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:  # json's C scanner refuses nesting deeper than the interpreter's limit
        raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
