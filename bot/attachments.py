"""Fetch Discord attachments safely: allowed hosts only, no redirects, size checked before reading."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from smolcord.images import ImageError, NormalizedImage, normalize_image
from smolcord.settings import Settings


class AttachmentRefused(Exception):
    """An attachment the bot will not send to the model; the message is shown to the user."""


@dataclass(frozen=True)
class AttachmentRef:
    """What the bot needs of a Discord attachment (discord.Attachment has these attributes)."""

    url: str
    size: int
    filename: str
    content_type: str | None = None


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n // 1024} KiB"


async def fetch_image(
    session: aiohttp.ClientSession, attachment: AttachmentRef, settings: Settings
) -> NormalizedImage:
    """Download and normalise one attachment, or raise AttachmentRefused with a friendly reason."""
    name = attachment.filename[:80]
    if not any(attachment.url.startswith(prefix) for prefix in settings.attachment_hosts):
        raise AttachmentRefused(f"`{name}` is not a Discord attachment, so I won't download it.")
    if attachment.content_type and not attachment.content_type.startswith("image/"):
        raise AttachmentRefused(f"`{name}` is not an image.")
    limit = settings.max_image_bytes
    if attachment.size > limit:
        raise AttachmentRefused(f"`{name}` is {_mib(attachment.size)}; the limit is {_mib(limit)}.")
    try:
        timeout = aiohttp.ClientTimeout(total=30)
        async with session.get(attachment.url, allow_redirects=False, timeout=timeout) as resp:
            if 300 <= resp.status < 400:
                raise AttachmentRefused(f"`{name}` redirects somewhere else, so I won't follow it.")
            if resp.status != 200:
                raise AttachmentRefused(f"I couldn't download `{name}` (HTTP {resp.status}).")
            if resp.content_length is not None and resp.content_length > limit:
                raise AttachmentRefused(f"`{name}` is too large; the limit is {_mib(limit)}.")
            data = bytearray()
            # read in pieces and stop at the limit: a lying Content-Length cannot make us buffer more
            async for piece in resp.content.iter_chunked(1 << 16):
                data += piece
                if len(data) > limit:
                    raise AttachmentRefused(f"`{name}` is too large; the limit is {_mib(limit)}.")
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise AttachmentRefused(f"I couldn't download `{name}` ({type(exc).__name__}).") from None
    try:
        # decoding and resizing are CPU work: keep them off the event loop
        return await asyncio.to_thread(
            normalize_image,
            bytes(data),
            max_bytes=limit,
            max_pixels=settings.max_image_pixels,
            max_edge=settings.max_image_edge,
        )
    except ImageError as exc:
        raise AttachmentRefused(f"`{name}`: {exc}") from None
