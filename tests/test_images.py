"""server.images: pure functions from bytes to RGB pixels; no server or model needed."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from ci import IN_CI, skip_unless_ci
from PIL import Image, ImageDraw, ImageOps, features

from bench.images import photo_like  # the benchmark's photo-like content, shared
from server.images import (
    DEFAULT_LIMITS,
    ImageError,
    ImageLimits,
    ImageTooLargeError,
    backend,
    decode_image,
    decode_image_reference,
    image_backend_info,
    image_bytes_from_url,
    target_size,
)

ADAPTIVE = Image.Palette.ADAPTIVE
HAS_WEBP = features.check("webp")
# Under CI a Pillow (or pillow-simd) build without WebP fails these instead of skipping.
needs_webp = pytest.mark.skipif(not HAS_WEBP and not IN_CI,
                                reason="this Pillow build has no WebP support")
# Pillow warns between its guard and twice its guard; we reject those images ourselves.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# --- builders ---------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def quadrants(width: int = 60, height: int = 40) -> Image.Image:
    """Red, green / blue, white quadrants: every flip and rotation looks different."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width // 2 - 1, height // 2 - 1), fill=(255, 0, 0))
    draw.rectangle((width // 2, 0, width - 1, height // 2 - 1), fill=(0, 255, 0))
    draw.rectangle((0, height // 2, width // 2 - 1, height - 1), fill=(0, 0, 255))
    return image


def as_image(decoded: object) -> Image.Image:
    return Image.frombytes("RGB", (decoded.width, decoded.height), decoded.rgb)


def pixel(decoded: object, fx: float, fy: float) -> tuple[int, int, int]:
    """The pixel at a fractional position of the decoded image."""
    x = min(decoded.width - 1, int(fx * decoded.width))
    y = min(decoded.height - 1, int(fy * decoded.height))
    i = (y * decoded.width + x) * 3
    return tuple(decoded.rgb[i:i + 3])


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def naive(data: bytes, max_side: int) -> Image.Image:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB"))
    return image.resize(target_size(*image.size, max_side), Image.Resampling.LANCZOS)


def png_with_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming any size, with almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to claim another size."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_with_screen(width: int, height: int) -> bytes:
    """A small real GIF whose logical screen descriptor claims another size."""
    data = bytearray(encode(Image.new("P", (16, 16)), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def use_jpeg_backend(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "simplejpeg" and backend.simplejpeg is None:
        skip_unless_ci("simplejpeg is not installed")
    if name == "pillow":
        monkeypatch.setattr(backend, "simplejpeg", None)


@pytest.fixture(params=["simplejpeg", "pillow"])
def jpeg_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both JPEG paths: simplejpeg's scaled decode and the Pillow fallback."""
    use_jpeg_backend(request.param, monkeypatch)
    return request.param


# Each format once, JPEG twice: through simplejpeg and through the Pillow fallback.
FORMATS = ["JPEG", "JPEG/pillow", "PNG", "BMP", "GIF", pytest.param("WEBP", marks=needs_webp)]


def format_under_test(fmt: str, monkeypatch: pytest.MonkeyPatch) -> str:
    fmt, _, path = fmt.partition("/")
    if fmt == "JPEG":
        use_jpeg_backend(path or "simplejpeg", monkeypatch)
    return fmt


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return photo_like(2000, 1500, seed=1)


# --- sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [(1000, 750), (750, 1000), (640, 480), (1024, 1024), (333, 7),
                                  (2048, 1536), (97, 1301)])
@pytest.mark.parametrize("max_side", [1024, 336, 100])
def test_output_fits_max_side_and_keeps_aspect(fmt: str, size: tuple[int, int], max_side: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = format_under_test(fmt, monkeypatch)
    source = quadrants(*size)
    data = encode(source if fmt != "GIF" else source.convert("P"), fmt)
    out = decode_image(data, max_side)
    assert max(out.width, out.height) <= max_side
    assert len(out.rgb) == out.width * out.height * 3
    if max(size) <= max_side:
        assert (out.width, out.height) == size  # never enlarged
    else:
        assert max(out.width, out.height) == max_side
    # Aspect ratio within 1 px: the short side matches the exact scaled value.
    scale = min(1.0, max_side / max(size))
    assert abs(out.width - size[0] * scale) <= 1 and abs(out.height - size[1] * scale) <= 1
    assert (out.source_width, out.source_height) == size
    if min(out.width, out.height) >= 16:  # smaller ones are all chroma-subsampling edge
        assert close(pixel(out, 0.25, 0.25), (255, 0, 0))
        assert close(pixel(out, 0.75, 0.75), (255, 255, 255))


def test_target_size() -> None:
    assert target_size(4032, 3024, 1024) == (1024, 768)
    assert target_size(3024, 4032, 336) == (252, 336)
    assert target_size(100, 50, 1024) == (100, 50)
    assert target_size(10000, 2, 336) == (336, 1)


def test_max_side_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_side"):
        decode_image(encode(quadrants(), "PNG"), 0)


# --- orientation ------------------------------------------------------------------------

# The stored pixels for each EXIF orientation: the inverse of what a viewer applies.
_STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_270}


def oriented(fmt: str, orientation: int, size: tuple[int, int] = (60, 40)) -> bytes:
    upright = quadrants(*size)
    method = _STORED[orientation]
    stored = upright if method is None else upright.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = orientation
    params = {"quality": 95} if fmt == "JPEG" else {}
    data = encode(stored, fmt, exif=exif, **params)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert reference.size == upright.size  # the fixture itself is right
    return data


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("max_side", [1024, 30])
def test_jpeg_exif_orientation_is_applied(orientation: int, max_side: int,
                                          jpeg_backend: str) -> None:
    out = decode_image(oriented("JPEG", orientation, (600, 400)), max_side)
    assert out.width > out.height  # upright is landscape
    assert max(out.width, out.height) == min(600, max_side)
    for (fx, fy), colour in {(0.25, 0.25): (255, 0, 0), (0.75, 0.25): (0, 255, 0),
                             (0.25, 0.75): (0, 0, 255), (0.75, 0.75): (255, 255, 255)}.items():
        assert close(pixel(out, fx, fy), colour), (orientation, fx, fy, pixel(out, fx, fy))


@pytest.mark.parametrize("fmt", ["PNG", pytest.param("WEBP", marks=needs_webp)])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_in_other_formats(fmt: str, orientation: int) -> None:
    out = decode_image(oriented(fmt, orientation), 1024)
    assert (out.width, out.height) == (60, 40)
    assert close(pixel(out, 0.25, 0.25), (255, 0, 0)) and close(pixel(out, 0.75, 0.25), (0, 255, 0))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_oriented_source_size_is_the_upright_size(orientation: int) -> None:
    # Uploads size a chat's `detail` from it (server/api/image_detail.py): downsized, the
    # stored pixels no longer say which way round the file was.
    out = decode_image(oriented("JPEG", orientation, (600, 400)), 90)
    assert (out.width, out.height) == (90, 60)
    assert out.oriented_source_size == (600, 400)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_is_ignored() -> None:
    data = encode(quadrants(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f garbage")
    out = decode_image(data, 1024)
    assert (out.width, out.height) == (60, 40)


# --- modes, alpha, frames ---------------------------------------------------------------

def half_transparent_rgba() -> Image.Image:
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # left half fully transparent
    image.paste((0, 0, 0, 128), (20, 0, 40, 20))  # right half: black at 50 %
    return image


@pytest.mark.parametrize("fmt", ["PNG", pytest.param("WEBP", marks=needs_webp)])
def test_alpha_is_flattened_onto_white(fmt: str) -> None:
    params = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(half_transparent_rgba(), fmt, **params), 1024)
    assert pixel(out, 0.25, 0.5) == (255, 255, 255)
    assert close(pixel(out, 0.75, 0.5), (127, 127, 127), tol=3)


@pytest.mark.parametrize(("image", "fmt", "expected"), [
    (Image.new("L", (20, 20), 100), "PNG", (100, 100, 100)),
    (Image.new("L", (20, 20), 100), "JPEG", (100, 100, 100)),
    (Image.new("LA", (20, 20), (0, 0)), "PNG", (255, 255, 255)),
    (Image.new("1", (20, 20), 1), "PNG", (255, 255, 255)),
    (Image.new("1", (20, 20), 1), "BMP", (255, 255, 255)),
    (Image.new("RGB", (20, 20), (10, 200, 30)).convert("P", palette=ADAPTIVE), "PNG",
     (10, 200, 30)),
    (Image.new("RGB", (20, 20), (10, 200, 30)).convert("P", palette=ADAPTIVE), "BMP",
     (10, 200, 30)),
    (Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    (Image.new("I;16", (20, 20), 40000), "PNG", (156, 156, 156)),
    (Image.new("RGB", (20, 20), (10, 200, 30)), "BMP", (10, 200, 30)),
], ids=["L-png", "L-jpeg", "LA-png", "1-png", "1-bmp", "P-png", "P-bmp", "CMYK-jpeg",
        "I16-png", "RGB-bmp"])
def test_modes_become_rgb(image: Image.Image, fmt: str, expected: tuple[int, int, int],
                          jpeg_backend: str) -> None:
    out = decode_image(encode(image, fmt), 1024)
    assert (out.width, out.height) == (20, 20)
    assert close(pixel(out, 0.5, 0.5), expected, tol=4), pixel(out, 0.5, 0.5)


def test_palette_transparency_is_flattened() -> None:
    image = Image.new("P", (20, 20), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.paste(1, (10, 0, 20, 20))
    for fmt in ("PNG", "GIF"):
        out = decode_image(encode(image, fmt, transparency=0), 1024)
        assert pixel(out, 0.25, 0.5) == (255, 255, 255), fmt
        assert close(pixel(out, 0.75, 0.5), (200, 10, 10), tol=2), fmt


def test_rgb_colour_key_transparency_is_flattened() -> None:
    image = Image.new("RGB", (20, 20), (1, 2, 3))
    out = decode_image(encode(image, "PNG", transparency=(1, 2, 3)), 1024)
    assert pixel(out, 0.5, 0.5) == (255, 255, 255)


FRAMES = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", pytest.param("WEBP", marks=needs_webp)])
def test_animations_take_the_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (30, 20), colour) for colour in FRAMES]
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data, 1024)
    assert close(pixel(out, 0.5, 0.5), FRAMES[0], tol=6)


def test_mpo_decodes_the_primary_picture(jpeg_backend: str) -> None:
    frames = [Image.new("RGB", (64, 48), colour) for colour in FRAMES]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = decode_image(data, 32)
    assert out.source_format == "MPO" and (out.width, out.height) == (32, 24)
    assert close(pixel(out, 0.5, 0.5), FRAMES[0], tol=6)


def test_jpeg_with_stray_bytes_falls_back_to_pillow() -> None:
    data = encode(photo_like(64, 48), "JPEG")
    stray = data[:-2] + b"\x00\x01\x02" + data[-2:]  # libjpeg warns, strict simplejpeg refuses
    out = decode_image(stray, 1024)
    assert (out.width, out.height) == (64, 48)


# --- quality vs the naive path ----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "JPEG/pillow", "PNG"])
@pytest.mark.parametrize("max_side", [1024, 336])
def test_psnr_vs_naive_pillow(photo: Image.Image, fmt: str, max_side: int,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = format_under_test(fmt, monkeypatch)
    data = encode(photo, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    reference = naive(data, max_side)
    out = decode_image(data, max_side)
    assert (out.width, out.height) == reference.size
    assert psnr(as_image(out), reference) >= 35.0


def test_both_jpeg_paths_agree(photo: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend.simplejpeg is None:
        skip_unless_ci("simplejpeg is not installed")
    data = encode(photo, "JPEG", quality=90)
    fast = decode_image(data, 700)
    monkeypatch.setattr(backend, "simplejpeg", None)
    slow = decode_image(data, 700)
    assert (fast.width, fast.height) == (slow.width, slow.height)
    assert psnr(as_image(fast), as_image(slow)) >= 35.0


# --- hash, sources ----------------------------------------------------------------------

def test_content_hash_is_blake2b_of_the_raw_bytes() -> None:
    data = encode(quadrants(), "PNG")
    expected = hashlib.blake2b(data, digest_size=16).hexdigest()
    assert decode_image(data, 1024).content_hash == expected
    for url in (data_url(data), base64.b64encode(data).decode()):
        assert decode_image_reference(url, 1024).content_hash == expected
    assert decode_image(data, 10).content_hash == expected  # the size does not enter it


def test_base64_wrapped_at_76_columns_is_accepted() -> None:
    data = encode(photo_like(120, 90), "JPEG")
    wrapped = base64.encodebytes(data).decode()  # 76 columns, newline-terminated
    assert "\n" in wrapped
    assert image_bytes_from_url("data:image/jpeg;base64," + wrapped) == data
    assert image_bytes_from_url(wrapped.replace("\n", "\r\n")) == data


def test_data_url_mime_need_not_match_the_bytes() -> None:
    data = encode(quadrants(), "JPEG")
    out = decode_image_reference(data_url(data, "image/png"), 1024)
    assert out.source_format == "JPEG"


# --- bad input: nothing but ImageError escapes -------------------------------------------

_GOOD_JPEG = encode(photo_like(64, 48), "JPEG")
_GOOD_PNG = encode(photo_like(64, 48), "PNG")

BAD_BYTES = {
    "empty": b"",
    "one-byte": b"\xff",
    "random": np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "text": b"definitely not an image",
    "jpeg-truncated": _GOOD_JPEG[: len(_GOOD_JPEG) // 2],
    "jpeg-header-only": _GOOD_JPEG[:200],
    "jpeg-soi-only": b"\xff\xd8\xff",
    "png-truncated": _GOOD_PNG[: len(_GOOD_PNG) // 2],
    "png-signature-only": b"\x89PNG\r\n\x1a\n",
    "png-1x1": encode(Image.new("RGB", (1, 1)), "PNG"),
    "gif-1x1": encode(Image.new("P", (1, 1)), "GIF"),
    "png-30000x30000-header": png_with_header(30000, 30000),
    "png-10000x10000-header": png_with_header(10000, 10000),
    "png-70000x1-header": png_with_header(70000, 1),
    "jpeg-65000x65000-header": jpeg_with_size(65000, 65000),
    "gif-65535x65535-header": gif_with_screen(65535, 65535),
    "bmp-header-only": b"BM" + b"\x00" * 60,
    "tiff": encode(quadrants(), "TIFF"),
    "ico": encode(quadrants(), "ICO"),
    "pdf-ish": b"%PDF-1.4\n" + b"0" * 100,
    "svg": b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
}
TOO_LARGE = {"png-30000x30000-header", "png-10000x10000-header", "jpeg-65000x65000-header",
             "gif-65535x65535-header"}


@pytest.mark.parametrize("name", sorted(BAD_BYTES))
def test_bad_bytes_raise_image_error(name: str, jpeg_backend: str) -> None:
    with pytest.raises(ImageError) as err:
        decode_image(BAD_BYTES[name], 1024)
    assert isinstance(err.value, ImageTooLargeError) == (name in TOO_LARGE)
    assert str(err.value) and "Traceback" not in str(err.value)


BAD_URLS = {
    "empty": "",
    "whitespace": "   ",
    "http": "http://127.0.0.1:1/cat.jpg",
    "https": "https://example.com/cat.jpg",
    "file": "file:///etc/passwd",
    "ftp": "ftp://example.com/cat.jpg",
    "invalid-base64": "data:image/png;base64,!!!not-base64!!!",
    "non-ascii-base64": "data:image/png;base64,ÿÿÿÿ",
    "base64-of-text": data_url(b"definitely not an image"),
    "raw-base64-of-text": base64.b64encode(b"hello world, not an image").decode(),
    "wrong-mime": "data:text/plain;base64,aGVsbG8=",
    "no-mime": "data:;base64,aGVsbG8=",
    "not-base64-data-url": "data:image/png,rawbytes",
    "empty-payload": "data:image/png;base64,",
    "truncated-jpeg": data_url(_GOOD_JPEG[:300], "image/jpeg"),
    "bomb-png": data_url(png_with_header(30000, 30000)),
}


@pytest.mark.parametrize("name", sorted(BAD_URLS))
def test_bad_urls_raise_image_error(name: str) -> None:
    with pytest.raises(ImageError) as err:
        decode_image_reference(BAD_URLS[name], 1024)
    message = str(err.value)
    assert message and "/etc/passwd" not in message and "Traceback" not in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_images_decode_or_raise_image_error(fmt: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncations and byte flips of a valid file: any outcome but a foreign exception."""
    fmt = format_under_test(fmt, monkeypatch)
    source = photo_like(48, 32, seed=3)
    data = encode(source.convert("P") if fmt == "GIF" else source, fmt)
    rng = np.random.default_rng(sum(map(ord, fmt)))
    mutants = [data[:n] for n in rng.integers(1, len(data), 12)]
    for _ in range(40):
        mutant = bytearray(data)
        for pos in rng.integers(0, len(data), int(rng.integers(1, 4))):
            mutant[pos] = int(rng.integers(0, 256))
        mutants.append(bytes(mutant))
    for mutant in mutants:
        try:
            out = decode_image(mutant, 64)
        except ImageError:
            continue
        assert len(out.rgb) == out.width * out.height * 3 and max(out.width, out.height) <= 64


# --- limits -----------------------------------------------------------------------------

def test_max_bytes() -> None:
    data = encode(quadrants(), "PNG")
    decode_image(data, 1024, limits=ImageLimits(max_bytes=len(data)))
    with pytest.raises(ImageTooLargeError, match=f"{len(data):,} bytes"):
        decode_image(data, 1024, limits=ImageLimits(max_bytes=len(data) - 1))


def test_max_bytes_is_checked_before_base64_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded an oversized payload")
    monkeypatch.setattr("server.images.sources.pybase64.b64decode", forbidden)
    url = "data:image/png;base64," + "A" * 4_000_000
    with pytest.raises(ImageTooLargeError):
        image_bytes_from_url(url, limits=ImageLimits(max_bytes=1_000_000))


def test_max_bytes_exact_after_base64() -> None:
    data = encode(quadrants(), "PNG")
    url = data_url(data)
    assert image_bytes_from_url(url, limits=ImageLimits(max_bytes=len(data))) == data
    with pytest.raises(ImageTooLargeError):
        image_bytes_from_url(url, limits=ImageLimits(max_bytes=len(data) - 1))


def test_max_pixels_from_the_header() -> None:
    limits = ImageLimits(max_pixels=60 * 40)
    decode_image(encode(quadrants(60, 40), "PNG"), 1024, limits=limits)
    with pytest.raises(ImageTooLargeError, match="61x40"):
        decode_image(encode(quadrants(61, 40), "PNG"), 1024, limits=limits)


def test_pillow_guard_never_rejects_what_limits_allow() -> None:
    decode_image(encode(quadrants(), "PNG"), 1024, limits=ImageLimits(max_pixels=200_000_000))
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS >= 200_000_000


def test_min_side() -> None:
    decode_image(encode(quadrants(2, 2), "PNG"), 1024)
    with pytest.raises(ImageError, match="at least 8 pixels") as err:
        decode_image(encode(quadrants(100, 7), "PNG"), 1024, limits=ImageLimits(min_side=8))
    assert not isinstance(err.value, ImageTooLargeError)


def test_allowed_formats() -> None:
    limits = ImageLimits(allowed_formats=frozenset({"jpeg", "webp"}))
    assert limits.allowed_formats == {"JPEG", "WEBP"}
    decode_image(encode(quadrants(), "JPEG"), 1024, limits=limits)
    with pytest.raises(ImageError, match="PNG images are not accepted here; send JPEG or WebP"):
        decode_image(encode(quadrants(), "PNG"), 1024, limits=limits)
    with pytest.raises(ImageError, match=r"not a supported image \(JPEG or WebP\)"):
        decode_image(b"plain text", 1024, limits=limits)


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError, match="TIFF"):
        ImageLimits(allowed_formats=frozenset({"JPEG", "TIFF"}))
    with pytest.raises(ValueError):
        ImageLimits(allowed_formats=frozenset())
    with pytest.raises(ValueError):
        ImageLimits(max_bytes=0)
    assert DEFAULT_LIMITS.describe_formats() == "JPEG, PNG, WebP, GIF or BMP"


# --- backend report, boundaries ---------------------------------------------------------

def test_backend_info() -> None:
    info = image_backend_info()
    import PIL
    assert info["pillow_version"] == PIL.__version__
    assert info["pillow_simd"] == PIL.__version__.rsplit(".", 1)[-1].startswith("post")
    assert info["simplejpeg"] == (backend.simplejpeg is not None)
    assert info["jpeg_path"] == ("simplejpeg-scaled" if info["simplejpeg"] else "pillow-draft")


def test_images_import_without_engine_or_http() -> None:
    code = ("import sys, server.images; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'fastapi', "
            "'starlette') or m.startswith(('server.engine', 'server.api'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
