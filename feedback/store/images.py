"""Image rows and files of the store: checking, writing, and deleting unused and orphan files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import (
    delete_where_in,
    ids_where_in,
)
from feedback.store.errors import (
    ImageTooLarge,
    InvalidImage,
)
from feedback.store.models import (
    Image,
    PromptImage,
)

if TYPE_CHECKING:
    from smolcord.images import NormalizedImage
    from smolcord.settings import Settings

__all__ = [
    "ORPHAN_FILE_GRACE_S",
    "StoredImage",
]


# Files younger than this are never swept as orphans: a prompt being recorded writes its image
# file before its transaction commits.
ORPHAN_FILE_GRACE_S = 3600


_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class StoredImage:
    """An image as stored: its hash, type, file, and whether it came with the history."""

    sha256: str
    mime: str
    path: Path
    in_history: bool = False


def image_file(images_dir: Path, sha256: str, suffix: str) -> Path:
    """Where the file of an image lives (smolcord.images decides the layout)."""
    from smolcord.images import image_path

    return image_path(images_dir, sha256, suffix)


def accept_image(settings: Settings, image: NormalizedImage | bytes) -> NormalizedImage:
    """The image as the store keeps it: bytes are normalised here, a NormalizedImage is checked."""
    from smolcord.images import ImageError, normalize_for

    if isinstance(image, bytes | bytearray | memoryview):
        try:
            return normalize_for(settings, bytes(image))
        except ImageError as exc:
            error = ImageTooLarge if exc.code in {"too_large", "too_many_pixels"} else InvalidImage
            raise error(exc.message, code=exc.code) from None
    data = image.data
    if len(data) > settings.max_image_bytes:
        raise ImageTooLarge(
            f"image of {len(data)} bytes is over SMOLCORD_MAX_IMAGE_BYTES ({settings.max_image_bytes})"
        )
    if image.width * image.height > settings.max_image_pixels:
        raise ImageTooLarge(
            f"image of {image.width}×{image.height} is over SMOLCORD_MAX_IMAGE_PIXELS", code="too_many_pixels"
        )
    if max(image.width, image.height) > settings.max_image_edge:
        raise ImageTooLarge(
            f"image of {image.width}×{image.height} is over SMOLCORD_MAX_IMAGE_EDGE "
            f"({settings.max_image_edge}): normalise it first",
            code="too_large_edge",
        )
    if image.mime not in {"image/png", "image/jpeg"}:
        raise InvalidImage(f"not a normalised image type: {image.mime!r}", code="unsupported_image")
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise InvalidImage("the image bytes do not match their sha256", code="hash_mismatch")
    return image


def write_image_file(path: Path, data: bytes) -> bool:
    """Write a content-addressed file once (temp + fsync + rename); True if it was written now."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


async def delete_unused_images(session: AsyncSession, settings: Settings, candidates: set[str]) -> list[str]:
    """Delete the rows and files of candidate images no prompt uses any more (in the caller's transaction)."""
    if not candidates:
        return []
    used = await ids_where_in(session, PromptImage.image_sha256, PromptImage.image_sha256, candidates)
    unused = sorted(candidates - used)
    if not unused:
        return []
    suffixes = dict(
        (await session.execute(select(Image.sha256, Image.suffix).where(Image.sha256.in_(unused)))).all()
    )
    await delete_where_in(session, Image, Image.sha256, unused)
    await session.flush()
    # Unlinked inside the transaction, while it holds the rows' locks: a prompt recorded
    # concurrently with the same image waits, then writes the file again. Should the commit fail
    # after this, the rows stay and the next prompt with the image rewrites its file.
    for sha in unused:
        if sha in suffixes:
            path = image_file(settings.images_dir, sha, suffixes[sha])
            await asyncio.to_thread(path.unlink, True)
    return unused


def sweep_image_files(images_dir: Path, known: set[str], grace_s: float = ORPHAN_FILE_GRACE_S) -> int:
    """Remove image files without a row and stale temporary files (older than the grace period)."""
    if not images_dir.is_dir():
        return 0
    removed = 0
    deadline = time.time() - grace_s
    for path in images_dir.glob("*/*"):
        if not path.is_file():
            continue
        orphan = path.name.startswith(_TMP_PREFIX) or path.stem not in known
        try:
            if orphan and path.stat().st_mtime < deadline:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed
