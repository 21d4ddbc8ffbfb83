"""Image normalisation: the one place where untrusted image bytes become the bytes every part uses.

The bot normalises Discord attachments and the worker normalises `data:` URLs; the store keeps
images by the sha256 of the normalised bytes, and the worker and trainer get exactly those bytes.

Output format, chosen so that normalising normalised bytes returns them byte-identical:

- An image that is already clean passes through unchanged: a baseline JFIF JPEG (3 components,
  no APPn besides APP0/JFIF, no COM, nothing after EOI) or an 8-bit RGB, non-interlaced PNG with
  only IHDR/IDAT/IEND chunks, in both cases with the longest edge within the limit. Everything this
  module writes is clean in that sense, so a second pass is a pass-through by construction (and
  does not depend on the encoder being bit-for-bit stable across Pillow or zlib versions).
- Otherwise JPEG (and MPO) sources are re-encoded as JPEG quality 90: they are lossy already, and
  PNG would only make them bigger. Everything else (PNG, GIF, BMP, TIFF, WebP, AVIF, ...) becomes
  PNG, which adds no loss. A PNG larger than `max_bytes` (a large noisy photo) falls back to JPEG.

Decoding is CPU-bound and Pillow releases the GIL while it works: from async code call
`normalize_image` through `asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, PngImagePlugin, UnidentifiedImageError

if TYPE_CHECKING:
    from PIL.ImageCms import ImageCmsProfile

    from smolcord.settings import Settings

__all__ = [
    "ImageError",
    "NormalizedImage",
    "decode_data_url",
    "image_path",
    "normalize_for",
    "normalize_image",
    "to_data_url",
]

# Formats we open at all. Restricting the list keeps Pillow's riskier plugins (EPS runs
# Ghostscript, for one) away from untrusted bytes. MPO (phone cameras' JPEGs) opens via "JPEG".
_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
_FORMAT_NAMES = "PNG, JPEG, GIF, WebP, BMP, TIFF or AVIF"
_LOSSY_SOURCES = {"JPEG", "MPO"}
_JPEG_QUALITIES = (90, 80, 70, 60)  # first one that fits max_bytes wins; 90 almost always does
# libjpeg-turbo's suggested TJPARAM_SCANLIMIT: real files have ~10 scans; 500 bounds a 40 MP decode
# to ~2 s of CPU where a 10 MiB file of empty scans would take most of an hour.
_JPEG_MAX_SCANS = 500
_PNG_COMPRESS_LEVEL = 6  # zlib's default: level 9 is several times slower for ~2 % smaller files
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # samples per pixel by colour type
_PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
# Image data may inflate to this much more than the header implies before it is refused (a valid
# file has exactly the header's size; libpng only warns about a little extra, so do not be stricter).
_PNG_SLACK = 64 * 1024
_INFLATE_STEP = 1024 * 1024  # image data is inflated and discarded in pieces of at most this size
_MiB = 1024 * 1024

# Pillow keeps up to 64 Mi characters of PNG text (tEXt/zTXt/iTXt, each chunk inflated to at most
# 1 MiB) per image, as much as 256 MiB of str: a few hundred kilobytes of zTXt chunks would cost
# more memory than the pixels we allow. All text is dropped anyway; real XMP packets are far smaller.
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 4 * _MiB)


class ImageError(ValueError):
    """An image was refused; `message` can be shown to the user, `status` is the HTTP status to answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = 413 if code in {"too_large", "too_many_pixels"} else 400


@dataclass(frozen=True)
class NormalizedImage:
    """Normalised image bytes (RGB, no metadata, edge within the limit) and what is known about them."""

    data: bytes
    sha256: str  # hex digest of `data`
    width: int
    height: int
    mime: str  # "image/png" or "image/jpeg"

    @property
    def suffix(self) -> str:
        return ".png" if self.mime == "image/png" else ".jpg"


def normalize_for(settings: Settings, data: bytes) -> NormalizedImage:
    """`normalize_image` with the limits from settings."""
    return normalize_image(
        data,
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        max_edge=settings.max_image_edge,
    )


def normalize_image(data: bytes, *, max_bytes: int, max_pixels: int, max_edge: int) -> NormalizedImage:
    """Check limits, decode the first frame, apply EXIF orientation, drop metadata, RGB, shrink, re-encode."""
    if len(data) > max_bytes:
        raise ImageError(
            "too_large",
            f"The image is too large ({_mib(len(data))}); the limit is {_mib(max_bytes)}.",
        )
    if not data:
        raise _not_an_image()
    try:
        # Image.open reads only the header. Pillow warns above Image.MAX_IMAGE_PIXELS and raises
        # above twice that; the warning becomes an error here. catch_warnings is process-global,
        # so a concurrent call may restore the filters under us: the explicit check below is the
        # guard that always holds.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_open_formats())
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise _too_many_pixels(None, max_pixels) from None
    except UnidentifiedImageError:
        raise _not_an_image() from None
    except Exception as exc:
        raise _decoding_refusal(exc) from None

    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise _too_many_pixels((width, height), max_pixels)
        if width < 1 or height < 1:
            raise _corrupt()
        source_format = image.format or ""
        target = _fit(width, height, max_edge)
        # Before any pixel is decoded: refuses PNG image data that inflates past the header's size.
        png_clean = source_format == "PNG" and _check_png(data)
        if source_format in _LOSSY_SOURCES and _jpeg_scans(data) > _JPEG_MAX_SCANS:
            # Each progressive scan is a pass over every block, so a few bytes a scan cost seconds of CPU.
            raise ImageError("too_many_scans", "The JPEG has too many progressive scans; it was refused.")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if target != (width, height) and source_format in _LOSSY_SOURCES:
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the target size):
                    # several times faster for big photos, and LANCZOS does the rest.
                    image.draft("RGB", target)
                image.load()  # the first frame only: we never seek
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise _too_many_pixels((width, height), max_pixels) from None
        except Exception as exc:
            raise _decoding_refusal(exc) from None

        if target == (width, height) and (png_clean or (source_format == "JPEG" and _is_clean_jpeg(data))):
            return _result(data, width, height, "image/jpeg" if source_format == "JPEG" else "image/png")

        orientation = _orientation(image)
        try:
            rgb = _to_rgb(image, target)
        except Exception:
            raise ImageError("unsupported_image", "The image's colour format is not supported.") from None

    rgb = _apply_orientation(rgb, orientation)
    rgb.info = {}  # no EXIF, ICC, XMP, text chunks, comments, dpi: encoders read some of these from info
    out_width, out_height = rgb.size

    if source_format not in _LOSSY_SOURCES:
        png = _encode(rgb, "PNG", compress_level=_PNG_COMPRESS_LEVEL)
        if len(png) <= max_bytes:
            return _result(png, out_width, out_height, "image/png")
    for quality in _JPEG_QUALITIES:
        jpeg = _encode(rgb, "JPEG", quality=quality, optimize=True)
        if len(jpeg) <= max_bytes:
            return _result(jpeg, out_width, out_height, "image/jpeg")
    raise ImageError("too_large", f"The image does not fit in {_mib(max_bytes)} even after compression.")


def decode_data_url(url: str, *, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL; any other URL is refused (nothing is ever fetched)."""
    if url[:5].lower() != "data:":
        raise ImageError(
            "unsupported_url",
            "Only data:image/...;base64 URLs are accepted: the worker never fetches URLs, "
            "send the image bytes inline.",
        )
    header, comma, payload = url[5:].partition(",")
    params = [part.strip().lower() for part in header.split(";")]
    if not params[0].startswith("image/") or params[-1] != "base64":
        raise ImageError(
            "unsupported_url", "Only data:image/...;base64 URLs are accepted (an image, base64-encoded)."
        )
    if not comma:
        raise ImageError("bad_data_url", "The data: URL has no data (expected data:image/...;base64,<data>).")
    # Refuse by the encoded length before allocating the decoded bytes (4 characters per 3 bytes,
    # plus slack for line breaks some encoders insert).
    if len(payload) > (max_bytes + 2) // 3 * 4 * 1.05 + 64:
        raise ImageError("too_large", f"The image is too large; the limit is {_mib(max_bytes)}.")
    payload = re.sub(r"\s+", "", payload)
    payload += "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("bad_data_url", "The data: URL is not valid base64.") from None
    if not data:
        raise ImageError("bad_data_url", "The data: URL holds no image.")
    if len(data) > max_bytes:
        raise ImageError(
            "too_large", f"The image is too large ({_mib(len(data))}); the limit is {_mib(max_bytes)}."
        )
    return data


def to_data_url(image: NormalizedImage) -> str:
    """A `data:` URL of the normalised bytes, as the worker API expects them."""
    return f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"


def image_path(images_dir: Path, sha256: str, suffix: str) -> Path:
    """Where the store keeps an image: `images_dir/ab/abcdef...png`, sharded by the first two hex digits."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    if suffix not in {".png", ".jpg"}:
        raise ValueError(f"unexpected image suffix: {suffix!r}")
    return images_dir / sha256[:2] / f"{sha256}{suffix}"


# ---------------------------------------------------------------------------- decoding helpers


@cache
def _open_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can open (asking for a missing one raises KeyError)."""
    Image.init()
    return tuple(name for name in _FORMATS if name in Image.OPEN)


def _fit(width: int, height: int, max_edge: int) -> tuple[int, int]:
    """The size with the longest edge at most max_edge, aspect ratio kept."""
    longest = max(width, height)
    if longest <= max_edge:
        return width, height
    scale = max_edge / longest
    return max(1, min(max_edge, round(width * scale))), max(1, min(max_edge, round(height * scale)))


def _to_rgb(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The frame as 8-bit RGB at `size`: alpha composited onto white, colour profile applied."""
    icc = image.info.get("icc_profile")
    image = _base_mode(image)  # RGB, L or CMYK from here on
    if image.size != size:
        # reducing_gap: a cheap box reduction first, then LANCZOS over the last factor of 3 or less.
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if icc:
        converted = _to_srgb(image, icc)
        if converted is not None:
            return converted
    return image if image.mode == "RGB" else image.convert("RGB")


def _base_mode(image: Image.Image) -> Image.Image:
    """The frame in RGB, L or CMYK: high bit depths scaled to 8 bits, transparency onto white."""
    mode = image.mode
    if mode in {"RGB", "L", "CMYK"} and "transparency" not in image.info:
        return image
    if mode.startswith("I") or mode == "F":
        return _to_8bit_gray(image)
    if mode in {"RGBA", "RGBa", "LA", "La", "PA"} or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P, RGBX, YCbCr, HSV, ...


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale to 8 bits (Pillow's own conversion clips instead of scaling)."""
    sixteen_bit = image.mode.startswith("I;16")
    if image.mode != "F":
        image = image.convert("I")
    extrema = image.getextrema()  # (low, high) for one band
    low, high = float(extrema[0]), float(extrema[1])  # type: ignore[arg-type]
    if sixteen_bit or (0 <= low and 255 < high <= 65535):
        image = image.point(lambda v: v / 257 + 0.5)
    elif image.mode == "F" and 0 <= low and high <= 1:
        image = image.point(lambda v: v * 255 + 0.5)
    elif low < 0 or high > 255:
        span = (high - low) or 1
        image = image.point(lambda v: (v - low) * 255 / span + 0.5)
    return image.convert("L")


@cache
def _srgb_profile() -> ImageCmsProfile:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _to_srgb(image: Image.Image, icc: bytes) -> Image.Image | None:
    """The image converted from its embedded profile to sRGB, or None when that is not possible."""
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(image, source, _srgb_profile(), outputMode="RGB")
    except Exception:  # no littlecms, a broken profile, a profile for another colour space
        return None
    return converted if isinstance(converted, Image.Image) else None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


_ORIENTATION_OPS = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_90],
}  # the same table as ImageOps.exif_transpose


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    for op in _ORIENTATION_OPS.get(orientation, []):
        image = image.transpose(op)
    return image


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _result(data: bytes, width: int, height: int, mime: str) -> NormalizedImage:
    return NormalizedImage(data, hashlib.sha256(data).hexdigest(), width, height, mime)


# ------------------------------------------------------------------------- clean-file detection


def _is_clean_jpeg(data: bytes) -> bool:
    """Baseline JFIF, 3 components, one interleaved scan, no metadata segments, nothing after EOI."""
    if not data.startswith(b"\xff\xd8"):
        return False
    pos, end = 2, len(data)
    seen_jfif = seen_sof = False
    while pos < end:
        if data[pos] != 0xFF:
            return False
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos + 3 > end:
            return False
        marker = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 3], "big")
        segment = data[pos + 3 : pos + 1 + length]
        if length < 2 or len(segment) != length - 2:
            return False
        pos += 1 + length
        if marker == 0xE0:  # APP0: only a JFIF header without thumbnail, and only first
            if seen_jfif or seen_sof or length != 16 or not segment.startswith(b"JFIF\x00"):
                return False
            if segment[12] or segment[13]:
                return False
            seen_jfif = True
        elif not seen_jfif:
            return False
        elif marker == 0xC0:  # SOF0, baseline: 8 bits, 3 components (YCbCr under JFIF)
            if seen_sof or len(segment) < 6 or segment[0] != 8 or segment[5] != 3:
                return False
            seen_sof = True
        elif marker in (0xC4, 0xDB, 0xDD):  # DHT, DQT, DRI
            continue
        elif marker == 0xDA:  # SOS: one interleaved scan, then only EOI
            if not seen_sof or not segment or segment[0] != 3:
                return False
            return _scan_ends_at_eoi(data, pos)
        else:  # APP1-15 (EXIF, XMP, ICC, Adobe...), COM, SOF1-15, DAC, DNL, ...
            return False
    return False


def _scan_ends_at_eoi(data: bytes, pos: int) -> bool:
    """Whether the entropy-coded data from `pos` runs to an EOI that ends the file."""
    pos = _entropy_end(data, pos)
    return pos + 2 == len(data) and data[pos + 1] == 0xD9


def _entropy_end(data: bytes, pos: int) -> int:
    """Where the entropy-coded data from `pos` ends: the 0xFF of the next marker, or len(data)."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:  # stuffed 0xFF, restart markers
            pos += 2
        elif following == 0xFF:  # fill byte
            pos += 1
        else:
            return pos


def _jpeg_scans(data: bytes) -> int:
    """How many scans (SOS segments) the first image of a JPEG has; counting stops at damage or EOI."""
    pos, end, scans = 2, len(data), 0
    while pos < end and data[pos] == 0xFF:
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end or data[pos] == 0xD9:  # EOI: what follows (an MPO's next frame) is never decoded
            break
        marker = data[pos]
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 1
            continue
        pos += 1 + int.from_bytes(data[pos + 1 : pos + 3], "big")
        if marker == 0xDA:
            scans += 1
            pos = _entropy_end(data, pos)
    return scans


def _png_data_size(width: int, height: int, bit_depth: int, colour_type: int, interlace: int) -> int | None:
    """How many bytes a PNG's image data inflates to, by its header; None for a header PNG does not allow."""
    channels = _PNG_CHANNELS.get(colour_type)
    if channels is None or bit_depth not in _PNG_BIT_DEPTHS[colour_type] or interlace not in (0, 1):
        return None
    bits = channels * bit_depth
    total = 0
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        columns, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if columns and rows:  # an empty pass has no filter bytes either
            total += rows * (1 + (columns * bits + 7) // 8)
    return total


def _check_png(data: bytes) -> bool:
    """Refuse image data that inflates past what the header implies; True when the PNG is clean.

    Clean: 8-bit RGB, not interlaced, only IHDR/IDAT/IEND with valid CRCs, one zlib stream of exactly
    the header's size, nothing after IEND. zlib expands up to ~1000:1, so the data is inflated in
    bounded steps and never kept: a small file cannot make this (or Pillow after it) use more
    memory or time than the pixels its header declares.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return False
    pos, end = len(_PNG_SIGNATURE), len(data)
    clean, expected, idat_run = True, -1, "before"  # idat_run: before / in / after the IDAT chunks
    stream, inflated = zlib.decompressobj(), 0
    while pos + 12 <= end:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            return False  # truncated: Pillow decides whether it is readable
        pos += 12 + length
        if clean and zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
            clean = False
        if expected < 0:  # the first chunk must be IHDR
            if kind != b"IHDR" or length != 13:
                return False
            width, height = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
            size = _png_data_size(width, height, body[8], body[9], body[12])
            if size is None:
                return False  # Pillow refuses such headers itself
            expected = size
            clean = clean and body[8:13] == b"\x08\x02\x00\x00\x00"  # 8-bit RGB, no interlace
        elif kind == b"IDAT":
            if idat_run == "after" or stream.eof:  # a second run or bytes after the zlib stream
                clean = False
                continue
            idat_run = "in"
            try:
                inflated += _inflate_bounded(stream, body, expected + _PNG_SLACK - inflated)
            except zlib.error:
                return False  # Pillow reports the damage
            if inflated > expected + _PNG_SLACK:
                raise ImageError(
                    "decompression_bomb",
                    f"The image's compressed data expands to more than its {width}×{height} pixels need; "
                    "it was refused.",
                )
        elif kind == b"IEND":
            return clean and pos == end and stream.eof and not stream.unused_data and inflated == expected
        else:  # any ancillary chunk (or PLTE) makes the file not clean; it ends an IDAT run
            clean = False
            idat_run = "after" if idat_run == "in" else idat_run
    return False


def _inflate_bounded(stream: zlib._Decompress, data: bytes, room: int) -> int:
    """Bytes `data` inflates to, counted in 1 MiB steps and thrown away; stops once past `room`."""
    total = 0
    while True:
        out = len(stream.decompress(data, _INFLATE_STEP))
        total += out
        data = stream.unconsumed_tail
        # an output-limited call can leave output pending with no input left: ask again until a short one
        if total > room or (not data and out < _INFLATE_STEP):
            return total


# ------------------------------------------------------------------------------------ messages


def _mib(size: int) -> str:
    return f"{size / _MiB:.1f} MiB"


def _not_an_image() -> ImageError:
    return ImageError("not_an_image", f"That file is not an image I can read ({_FORMAT_NAMES}).")


def _corrupt() -> ImageError:
    return ImageError("corrupt", "The image file is damaged or incomplete.")


def _decoding_refusal(exc: Exception) -> ImageError:
    """What to tell the user when Pillow gave up on a file."""
    if isinstance(exc, ValueError) and "MAX_TEXT" in str(exc):  # PngImagePlugin's text limits
        return ImageError("too_much_metadata", "The image carries too much text metadata; it was refused.")
    return _corrupt()


def _too_many_pixels(size: tuple[int, int] | None, max_pixels: int) -> ImageError:
    limit = f"the limit is {max_pixels / 1e6:g} megapixels"
    if size is None:
        return ImageError("too_many_pixels", f"The image has too many pixels; {limit}.")
    return ImageError("too_many_pixels", f"The image has too many pixels ({size[0]}×{size[1]}); {limit}.")
