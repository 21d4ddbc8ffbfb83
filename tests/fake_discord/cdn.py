"""The attachment CDN: files at fresh URLs (with sizes and headers that may lie) and redirects."""

from __future__ import annotations

import mimetypes
from typing import Any

from aiohttp import web

from .records import RECORD, CdnFile
from .state import State


class Cdn(State):
    """Serves attachment bodies the way Discord's CDN does, or the way a hostile host might."""

    @property
    def cdn_base(self) -> str:
        """Prefix of every attachment URL the fake hands out (for an attachment-host allow-list)."""
        return f"{self.base_url}/cdn/attachments/"

    def cdn_url(
        self,
        filename: str,
        data: bytes = b"",
        *,
        content_type: str | None = None,
        total_size: int | None = None,
        content_length: int | None = None,
        chunked: bool = False,
        host: str = "127.0.0.1",
        status: int = 200,
    ) -> str:
        """Serve ``data`` at a fresh URL under ``cdn_base`` and return the URL.

        ``total_size`` pads the body with zero bytes up to that size, streamed (a huge file without the
        memory); ``content_length`` declares a Content-Length that lies (the body is cut at it when
        smaller, the connection ends early when larger); ``chunked`` sends no Content-Length at all;
        ``host`` (e.g. "localhost") serves the same file under another host name.
        """
        key = str(self._ids.next())
        size = max(len(data), total_size or 0)
        self._cdn[key] = CdnFile(
            data=data,
            content_type=content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream",
            total_size=size,
            content_length=content_length,
            chunked=chunked,
            status=status,
        )
        return f"http://{host}:{self.port}/cdn/attachments/{key}/{filename}"

    def redirect_url(self, target: str, *, status: int = 302) -> str:
        """A CDN-looking URL that answers with a redirect to ``target``."""
        key = str(self._ids.next())
        self._redirects[key] = (target, status)
        return f"{self.cdn_base}{key}/redirect.png"

    def attachment(
        self,
        filename: str,
        data: bytes = b"",
        *,
        content_type: str | None = None,
        url: str | None = None,
        size: int | None = None,
        width: int | None = None,
        height: int | None = None,
        **cdn: Any,
    ) -> dict[str, Any]:
        """An attachment object for send_message / a command's attachment option.  Served by the CDN
        route unless ``url`` is given; ``size`` is the size Discord claims (may lie); ``cdn`` goes to
        ``cdn_url`` (total_size, content_length, chunked, host)."""
        content_type = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if url is None:
            url = self.cdn_url(filename, data, content_type=content_type, **cdn)
        attachment: dict[str, Any] = {
            "id": str(self._ids.next()),
            "filename": filename,
            "size": size if size is not None else max(len(data), cdn.get("total_size") or 0),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }
        if width is not None and height is not None:
            attachment.update(width=width, height=height)
        return attachment

    # ----------------------------------------------------------------- the route

    async def _cdn_file(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if key in self._redirects:
            target, status = self._redirects[key]
            return web.Response(status=status, headers={"Location": target})
        served = self._cdn.get(key)
        if served is None:
            raise web.HTTPNotFound()
        if served.status != 200:
            return web.Response(status=served.status, text="cdn error")
        response = web.StreamResponse(status=200, headers={"Content-Type": served.content_type})
        # One connection per file: a Content-Length that promises more than is sent then ends in an
        # early close (the client sees a truncated body) instead of a connection left hanging.
        response.force_close()
        if served.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = (
                served.content_length if served.content_length is not None else served.total_size
            )
        await response.prepare(request)
        record = request[RECORD]
        chunk = 64 * 1024
        try:
            body = served.data
            for start in range(0, len(body), chunk):
                await response.write(body[start : start + chunk])
                record.bytes_sent += len(body[start : start + chunk])
            padding = served.total_size - len(body)
            zeros = bytes(chunk)
            while padding > 0:
                piece = zeros[: min(chunk, padding)]
                await response.write(piece)
                record.bytes_sent += len(piece)
                padding -= len(piece)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading: exactly what a size-checking client should do
        return response
