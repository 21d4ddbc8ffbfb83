"""Image normalisation: orientation, metadata, modes, limits, bombs, idempotence, data URLs, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import io
import operator
import random
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from image_bombs import peak_memory, png_bomb, png_chunk
from PIL import Image, ImageCms, ImageFile, PngImagePlugin

from smolcord.images import (
    ImageError,
    NormalizedImage,
    _png_data_size,
    decode_data_url,
    image_path,
    normalize_image,
    to_data_url,
)

LIMITS = {"max_bytes": 10 * 1024 * 1024, "max_pixels": 40_000_000, "max_edge": 1536}
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def close(pixel, expected, tolerance=40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def photo(size=(600, 400)) -> Image.Image:
    """A smooth gradient (JPEG-friendly) with a red block in the top-left corner."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste(Image.new("RGB", (width // 5, height // 5), RED), (0, 0))
    return image


def bomb_png(width: int, height: int, *, real_data: bool = True) -> bytes:
    """A 1-bit greyscale PNG of zeros: width×height pixels in a few kilobytes."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    if real_data:
        compressor = zlib.compressobj(9)
        row = bytes(1 + (width + 7) // 8)
        idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:
        idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def refused(data: bytes, **limits) -> ImageError:
    with pytest.raises(ImageError) as info:
        normalize_image(data, **(LIMITS | limits))
    return info.value


# ------------------------------------------------------------------------- orientation, metadata


def test_exif_orientation_applied_and_metadata_dropped():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90° clockwise
    exif[0x010F] = "ACME Camera"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = encode(photo((600, 400)), "JPEG", quality=95, exif=exif, icc_profile=icc)

    result = normalize_image(source, **LIMITS)

    assert (result.width, result.height) == (400, 600)
    assert result.mime == "image/jpeg" and result.suffix == ".jpg"
    assert result.sha256 == hashlib.sha256(result.data).hexdigest()
    image = decode(result.data)
    assert image.size == (400, 600) and image.mode == "RGB"
    # the stored top-left corner is the displayed top-right corner
    assert close(image.getpixel((400 - 20, 20)), RED)
    assert not close(image.getpixel((20, 20)), RED)
    assert not image.getexif()
    assert "icc_profile" not in image.info and "exif" not in image.info
    assert b"Exif" not in result.data and b"ACME" not in result.data and b"ICC_PROFILE" not in result.data


def test_png_metadata_dropped():
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "someone@example.com")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>secret</x:xmpmeta>")
    exif = Image.Exif()
    exif[0x010F] = "ACME Camera"
    source = encode(photo((200, 100)), "PNG", pnginfo=info, exif=exif, dpi=(300, 300))

    result = normalize_image(source, **LIMITS)

    assert result.mime == "image/png"
    for secret in (b"someone@example.com", b"secret", b"ACME", b"pHYs", b"tEXt", b"iTXt", b"eXIf"):
        assert secret not in result.data
    assert decode(result.data).tobytes() == photo((200, 100)).tobytes()  # PNG in, PNG out: lossless


# --------------------------------------------------------------------------------- idempotence


@cache
def _sources() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 8
    rgba = Image.new("RGBA", (120, 90), (0, 0, 255, 128))
    frames = [Image.new("P", (50, 40), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return {
        "clean jpeg": encode(photo(), "JPEG", quality=85),
        "jpeg with exif": encode(photo(), "JPEG", quality=95, exif=exif),
        "big jpeg": encode(photo((2400, 1000)), "JPEG"),
        "progressive jpeg": encode(photo(), "JPEG", progressive=True),
        "greyscale jpeg": encode(photo().convert("L"), "JPEG"),
        "png": encode(photo(), "PNG"),
        "big png": encode(photo((2000, 1800)), "PNG"),
        "rgba png": encode(rgba, "PNG"),
        "gif": gif.getvalue(),
        "bmp": encode(photo(), "BMP"),
        "webp": encode(photo(), "WEBP", quality=80),
        "tiff": encode(photo(), "TIFF"),
    }


@pytest.mark.parametrize("name", list(_sources()))
def test_normalising_twice_gives_the_same_bytes(name):
    source = _sources()[name]
    once = normalize_image(source, **LIMITS)
    twice = normalize_image(once.data, **LIMITS)
    assert twice == once
    assert max(once.width, once.height) <= LIMITS["max_edge"]
    assert decode(once.data).mode == "RGB"
    assert once.mime == ("image/jpeg" if "jpeg" in name else "image/png")


def test_clean_jpeg_passes_through_unchanged():
    source = encode(photo(), "JPEG", quality=75)
    assert normalize_image(source, **LIMITS).data == source


def test_jpeg_with_trailing_data_is_reencoded():
    source = encode(photo(), "JPEG", quality=75) + b"PK\x03\x04 hidden zip"
    result = normalize_image(source, **LIMITS)
    assert b"hidden zip" not in result.data


def test_png_with_bytes_hidden_after_the_image_data_is_reencoded():
    clean = normalize_image(encode(photo(), "PNG"), **LIMITS).data
    assert normalize_image(clean, **LIMITS).data == clean
    # rebuild it with one IDAT chunk that carries extra bytes after the zlib stream
    image_data = zlib.compress(zlib.decompress(clean[clean.index(b"IDAT") + 4 :].split(b"IEND")[0][:-8]))
    header = clean[8 : clean.index(b"IDAT") - 4]
    hidden = (
        b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", image_data + b"secret") + png_chunk(b"IEND", b"")
    )
    result = normalize_image(hidden, **LIMITS)
    assert b"secret" not in result.data
    assert decode(result.data).tobytes() == decode(clean).tobytes()


def test_concurrent_calls_agree_with_sequential_ones():
    sources = [*_sources().values(), bomb_png(12_000, 12_000, real_data=False)]

    def outcome(source: bytes):
        try:
            return normalize_image(source, **LIMITS).data
        except ImageError as error:
            return error.code

    expected = [outcome(source) for source in sources]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            assert list(pool.map(outcome, sources)) == expected
    assert expected[-1] == "too_many_pixels"


def test_png_larger_than_max_bytes_falls_back_to_jpeg():
    # palette noise: one byte a pixel as a palette PNG, three once converted to RGB
    rng = random.Random(0)
    noise = Image.frombytes("P", (600, 400), rng.randbytes(600 * 400))
    noise.putpalette(rng.randbytes(768))
    source = encode(noise, "PNG")
    limits = LIMITS | {"max_bytes": len(source) * 3 // 2}
    result = normalize_image(source, **limits)
    assert len(result.data) <= limits["max_bytes"]
    assert result.mime == "image/jpeg"
    assert normalize_image(result.data, **limits) == result


# ---------------------------------------------------------------------------------------- limits


def test_pixel_bomb_refused_before_decoding(monkeypatch):
    source = bomb_png(12_000, 12_000)  # 144 megapixels in a few kilobytes
    assert len(source) < 100_000

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    started = time.monotonic()
    error = refused(source)
    assert time.monotonic() - started < 1.0
    assert error.code == "too_many_pixels" and error.status == 413
    assert "12000×12000" in error.message or "megapixels" in error.message


@pytest.mark.parametrize("size", [(7_000, 7_000), (20_000, 20_000)])
def test_pixel_limit_checked_on_the_header(monkeypatch, size):
    # 49 MP is under Pillow's own limit (only ours applies); 400 MP is over twice Pillow's (it raises)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    error = refused(bomb_png(*size, real_data=False))
    assert error.code == "too_many_pixels" and error.status == 413


def test_too_many_bytes_refused_before_decoding():
    error = refused(encode(photo(), "PNG"), max_bytes=1000)
    assert error.code == "too_large" and error.status == 413
    assert "MiB" in error.message


def test_oversize_edge_shrunk():
    result = normalize_image(encode(photo((3000, 1000)), "PNG"), **LIMITS)
    assert (result.width, result.height) == (1536, 512)
    image = decode(result.data)
    assert image.size == (1536, 512)
    assert close(image.getpixel((10, 10)), RED)


def test_oversize_jpeg_shrunk():
    result = normalize_image(encode(photo((4000, 3000)), "JPEG"), **(LIMITS | {"max_edge": 500}))
    assert (result.width, result.height) == (500, 375)
    assert close(decode(result.data).getpixel((10, 10)), RED)


# --------------------------------------------------------------------------- decompression bombs


def test_png_bomb_refused_within_bounded_memory():
    source = png_bomb(256)  # 1×1 pixel, 8-bit RGB: the clean-file header; 256 MiB of zeros inflated
    assert len(source) < 300_000
    with peak_memory() as peak:
        try:
            normalize_image(source, **LIMITS)
        except ImageError as error:
            outcome = error
    print(f"PNG bomb, normalize_image: peak growth {peak.mib:.1f} MiB")
    assert peak.mib < 64, f"peak memory grew by {peak.mib:.0f} MiB"
    assert isinstance(outcome, ImageError), "a 1×1 PNG of 256 MiB of image data was accepted"
    assert outcome.code == "decompression_bomb" and outcome.status == 400
    assert "1×1" in outcome.message


@pytest.mark.parametrize(
    ("colour_type", "interlace", "size"),
    [(6, 1, (3, 5)), (0, 0, (40, 1)), (3, 0, (1, 1)), (2, 1, (17, 9))],
    ids=["rgba-interlaced", "grey", "palette", "rgb-interlaced"],
)
def test_png_bomb_refused_whatever_the_header(colour_type, interlace, size):
    # not only the clean-file header: every PNG's image data is bounded by what its header implies
    error = refused(png_bomb(8, size=size, colour_type=colour_type, interlace=interlace))
    assert error.code == "decompression_bomb"


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (9, 17), (33, 2), (8, 8)])
@pytest.mark.parametrize(
    ("colour_type", "bit_depth"), [(0, 1), (0, 4), (0, 16), (2, 8), (3, 2), (4, 8), (6, 16)]
)
@pytest.mark.parametrize("interlace", [0, 1])
def test_png_data_size_is_what_pillow_decodes(size, colour_type, bit_depth, interlace):
    """The bound is exact: one byte less than the header's size is a truncated image to Pillow."""
    expected = _png_data_size(*size, bit_depth, colour_type, interlace)
    assert expected is not None

    def png(image_data: bytes) -> bytes:
        header = struct.pack(">IIBBBBB", *size, bit_depth, colour_type, 0, 0, interlace)
        palette = png_chunk(b"PLTE", bytes(3 * 256)) if colour_type == 3 else b""
        return (
            b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", header)
            + palette
            + png_chunk(b"IDAT", zlib.compress(image_data))
            + png_chunk(b"IEND", b"")
        )

    assert decode(png(bytes(expected))).size == size
    with pytest.raises(OSError):
        decode(png(bytes(expected - 1)))
    result = normalize_image(png(bytes(expected)), **LIMITS)
    assert (result.width, result.height) == size


def test_png_with_a_little_extra_image_data_is_reencoded_not_refused():
    clean = normalize_image(encode(photo((40, 30)), "PNG"), **LIMITS).data
    raw = zlib.decompress(clean[clean.index(b"IDAT") + 4 :].split(b"IEND")[0][:-8])
    header = clean[8 : clean.index(b"IDAT") - 4]
    extra = (
        b"\x89PNG\r\n\x1a\n"
        + header
        + png_chunk(b"IDAT", zlib.compress(raw + bytes(100)))
        + png_chunk(b"IEND", b"")
    )
    assert normalize_image(extra, **LIMITS).data == clean  # libpng accepts this: so do we, cleaned


def _text_bomb(chunks: int, kind: bytes, text: str) -> bytes:
    compressed = zlib.compress((text * ((1 << 20) // len(text.encode()))).encode(), 9)
    body = {b"zTXt": b"\0\0" + compressed, b"iTXt": b"\0\1\0\0\0" + compressed}[kind]
    texts = b"".join(png_chunk(kind, b"key%d" % i + body) for i in range(chunks))
    clean = encode(Image.new("RGB", (2, 2)), "PNG")
    at = clean.index(b"IDAT") - 4
    return clean[:at] + texts + clean[at:]


@pytest.mark.parametrize(
    ("chunks", "kind", "text"),
    [(40, b"zTXt", "x"), (70, b"zTXt", "x"), (200, b"iTXt", "中")],
    ids=["40-MiB-ztxt", "70-MiB-ztxt", "cjk-itxt"],
)
def test_compressed_text_chunks_cannot_use_much_memory(chunks, kind, text):
    source = _text_bomb(chunks, kind, text)  # each chunk ~1 KB, inflating to 1 MiB of text
    assert len(source) < 250_000
    with peak_memory() as peak:
        error = refused(source)
    assert peak.mib < 64, f"peak memory grew by {peak.mib:.0f} MiB"
    assert error.code == "too_much_metadata" and "metadata" in error.message


def test_a_few_compressed_text_chunks_are_fine():
    result = normalize_image(_text_bomb(2, b"zTXt", "x"), **LIMITS)
    assert b"zTXt" not in result.data


def test_jpeg_with_too_many_scans_refused():
    progressive = encode(photo((800, 800)), "JPEG", progressive=True)
    assert progressive.count(b"\xff\xda") == 10  # libjpeg's default progressive script
    # empty AC refinement scans of the first component: a few bytes each, a pass over every block
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x01\x3f\x10"
    assert normalize_image(progressive[:-2] + empty_scan * 400 + b"\xff\xd9", **LIMITS).width == 800
    error = refused(progressive[:-2] + empty_scan * 600 + b"\xff\xd9")
    assert error.code == "too_many_scans" and error.status == 400


# ------------------------------------------------------------------------------- broken inputs


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_corrupt(fmt):
    source = encode(Image.effect_noise((300, 300), 50).convert("RGB"), fmt)
    error = refused(source[: len(source) // 2])
    assert error.code == "corrupt" and error.status == 400
    assert error.__cause__ is None and error.__suppress_context__  # no Pillow traceback attached


@pytest.mark.parametrize("data", [random.Random(0).randbytes(5000), b"", b"GIF89a", b"%PDF-1.7\n"])
def test_non_image_refused(data):
    error = refused(data)
    assert error.code == "not_an_image" and error.status == 400
    assert "PNG" in error.message


def test_formats_outside_the_allow_list_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert refused(eps).code == "not_an_image"


# ---------------------------------------------------------------------------------------- modes


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (64, 48), colour) for colour in (RED, GREEN, BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = normalize_image(buffer.getvalue(), **LIMITS)
    image = decode(result.data)
    assert result.mime == "image/png" and image.size == (64, 48)
    assert getattr(image, "n_frames", 1) == 1
    assert close(image.getpixel((32, 24)), RED, tolerance=8)


def test_animated_png_gives_first_frame():
    frames = [Image.new("RGB", (64, 48), colour) for colour in (GREEN, BLUE)]
    source = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    result = normalize_image(source, **LIMITS)
    assert b"acTL" not in result.data
    assert decode(result.data).getpixel((5, 5)) == GREEN


def test_cmyk_jpeg_becomes_rgb():
    source = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG")  # pure red in CMYK
    result = normalize_image(source, **LIMITS)
    image = decode(result.data)
    assert image.mode == "RGB" and result.mime == "image/jpeg"
    assert close(image.getpixel((32, 32)), RED)
    assert b"Adobe" not in result.data


def test_transparency_composited_onto_white():
    image = Image.new("RGBA", (90, 30), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (30, 30), (255, 0, 0, 128)), (30, 0))
    image.paste(Image.new("RGBA", (30, 30), (0, 0, 255, 255)), (60, 0))
    result = decode(normalize_image(encode(image, "PNG"), **LIMITS).data)
    assert result.mode == "RGB"
    assert result.getpixel((15, 15)) == WHITE
    assert close(result.getpixel((45, 15)), (255, 127, 127), tolerance=2)
    assert result.getpixel((75, 15)) == BLUE


def test_palette_with_transparency_composited_onto_white():
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (10, 0, 20, 20))
    result = decode(normalize_image(encode(image, "PNG", transparency=0), **LIMITS).data)
    assert result.getpixel((5, 5)) == WHITE
    assert result.getpixel((15, 5)) == GREEN


def test_sixteen_bit_greyscale_scaled_not_clipped():
    image = Image.new("I;16", (16, 16), 0)
    image.paste(65535, (0, 0, 8, 16))
    image.paste(32896, (8, 0, 16, 16))  # 128 × 257
    result = decode(normalize_image(encode(image, "PNG"), **LIMITS).data)
    assert result.getpixel((2, 2)) == WHITE
    assert result.getpixel((12, 2)) == (128, 128, 128)


def test_one_bit_and_greyscale_and_la():
    for image in (Image.new("1", (8, 8), 1), Image.new("L", (8, 8), 255), Image.new("LA", (8, 8), (0, 0))):
        result = decode(normalize_image(encode(image, "PNG"), **LIMITS).data)
        assert result.mode == "RGB" and result.getpixel((1, 1)) == WHITE


# ------------------------------------------------------------------------------------ data URLs


def test_data_url_round_trip():
    result = normalize_image(encode(photo(), "PNG"), **LIMITS)
    url = to_data_url(result)
    assert url.startswith("data:image/png;base64,")
    assert decode_data_url(url, max_bytes=LIMITS["max_bytes"]) == result.data


def test_data_url_tolerates_whitespace_and_missing_padding():
    payload = base64.b64encode(b"abcde").decode().rstrip("=")
    url = f"data:image/jpeg;base64,{payload[:3]}\n{payload[3:]}"
    assert decode_data_url(url, max_bytes=100) == b"abcde"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64,not*base64!", "bad_data_url"),
        ("data:image/png;base64,", "bad_data_url"),
        ("data:image/png;base64", "bad_data_url"),
        ("https://cdn.discordapp.com/attachments/1/2/cat.png", "unsupported_url"),
        ("http://169.254.169.254/latest/meta-data", "unsupported_url"),
        ("file:///etc/passwd", "unsupported_url"),
        ("data:text/plain;base64,aGVsbG8=", "unsupported_url"),
        ("data:image/png,rawbytes", "unsupported_url"),
    ],
)
def test_bad_urls_refused(url, code):
    with pytest.raises(ImageError) as info:
        decode_data_url(url, max_bytes=1000)
    assert info.value.code == code and info.value.status == 400


def test_http_url_message_says_nothing_is_fetched():
    with pytest.raises(ImageError) as info:
        decode_data_url("https://example.com/a.png", max_bytes=1000)
    assert "never fetches" in info.value.message


def test_data_url_too_large_refused_before_decoding():
    url = "data:image/png;base64," + "A" * 10_000
    with pytest.raises(ImageError) as info:
        decode_data_url(url, max_bytes=1000)
    assert info.value.code == "too_large" and info.value.status == 413


# ----------------------------------------------------------------------------------------- paths


def test_image_path_is_sharded(tmp_path: Path):
    digest = hashlib.sha256(b"x").hexdigest()
    assert image_path(tmp_path, digest, ".png") == tmp_path / digest[:2] / f"{digest}.png"
    image = NormalizedImage(b"x", digest, 1, 1, "image/jpeg")
    assert image_path(tmp_path, image.sha256, image.suffix).name.endswith(".jpg")
    for bad in ("../" + digest[3:], digest.upper(), "ab"):
        with pytest.raises(ValueError):
            image_path(tmp_path, bad, ".png")
    with pytest.raises(ValueError):
        image_path(tmp_path, digest, "/../x")


# --------------------------------------------------------------------------------------- fuzzing

# Small limits: a mutated header may declare any size up to max_pixels, and decoding that many
# pixels is legitimate work; bounded here so the memory bound below says something.
FUZZ_LIMITS = {"max_bytes": 1024 * 1024, "max_pixels": 1_000_000, "max_edge": 256}
FUZZ_PEAK_MIB = 64


@cache
def _fuzz_seeds() -> dict[str, bytes]:
    """Small valid files of every family we accept, built by Pillow: what mutations start from."""
    picture = photo((36, 24))
    frames = [Image.new("P", (20, 12), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=40)
    webp_anim = io.BytesIO()
    picture.save(webp_anim, "WEBP", save_all=True, append_images=[picture.rotate(90)], duration=40)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello", zip=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "png": normalize_image(encode(picture, "PNG"), **LIMITS).data,  # the clean form
        "png rgba text": encode(picture.convert("RGBA"), "PNG", pnginfo=info),
        "png palette": encode(picture.convert("P"), "PNG", transparency=0),
        "png 16-bit": encode(picture.convert("I;16"), "PNG"),
        "jpeg": encode(picture, "JPEG", quality=80),
        "jpeg progressive exif": encode(picture, "JPEG", progressive=True, exif=exif),
        "gif": gif.getvalue(),
        "webp": encode(picture, "WEBP", quality=70),
        "webp lossless": encode(picture, "WEBP", lossless=True),
        "webp animated": webp_anim.getvalue(),
    }


_SEED_NAMES = sorted(_fuzz_seeds())
_KEEP = 12  # the longest signature (WebP's RIFF....WEBP) that mutations leave alone
_PNG = b"\x89PNG\r\n\x1a\n"
_MAGIC = [b"", _PNG, b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


def _normalises_or_refuses(data: bytes) -> str:
    """The property: a normalised image that normalises to itself, or the module's refusal; nothing else."""
    try:
        once = normalize_image(data, **FUZZ_LIMITS)
    except ImageError as error:
        assert error.code and error.message and error.status in (400, 413)
        return error.code
    assert normalize_image(once.data, **FUZZ_LIMITS) == once  # idempotent, byte for byte
    image = decode(once.data)
    assert image.mode == "RGB" and image.size == (once.width, once.height)
    assert max(image.size) <= FUZZ_LIMITS["max_edge"] and len(once.data) <= FUZZ_LIMITS["max_bytes"]
    return "ok"


def _fuzz(name: str, strategy, examples: int) -> None:
    """Run the property over `examples` generated files within the peak-memory bound; count what was tried."""
    outcomes: dict[str, int] = {}

    @settings(max_examples=examples)
    @given(strategy)
    def check(data: bytes) -> None:
        outcome = _normalises_or_refuses(data)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    with peak_memory() as peak:
        check()
    tried = sum(outcomes.values())
    print(f"image fuzz {name}: {tried} inputs, peak growth {peak.mib:.0f} MiB, outcomes {outcomes}")
    assert tried >= examples  # hypothesis ran them all (none filtered away)
    assert peak.mib < FUZZ_PEAK_MIB


def _truncated():
    return st.builds(
        lambda name, cut: _fuzz_seeds()[name][: cut % (len(_fuzz_seeds()[name]) + 1)],
        st.sampled_from(_SEED_NAMES),
        st.integers(0, 1 << 20),
    )


def _mutated():
    """A seed with a few bytes overwritten, inserted or deleted (the signature kept: noise covers that)."""

    def mutate(name: str, edits: list[tuple[int, int, int]]) -> bytes:
        data = bytearray(_fuzz_seeds()[name])
        for where, kind, value in edits:
            at = _KEEP + where % (len(data) - _KEEP + 1)
            if kind == 0 and at < len(data):
                data[at] = value
            elif kind == 1:
                data[at:at] = bytes([value]) * (value % 7 + 1)
            else:
                del data[at : at + value % 9 + 1]
        return bytes(data)

    edit = st.tuples(st.integers(0, 1 << 20), st.integers(0, 2), st.integers(0, 255))
    return st.builds(mutate, st.sampled_from(_SEED_NAMES), st.lists(edit, min_size=1, max_size=6))


def _mutated_png_chunks():
    """A PNG seed with bytes of one chunk changed and its CRC fixed: past the CRC check, into the decoders."""

    def mutate(name: str, which: int, edits: list[tuple[int, int]]) -> bytes:
        data = _fuzz_seeds()[name]
        chunks, pos = [], 8
        while pos < len(data):
            length = struct.unpack(">I", data[pos : pos + 4])[0]
            chunks.append([data[pos + 4 : pos + 8], bytearray(data[pos + 8 : pos + 8 + length])])
            pos += 12 + length
        _, body = chunks[which % len(chunks)]
        for where, value in edits:
            if body:
                body[where % len(body)] = value
        return _PNG + b"".join(png_chunk(kind, bytes(body)) for kind, body in chunks)

    pngs = [name for name in _SEED_NAMES if name.startswith("png")]
    edit = st.tuples(st.integers(0, 1 << 20), st.integers(0, 255))
    return st.builds(
        mutate, st.sampled_from(pngs), st.integers(0, 15), st.lists(edit, min_size=1, max_size=4)
    )


def test_fuzz_random_bytes():
    magic_then_noise = st.builds(operator.add, st.sampled_from(_MAGIC), st.binary(max_size=600))
    _fuzz("random bytes", magic_then_noise, 250)


def test_fuzz_truncated_files():
    _fuzz("truncated", _truncated(), 200)


def test_fuzz_mutated_files():
    _fuzz("mutated", _mutated(), 400)


def test_fuzz_png_chunks_with_valid_crcs():
    _fuzz("png chunks, valid CRCs", _mutated_png_chunks(), 250)
