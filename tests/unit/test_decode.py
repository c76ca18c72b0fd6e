"""imgpipe.decode: untrusted bytes in, RGB uint8 out or ImageRejectedError.

Every input is built here with Pillow and NumPy; nothing is read from disk.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import (
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from imgpipe.decode import (
    DecodedImage,
    DecodeLimits,
    ImageHeader,
    decode_image,
    probe_image,
)
from imgpipe.errors import ConfigError, ImageRejectedError
from imgpipe.settings import Settings

DEFAULT = DecodeLimits()
EVERYTHING = DecodeLimits(allowed_formats=("JPEG", "PNG", "WEBP", "GIF", "TIFF"))
ORIENTATION = 0x0112


# ---------------------------------------------------------------- input builders


def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def textured(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: something every codec encodes normally."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 3))
    base = np.dstack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256])
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def raw_png(
    width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, rows: bytes = b""
) -> bytes:
    """A PNG with a hand-written IHDR; ``rows`` are the filtered scanlines."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows or b"\x00\x00\x00\x00"))
        + png_chunk(b"IEND", b"")
    )


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[ORIENTATION] = orientation
    return tags


def rejection(data: bytes, limits: DecodeLimits = DEFAULT) -> ImageRejectedError:
    """decode_image's rejection; probe_image must reject with the same code."""
    with pytest.raises(ImageRejectedError) as decoded:
        decode_image(data, limits)
    with pytest.raises(ImageRejectedError) as probed:
        probe_image(data, limits)
    assert probed.value.code == decoded.value.code
    return decoded.value


def assert_valid(result: DecodedImage) -> None:
    pixels = result.pixels
    assert pixels.dtype == np.uint8
    assert pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.flags.c_contiguous
    assert pixels.shape[:2] == (result.header.height, result.header.width)


class PixelsDecoded(BaseException):
    """Raised by the patched decoders: a BaseException, so nothing maps it away."""


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Image.Image) -> None:
        raise PixelsDecoded(type(self).__name__)

    for cls in (ImageFile.ImageFile, TiffImagePlugin.TiffImageFile, WebPImagePlugin.WebPImageFile):
        monkeypatch.setattr(cls, "load", refuse)


# ---------------------------------------------------------------- valid input


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_default_formats_decode_to_rgb_uint8_of_the_right_shape(fmt: str) -> None:
    data = encode(textured(64, 48), fmt)

    result = decode_image(data, DEFAULT)

    assert_valid(result)
    assert result.pixels.shape == (48, 64, 3)
    assert result.header == ImageHeader(fmt, 64, 48, "RGB", 1)
    assert result.conversions == ()
    assert probe_image(data, DEFAULT) == result.header


def test_lossless_decode_returns_the_exact_pixels_read_only() -> None:
    im = textured()
    result = decode_image(encode(im, "PNG"), DEFAULT)

    np.testing.assert_array_equal(result.pixels, np.asarray(im))
    with pytest.raises(ValueError, match="read-only"):
        result.pixels[0, 0, 0] = 1
    editable = result.pixels.copy()
    editable[0, 0, 0] = 1


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF"])
def test_probe_reads_the_header_without_decoding_pixels(fmt: str) -> None:
    header = probe_image(encode(textured(30, 20), fmt), EVERYTHING)

    assert (header.format, header.width, header.height) == (fmt, 30, 20)


def test_multi_picture_jpeg_decodes_as_its_primary_image() -> None:
    primary, depth_map = Image.new("RGB", (16, 8), "red"), Image.new("RGB", (16, 8), "blue")
    data = encode(primary, "MPO", save_all=True, append_images=[depth_map])

    result = decode_image(data, DEFAULT)

    assert result.header.format == "JPEG"
    assert abs(int(result.pixels[4, 8, 0]) - 255) <= 3 and result.pixels[4, 8, 2] <= 3


# ---------------------------------------------------------------- rejections


def test_empty_bytes_are_rejected_as_empty() -> None:
    assert rejection(b"").code == "empty"


def test_random_garbage_is_rejected_as_not_an_image() -> None:
    garbage = np.random.default_rng(7).bytes(5000)

    error = rejection(garbage)

    assert error.code == "unsupported_format"
    assert "JPEG, PNG, WEBP" in str(error)


def test_an_html_error_page_is_rejected_as_not_an_image() -> None:
    assert rejection(b"<!DOCTYPE html><html><body>502</body></html>").code == ("unsupported_format")


def test_a_format_pillow_knows_but_imgpipe_does_not_is_named_in_the_message() -> None:
    error = rejection(encode(textured(), "BMP"), EVERYTHING)

    assert error.code == "unsupported_format"
    assert "BMP" in str(error)


def test_truncated_jpeg_is_corrupt() -> None:
    data = encode(textured(), "JPEG")

    with pytest.raises(ImageRejectedError) as caught:
        decode_image(data[: len(data) // 2], DEFAULT)

    assert caught.value.code == "corrupt"


def test_truncated_png_is_corrupt() -> None:
    data = encode(textured(), "PNG")

    with pytest.raises(ImageRejectedError) as caught:
        decode_image(data[: len(data) // 2], DEFAULT)

    assert caught.value.code == "corrupt"


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_gif_and_tiff_are_rejected_by_default_and_decoded_when_allowed(fmt: str) -> None:
    data = encode(textured(32, 24), fmt)

    error = rejection(data)
    assert error.code == "unsupported_format"
    assert fmt in str(error) and "IMGPIPE_ALLOWED_FORMATS" in str(error)

    result = decode_image(data, DecodeLimits(allowed_formats=("JPEG", fmt)))
    assert_valid(result)
    assert result.header.format == fmt and result.pixels.shape == (24, 32, 3)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_png_declaring_100000_by_100000_is_rejected_from_the_header() -> None:
    data = raw_png(100_000, 100_000)

    error = rejection(data)

    assert error.code == "too_many_pixels"
    assert "100000x100000" in str(error) and "IMGPIPE_MAX_PIXELS" in str(error)


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF"])
def test_every_format_is_held_to_max_pixels_before_decoding(fmt: str) -> None:
    limits = DecodeLimits(max_pixels=1000, allowed_formats=EVERYTHING.allowed_formats)

    assert rejection(encode(textured(40, 30), fmt), limits).code == "too_many_pixels"


def test_over_max_bytes_is_rejected_before_parsing() -> None:
    limits = DecodeLimits(max_bytes=1000)

    assert rejection(encode(textured(), "PNG"), limits).code == "too_many_bytes"
    assert rejection(b"\x00" * 1001, limits).code == "too_many_bytes"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x00", "unsupported_format"),
        (b"\x89PNG\r\n\x1a\n", "corrupt"),
        (b"\xff\xd8\xff", "corrupt"),
        (b"\xff\xd8\xff\xd9", "corrupt"),
        (b"GIF89a", "corrupt"),
        (b"II*\x00", "corrupt"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "corrupt"),
        (raw_png(0, 10), "bad_dimensions"),
        (raw_png(10, 0), "bad_dimensions"),
    ],
)
def test_weird_or_nearly_empty_headers_are_rejected_with_a_code(data: bytes, code: str) -> None:
    assert rejection(data, EVERYTHING).code == code


def test_jpeg_with_zero_height_is_bad_dimensions() -> None:
    data = bytearray(encode(textured(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = b"\x00\x00"  # height 0: "defined later by DNL"

    assert rejection(bytes(data)).code == "bad_dimensions"


def test_png_text_chunk_that_inflates_past_pillows_limit_is_a_decompression_bomb() -> None:
    bomb = png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * 5_000_000))
    plain = raw_png(1, 1)
    data = plain[:33] + bomb + plain[33:]  # after the IHDR

    assert rejection(data).code == "decompression_bomb"


class PillowParsed(BaseException):
    """Raised by a patched Pillow parser: proves a header was rejected before it ran."""


@pytest.fixture
def no_pillow_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Image.Image) -> None:
        raise PillowParsed(type(self).__name__)

    for cls in (JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile):
        monkeypatch.setattr(cls, "_open", refuse)


@pytest.mark.usefixtures("no_pillow_parsing")
def test_jpeg_padded_with_megabytes_of_fill_bytes_is_rejected_before_pillow_parses_it() -> None:
    data = encode(textured(), "JPEG")
    padded = data[:2] + b"\xff" * 2_000_000 + data[2:]  # Pillow: ~1 s per 2 MB

    assert rejection(padded).code == "decompression_bomb"


@pytest.mark.usefixtures("no_pillow_parsing")
def test_jpeg_with_thousands_of_empty_segments_is_rejected_before_pillow_parses_it() -> None:
    data = encode(textured(), "JPEG")
    segments = data[:2] + b"\xff\xe5\x00\x02" * 10_000 + data[2:]

    assert rejection(segments).code == "decompression_bomb"


@pytest.mark.usefixtures("no_pillow_parsing")
def test_jpeg_with_too_many_scans_is_rejected_before_pillow_parses_it() -> None:
    data = encode(textured(), "JPEG", progressive=True)
    scans = data[:-2] + b"\xff\xda\x00\x02" * 600 + data[-2:]

    assert rejection(scans).code == "decompression_bomb"


@pytest.mark.usefixtures("no_pillow_parsing")
def test_png_with_hundreds_of_thousands_of_chunks_is_rejected_before_pillow_parses_it() -> None:
    plain = raw_png(1, 1)
    data = plain[:-12] + png_chunk(b"teXt", b"") * 200_000 + plain[-12:]

    assert rejection(data).code == "decompression_bomb"


def test_a_progressive_jpeg_and_many_png_chunks_are_fine() -> None:
    progressive = encode(textured(), "JPEG", progressive=True)
    assert_valid(decode_image(progressive, DEFAULT))
    # Bytes after the end of the image (a motion photo's video) are neither scans nor decoded.
    trailer = np.random.default_rng(3).bytes(200_000) + b"\xff\xda" * 600
    assert_valid(decode_image(progressive + trailer, DEFAULT))
    plain = raw_png(1, 1)
    chunky = plain[:-12] + png_chunk(b"teXt", b"k\x00v") * 5_000 + plain[-12:]
    assert_valid(decode_image(chunky, DEFAULT))


def gif_with_frame(width: int, height: int) -> bytes:
    """A 1x1 GIF whose first frame claims a width x height extent."""
    screen = struct.pack("<HHBBB", 1, 1, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + frame + b"\x02\x02\x44\x01\x00;"


def test_pillows_decompression_bomb_error_is_mapped() -> None:
    assert rejection(gif_with_frame(65535, 65535), EVERYTHING).code == "decompression_bomb"


def test_pillows_bomb_warning_never_lets_an_image_through() -> None:
    data = gif_with_frame(10_000, 10_000)  # between MAX_IMAGE_PIXELS and twice it

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert rejection(data, EVERYTHING).code == "decompression_bomb"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert rejection(data, EVERYTHING).code == "too_many_pixels"


def tiled_tiff(size: int, tile: int) -> bytes:
    """A little-endian 8-bit grayscale TIFF of size x size cut into tile x tile tiles.

    Only the first ``min(tile * tile, 4096)`` bytes of each tile are stored: enough for
    the real tiles used here, and a huge declared tile must be rejected before reading.
    """
    per_row = -(-size // tile)
    count = per_row * per_row
    tile_bytes = min(tile * tile, 4096)
    ifd_at = 8
    n_entries = 10
    offsets_at = ifd_at + 2 + 12 * n_entries + 4
    counts_at = offsets_at + 4 * count
    data_at = counts_at + 4 * count
    entries = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 3, 1, size),  # ImageWidth
        (257, 3, 1, size),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: min-is-black
        (277, 3, 1, 1),  # SamplesPerPixel
        (322, 4, 1, tile),  # TileWidth
        (323, 4, 1, tile),  # TileLength
        (324, 4, count, data_at if count == 1 else offsets_at),  # TileOffsets
        (325, 4, count, tile_bytes if count == 1 else counts_at),  # TileByteCounts
    ]
    out = b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", n_entries)
    for tag, kind, n, value in entries:
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        out += struct.pack("<HHI", tag, kind, n) + packed
    out += struct.pack("<I", 0)  # no next IFD
    out += b"".join(struct.pack("<I", data_at + i * tile_bytes) for i in range(count))
    out += struct.pack("<I", tile_bytes) * count
    return out + bytes(i % 256 for i in range(tile_bytes * count))


def test_tiled_tiff_decodes() -> None:
    result = decode_image(tiled_tiff(32, 16), EVERYTHING)

    assert result.pixels.shape == (32, 32, 3)
    assert result.conversions == ("gray->rgb",)
    np.testing.assert_array_equal(result.pixels[0, :16, 0], np.arange(16))
    np.testing.assert_array_equal(result.pixels[0, 16:, 0], np.arange(16))


def test_tiff_declaring_huge_tiles_is_a_decompression_bomb() -> None:
    assert rejection(tiled_tiff(32, 65520), EVERYTHING).code == "decompression_bomb"


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_are_rejected(fmt: str) -> None:
    first, second = Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black")
    data = encode(first, fmt, save_all=True, append_images=[second])

    error = rejection(data, EVERYTHING)

    assert error.code == "animated"
    assert "2 frames" in str(error)


def test_color_modes_without_a_defined_conversion_are_unsupported() -> None:
    data = encode(Image.new("F", (4, 4), 0.5), "TIFF")

    assert rejection(data, EVERYTHING).code == "unsupported_format"


# ---------------------------------------------------------------- orientation


def marked(width: int = 80, height: int = 40) -> Image.Image:
    """Blue image with a red 20x20 block in the stored top-left corner."""
    im = Image.new("RGB", (width, height), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    return im


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_6_turns_the_image_upright(fmt: str) -> None:
    data = encode(marked(), fmt, exif=exif(6), quality=95)

    result = decode_image(data, EVERYTHING)

    assert result.header == ImageHeader(fmt, 40, 80, "RGB", 6)
    assert probe_image(data, EVERYTHING) == result.header
    assert result.conversions == ("exif_orientation:6",)
    # Rotated 90 degrees clockwise: the stored top-left block is now top-right.
    top_right = result.pixels[2:18, 22:38].reshape(-1, 3).mean(axis=0)
    top_left = result.pixels[2:18, 2:18].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 240 and top_right[2] < 15
    assert top_left[0] < 15 and top_left[2] > 240


def test_png_exif_after_the_pixel_data_is_honoured_by_probe_and_decode() -> None:
    data = encode(marked(), "PNG", exif=exif(6))
    start = data.index(b"eXIf") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    chunk = data[start : start + 12 + length]
    without = data[:start] + data[start + len(chunk) :]
    iend = without.index(b"IEND") - 4
    moved = without[:iend] + chunk + without[iend:]

    header = probe_image(moved, DEFAULT)
    result = decode_image(moved, DEFAULT)

    assert header == result.header == ImageHeader("PNG", 40, 80, "RGB", 6)


def test_out_of_range_orientation_is_ignored_and_recorded() -> None:
    result = decode_image(encode(marked(), "PNG", exif=exif(9)), DEFAULT)

    assert result.header.orientation == 1
    assert result.pixels.shape == (40, 80, 3)
    assert result.conversions == ("exif_orientation_ignored",)


# ---------------------------------------------------------------- conversions


def test_adobe_inverted_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (32, 16), (255, 0, 0, 0))  # pure cyan
    cmyk.paste((0, 0, 0, 255), (16, 0, 32, 16))  # pure black
    data = encode(cmyk, "JPEG", quality=95)
    assert b"Adobe" in data  # Pillow writes inverted CMYK with an APP14 marker

    result = decode_image(data, DEFAULT)

    assert result.header.mode == "CMYK"
    assert result.conversions == ("cmyk->rgb",)
    np.testing.assert_allclose(result.pixels[8, 4], (0, 255, 255), atol=4)
    np.testing.assert_allclose(result.pixels[8, 28], (0, 0, 0), atol=4)


def test_16bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[65535, 32768, 0, 257, 128, 129]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")

    result = decode_image(data, DEFAULT)

    assert result.header.mode == "I;16"
    assert result.conversions == ("16bit->8bit", "gray->rgb")
    np.testing.assert_array_equal(result.pixels[0, :, 0], [255, 128, 0, 1, 0, 1])
    np.testing.assert_array_equal(result.pixels[..., 0], result.pixels[..., 2])


def test_16bit_rgb_png_is_scaled_to_8bit() -> None:
    row = b"\x00" + struct.pack(">6H", 65535, 32768, 0, 0, 65535, 32768)
    data = raw_png(2, 1, bit_depth=16, color_type=2, rows=row)

    result = decode_image(data, DEFAULT)

    assert result.conversions == ("16bit->8bit",)
    np.testing.assert_array_equal(result.pixels[0], [[255, 128, 0], [0, 255, 128]])


def test_32bit_integer_tiff_is_clipped_to_16bit_range_then_scaled() -> None:
    values = np.array([[-5, 65535, 70000, 32768]], dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")

    result = decode_image(data, EVERYTHING)

    assert result.header.mode == "I"
    np.testing.assert_array_equal(result.pixels[0, :, 1], [0, 255, 255, 128])


def test_palette_png_with_transparency_is_composited_on_white() -> None:
    im = Image.new("P", (4, 1), 0)
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    im.putpixel((1, 0), 1)
    im.putpixel((2, 0), 2)
    data = encode(im, "PNG", transparency=bytes([0, 255, 128]))  # per-entry alpha

    result = decode_image(data, DEFAULT)

    assert result.header.mode == "P"
    assert result.conversions == ("palette->rgb", "alpha->rgb_on_white")
    np.testing.assert_allclose(result.pixels[0, 0], (255, 255, 255), atol=1)
    np.testing.assert_allclose(result.pixels[0, 1], (255, 0, 0), atol=1)
    np.testing.assert_allclose(result.pixels[0, 2], (127, 127, 255), atol=1)


def test_palette_png_without_transparency_is_plain_rgb() -> None:
    im = Image.new("P", (2, 1), 1)
    im.putpalette([0, 0, 0, 10, 20, 30])

    result = decode_image(encode(im, "PNG"), DEFAULT)

    assert result.conversions == ("palette->rgb",)
    np.testing.assert_array_equal(result.pixels[0, 0], (10, 20, 30))


def test_rgba_png_is_composited_on_white() -> None:
    rgba = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8)

    result = decode_image(encode(Image.fromarray(rgba), "PNG"), DEFAULT)

    assert result.header.mode == "RGBA"
    assert result.conversions == ("alpha->rgb_on_white",)
    np.testing.assert_allclose(
        result.pixels[0].astype(int), [[255, 255, 255], [255, 0, 0], [127, 127, 255]], atol=1
    )


def test_grayscale_and_gray_alpha_png_become_rgb() -> None:
    gray = np.array([[0, 100, 255]], dtype=np.uint8)
    result = decode_image(encode(Image.fromarray(gray), "PNG"), DEFAULT)
    assert result.conversions == ("gray->rgb",)
    np.testing.assert_array_equal(result.pixels[0], np.repeat(gray[0, :, None], 3, axis=1))

    gray_alpha = np.array([[[100, 0], [100, 255]]], dtype=np.uint8)
    result = decode_image(encode(Image.fromarray(gray_alpha), "PNG"), DEFAULT)
    assert result.header.mode == "LA"
    assert result.conversions == ("gray->rgb", "alpha->rgb_on_white")
    np.testing.assert_array_equal(result.pixels[0], [[255, 255, 255], [100, 100, 100]])


def test_one_bit_png_becomes_black_and_white_rgb() -> None:
    im = Image.new("1", (2, 1), 0)
    im.putpixel((1, 0), 1)

    result = decode_image(encode(im, "PNG"), DEFAULT)

    assert result.conversions == ("1bit->rgb",)
    np.testing.assert_array_equal(result.pixels[0], [[0, 0, 0], [255, 255, 255]])


def test_gray_png_with_a_transparent_color_key_is_composited_on_white() -> None:
    gray = Image.fromarray(np.array([[7, 200]], dtype=np.uint8))

    result = decode_image(encode(gray, "PNG", transparency=7), DEFAULT)

    assert result.conversions == ("gray->rgb", "alpha->rgb_on_white")
    np.testing.assert_array_equal(result.pixels[0], [[255, 255, 255], [200, 200, 200]])


# ---------------------------------------------------------------- robustness


def mutations(data: bytes, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    variants = []
    for _ in range(count):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.15:
            mutated = mutated[: rng.randrange(len(mutated))]
        variants.append(bytes(mutated))
    return variants


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("JPEG", {"exif": exif(6)}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("WEBP", {}),
        ("GIF", {}),
        ("TIFF", {"compression": "tiff_lzw", "exif": exif(3)}),
    ],
)
def test_mutated_bytes_either_decode_or_are_rejected(fmt: str, params: dict[str, Any]) -> None:
    data = encode(textured(40, 30), fmt, **params)
    outcomes: set[str] = set()

    for variant in mutations(data, count=200, seed=20240611):
        for call in (probe_image, decode_image):
            try:
                result = call(variant, EVERYTHING)
            except ImageRejectedError as rejected:
                outcomes.add(rejected.code)
                continue
            if isinstance(result, DecodedImage):
                assert_valid(result)
            outcomes.add("ok")

    assert "ok" in outcomes and len(outcomes) > 1


def test_memory_error_is_not_disguised_as_a_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(self: Image.Image) -> None:
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)

    with pytest.raises(MemoryError):
        decode_image(encode(textured(), "PNG"), DEFAULT)


def test_control_flow_exceptions_such_as_soft_time_limits_pass_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class SoftTimeLimitExceeded(Exception):  # what Celery raises inside a task
        pass

    def interrupted(self: Image.Image) -> None:
        raise SoftTimeLimitExceeded

    monkeypatch.setattr(ImageFile.ImageFile, "load", interrupted)

    with pytest.raises(SoftTimeLimitExceeded):
        decode_image(encode(textured(), "PNG"), DEFAULT)


def test_decoding_refuses_to_run_with_load_truncated_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)

    with pytest.raises(ConfigError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(textured(), "PNG"), DEFAULT)


# ---------------------------------------------------------------- limits and settings


def test_limits_come_from_imgpipe_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGPIPE_MAX_BYTES", "1000000")
    monkeypatch.setenv("IMGPIPE_MAX_PIXELS", "2000000")
    monkeypatch.setenv("IMGPIPE_ALLOWED_FORMATS", '["JPEG", "PNG", "WEBP", "GIF"]')

    limits = DecodeLimits.from_settings(Settings())

    assert limits == DecodeLimits(1_000_000, 2_000_000, ("JPEG", "PNG", "WEBP", "GIF"))


def test_format_names_are_normalised() -> None:
    assert DecodeLimits(allowed_formats=("jpg", "png", "Tif", "JPEG")).allowed_formats == (
        "JPEG",
        "PNG",
        "TIFF",
    )


@pytest.mark.parametrize(
    "params",
    [
        {"allowed_formats": ("JPEG", "BMP")},
        {"allowed_formats": ()},
        {"max_bytes": 0},
        {"max_pixels": -1},
        {"max_pixels": 10**9},  # above Pillow's own MAX_IMAGE_PIXELS
    ],
)
def test_bad_limits_are_config_errors(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        DecodeLimits(**params)
