"""Hostile image files for the tests (small files that expand enormously), and a peak-memory probe."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

_MiB = 1024 * 1024
_HWM = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@cache
def zeros_stream(mebibytes: int) -> bytes:
    """A zlib stream of `mebibytes` MiB of zeros, built without compressing them all (~1 KB a MiB).

    Each MiB is deflated on its own (a full flush drops the history), so every block is the same
    bytes; the Adler-32 of N zero bytes is (N mod 65521) << 16 | 1.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(_MiB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = compressor.flush()
    adler = ((mebibytes * _MiB) % 65521) << 16 | 1
    return b"\x78\xda" + block * mebibytes + final + struct.pack(">I", adler)


def png_bomb(
    mebibytes: int = 256, *, size: tuple[int, int] = (1, 1), colour_type: int = 2, interlace: int = 0
) -> bytes:
    """An 8-bit PNG of `size` pixels whose IDAT inflates to `mebibytes` MiB of zeros (256: a 261 KB file)."""
    header = struct.pack(">IIBBBBB", *size, 8, colour_type, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zeros_stream(mebibytes))
        + png_chunk(b"IEND", b"")
    )


@dataclass
class Peak:
    """Peak resident memory growth of this process inside a `peak_memory()` block, in MiB."""

    mib: float = 0.0


def _status_kib(key: str) -> int:
    for line in _HWM.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@contextmanager
def peak_memory() -> Iterator[Peak]:
    """Measure how far this process's resident memory peaks above where it stood at the start.

    Linux resets the high-water mark (VmHWM) on writing 5 to /proc/self/clear_refs, so the figure
    is this block's own peak, whatever the process used before; elsewhere the test is skipped.
    """
    try:
        _CLEAR_REFS.write_text("5")
        start = _status_kib("VmRSS")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    peak = Peak()
    try:
        yield peak
    finally:
        peak.mib = (_status_kib("VmHWM") - start) / 1024
