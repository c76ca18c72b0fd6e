"""Decode untrusted image bytes safely (DESIGN principle 8, "Limits and bad input").

Every check that can be made from the header is made before any pixel is decoded, in
this order: byte count, format (from magic bytes, never a file name), declared size
(read by this module from the PNG/GIF/WebP/JPEG header before Pillow parses it), then
Pillow's header parse, pixel budget, color mode and frame count. Only then are pixels
decoded, converted to RGB uint8 and turned upright by the EXIF orientation.

Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) is a process-wide
global and warns rather than fails below twice its value. We do not touch it or the
warning filters: plugins are opened directly (``Image.open`` is bypassed) and our own
per-call ``max_pixels`` check runs first. ``max_pixels`` may not exceed Pillow's global,
so the checks Pillow still makes inside its plugins only fire on sizes we reject anyway;
if warnings are errors in the process, the raised ``DecompressionBombWarning`` is
mapped to ``decompression_bomb``. See docs/input-limits.md for every decision.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray
from PIL import (
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from imgpipe.errors import ConfigError, ImageRejectedError

if TYPE_CHECKING:
    from imgpipe.settings import Settings

__all__ = [
    "SUPPORTED_FORMATS",
    "DecodeLimits",
    "DecodedImage",
    "ImageHeader",
    "RejectCode",
    "decode_image",
    "probe_image",
]

SUPPORTED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "TIFF")
_FORMAT_ALIASES: Final = {"JPG": "JPEG", "TIF": "TIFF"}
_ALLOW_HINT: Final = (
    "the operator can allow it with IMGPIPE_ALLOWED_FORMATS (a JSON list, e.g. "
    '["JPEG","PNG","WEBP","GIF","TIFF"])'
)


class RejectCode(StrEnum):
    """``ImageRejectedError.code`` values produced by this module."""

    EMPTY = "empty"
    TOO_MANY_BYTES = "too_many_bytes"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TOO_MANY_PIXELS = "too_many_pixels"
    DECOMPRESSION_BOMB = "decompression_bomb"
    CORRUPT = "corrupt"
    ANIMATED = "animated"
    BAD_DIMENSIONS = "bad_dimensions"


@dataclass(frozen=True)
class DecodeLimits:
    """Per-call limits; ``allowed_formats`` is normalised to upper-case Pillow names."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 50_000_000
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ConfigError("IMGPIPE_MAX_BYTES and IMGPIPE_MAX_PIXELS must be positive.")
        pillow_cap = Image.MAX_IMAGE_PIXELS
        if pillow_cap is not None and self.max_pixels > pillow_cap:
            raise ConfigError(
                f"IMGPIPE_MAX_PIXELS={self.max_pixels} is above Pillow's decompression-bomb "
                f"limit PIL.Image.MAX_IMAGE_PIXELS={pillow_cap}, whose checks inside Pillow "
                "would then fire on images imgpipe accepts. Lower IMGPIPE_MAX_PIXELS, or "
                "raise PIL.Image.MAX_IMAGE_PIXELS in the worker process first."
            )
        names = (f.strip().upper() for f in self.allowed_formats)
        formats = tuple(dict.fromkeys(_FORMAT_ALIASES.get(n, n) for n in names))
        unknown = [f for f in formats if f not in SUPPORTED_FORMATS]
        if not formats or unknown:
            raise ConfigError(
                f"IMGPIPE_ALLOWED_FORMATS={list(self.allowed_formats)!r} must be a non-empty "
                f"JSON list drawn from {list(SUPPORTED_FORMATS)}; unknown: {unknown}."
            )
        if "WEBP" in formats and not WebPImagePlugin.SUPPORTED:
            raise ConfigError("WEBP is allowed but this Pillow build has no WebP support.")
        object.__setattr__(self, "allowed_formats", formats)

    @classmethod
    def from_settings(cls, settings: Settings) -> DecodeLimits:
        return cls(
            max_bytes=settings.max_bytes,
            max_pixels=settings.max_pixels,
            allowed_formats=tuple(settings.allowed_formats),
        )


@dataclass(frozen=True)
class ImageHeader:
    format: str  # Pillow format name of the decoded data, e.g. "JPEG"
    width: int  # after EXIF orientation is applied
    height: int
    mode: str  # source mode, e.g. "RGB", "CMYK", "I;16", "P", "RGBA"
    orientation: int  # EXIF orientation tag, 1 if none or unusable


@dataclass(frozen=True)
class DecodedImage:
    pixels: NDArray[np.uint8]  # HxWx3 RGB, C-contiguous, upright, read-only (copy to edit)
    header: ImageHeader
    conversions: tuple[str, ...]  # what was done, in a fixed vocabulary (docs/input-limits.md)


# Everything Pillow (and zlib/struct under it) raises on hostile data. Deliberately not
# ``Exception``: control-flow exceptions such as Celery's SoftTimeLimitExceeded must pass,
# and MemoryError is re-raised (the limits fit in memory by construction, so running out
# is a worker problem, not a property of the image).
_DECODER_FAILURES: Final = (
    OSError,  # includes UnidentifiedImageError, "image file is truncated"
    SyntaxError,  # Pillow's "not a PNG file", "broken PNG file"
    ValueError,
    EOFError,
    LookupError,
    TypeError,
    ArithmeticError,
    AssertionError,
    AttributeError,
    RuntimeError,
    BufferError,
    SystemError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Warning,  # only raised when the process turns warnings into errors
)

_OPENERS: Final[dict[str, type[ImageFile.ImageFile]]] = {
    # JpegImageFile rather than Pillow's jpeg_factory: a multi-picture JPEG (MPO) is
    # decoded as its primary image, the one every JPEG viewer shows.
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}
_MODE_STEPS: Final[dict[str, tuple[str | None, bool]]] = {
    # source mode -> (conversion name, has alpha)
    "RGB": (None, False),
    "RGBA": (None, True),
    "RGBa": (None, True),
    "RGBX": ("rgbx->rgb", False),
    "1": ("1bit->rgb", False),
    "L": ("gray->rgb", False),
    "LA": ("gray->rgb", True),
    "P": ("palette->rgb", False),
    "PA": ("palette->rgb", True),
    "CMYK": ("cmyk->rgb", False),
    "YCbCr": ("ycbcr->rgb", False),
}
_SIXTEEN_BIT_MODES: Final = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_SUPPORTED_MODES: Final = frozenset(_MODE_STEPS) | _SIXTEEN_BIT_MODES
_ORIENTATION: Final = ExifTags.Base.Orientation
_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WEBP_CHUNKS: Final = (b"VP8 ", b"VP8L", b"VP8X")
_JPEG_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_PROGRESSIVE_SOF: Final = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Pillow walks JPEG markers and PNG chunks in Python, byte by byte for JPEG fill bytes:
# 50 MB of them is tens of seconds of CPU. Real files need a few dozen steps.
_MAX_JPEG_HEADER_STEPS: Final = 4096  # markers, fill and stray bytes before the first scan
_MAX_JPEG_SCANS: Final = 500  # progressive JPEGs have ~10; each scan costs a pass
_MAX_PNG_CHUNKS: Final = 100_000


def probe_image(data: bytes, limits: DecodeLimits) -> ImageHeader:
    """Read and check the header only: no pixel data is decoded."""
    im, header, _ = _open_checked(data, limits)
    im.close()
    return header


def decode_image(data: bytes, limits: DecodeLimits) -> DecodedImage:
    """Decode to upright HxWx3 RGB uint8 under the same checks as :func:`probe_image`."""
    im, header, conversions = _open_checked(data, limits)
    with im, _mapped_errors(header.format):
        pillow_orients = isinstance(im, TiffImagePlugin.TiffImageFile) and (
            _ORIENTATION in im.tag_v2
        )
        sixteen_bit = _has_16bit_samples(im)
        im.load()
        rgb = _to_rgb(im, sixteen_bit, conversions)
        if isinstance(im, TiffImagePlugin.TiffImageFile) and _ORIENTATION in im.tag_v2:
            pillow_orients = False  # this Pillow did not apply it during load
        method = _TRANSPOSE.get(header.orientation)
        if method is not None and not pillow_orients:
            rgb = rgb.transpose(method)
        # A view on the bytes Pillow hands out: no second copy (measurably slower on
        # 1080p), and read-only, so a cached decode can be shared between stages.
        pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
        pixels.flags.writeable = False
    height, width = pixels.shape[:2]
    final = ImageHeader(header.format, width, height, header.mode, header.orientation)
    return DecodedImage(pixels=pixels, header=final, conversions=tuple(conversions))


def _reject(code: RejectCode, message: str) -> ImageRejectedError:
    return ImageRejectedError(code.value, message)


@contextmanager
def _mapped_errors(fmt: str, declared: tuple[int, int] | None = None) -> Iterator[None]:
    """Turn whatever Pillow raises on bad data into an ImageRejectedError."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _reject(
            RejectCode.DECOMPRESSION_BOMB,
            f"The {fmt} data declares far more pixels than can be decoded safely ({exc}). "
            "Re-encode the image normally (e.g. re-save it as PNG or JPEG) and submit again.",
        ) from exc
    except _DECODER_FAILURES as exc:
        detail = str(exc)[:200] or type(exc).__name__
        if declared is not None and 0 in declared:
            raise _bad_dimensions(fmt, declared) from exc
        if isinstance(exc, ValueError) and ("too large" in detail or "Too much" in detail):
            raise _reject(
                RejectCode.DECOMPRESSION_BOMB,
                f"The {fmt} metadata decompresses to more than Pillow allows ({detail}). "
                "Strip the metadata (e.g. re-save the image) and submit again.",
            ) from exc
        raise _reject(
            RejectCode.CORRUPT,
            f"The {fmt} data is damaged or truncated ({detail}). Check that the upload "
            "was complete, or re-export the image from its source, and submit again.",
        ) from exc


def _bad_dimensions(fmt: str, size: tuple[int, int]) -> ImageRejectedError:
    return _reject(
        RejectCode.BAD_DIMENSIONS,
        f"The {fmt} header declares a {size[0]}x{size[1]} image; an image needs a width "
        "and height of at least 1 pixel. Re-export the image and submit again.",
    )


def _check_pixels(fmt: str, size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels:
        raise _reject(
            RejectCode.TOO_MANY_PIXELS,
            f"The {fmt} image is {width}x{height} = {width * height:,} pixels, over the "
            f"limit of {limits.max_pixels:,} pixels. Downscale it and submit again "
            "(the operator sets the limit with IMGPIPE_MAX_PIXELS).",
        )


def _open_checked(
    data: bytes, limits: DecodeLimits
) -> tuple[ImageFile.ImageFile, ImageHeader, list[str]]:
    """Every header check; returns the unloaded image, its header, and conversions so far."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ConfigError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so Pillow would "
            "accept truncated files; imgpipe refuses to decode untrusted images like that. "
            "Find the code that sets it and remove it."
        )
    if len(data) == 0:
        raise _reject(RejectCode.EMPTY, "The upload is empty (0 bytes). Submit the image file.")
    if len(data) > limits.max_bytes:
        raise _reject(
            RejectCode.TOO_MANY_BYTES,
            f"The upload is {len(data):,} bytes, over the limit of {limits.max_bytes:,} bytes. "
            "Re-encode or downscale the image and submit again "
            "(the operator sets the limit with IMGPIPE_MAX_BYTES).",
        )
    fmt = _identify(data, limits)
    declared = _declared_size(fmt, data)  # may reject a header built to be slow to parse
    png_exif = _png_exif_chunk(data) if fmt == "PNG" else None
    if declared is not None:
        if 0 in declared and fmt != "GIF":  # a GIF's frames may still give it a size
            raise _bad_dimensions(fmt, declared)
        _check_pixels(fmt, declared, limits)
    elif fmt == "WEBP":  # Pillow's WebP decoder allocates the canvas while opening
        raise _reject(
            RejectCode.CORRUPT,
            "The WebP header is damaged: its canvas size cannot be read. "
            "Re-export the image and submit again.",
        )
    with _mapped_errors(fmt, declared):
        im = _OPENERS[fmt](io.BytesIO(data))
        stored = _stored_size(im)
        if 0 in stored:
            raise _bad_dimensions(fmt, stored)
        _check_pixels(fmt, stored, limits)
        _check_tiles(im, fmt, limits)
        if im.mode not in _SUPPORTED_MODES:
            raise _reject(
                RejectCode.UNSUPPORTED_FORMAT,
                f"The {fmt} image uses color mode {im.mode!r}, which imgpipe does not "
                "convert. Re-save it as 8- or 16-bit grayscale, RGB, RGBA or CMYK.",
            )
        if getattr(im, "is_animated", False):
            raise _reject(
                RejectCode.ANIMATED,
                f"The {fmt} image has {getattr(im, 'n_frames', 'several')} frames; imgpipe "
                "checks still images only, and a verdict on one frame would not cover the "
                "others. Submit each frame you want checked as its own image.",
            )
        orientation, conversions = _orientation(im, png_exif)
        width, height = stored if orientation < 5 else stored[::-1]
    return im, ImageHeader(fmt, width, height, im.mode, orientation), conversions


def _identify(data: bytes, limits: DecodeLimits) -> str:
    prefix = data[:16]
    fmt = _sniff(prefix)
    if fmt is not None and fmt in limits.allowed_formats:
        return fmt
    allowed = ", ".join(limits.allowed_formats)
    if fmt is None:
        other = _pillow_format_name(prefix)
        if other is None:
            raise _reject(
                RejectCode.UNSUPPORTED_FORMAT,
                f"The upload is not an image in any format imgpipe knows (it starts with "
                f"{prefix[:12]!r}). Submit an image in one of: {allowed}.",
            )
        raise _reject(
            RejectCode.UNSUPPORTED_FORMAT,
            f"The upload looks like a {other} file, which imgpipe does not decode. "
            f"Convert it to one of: {allowed}.",
        )
    raise _reject(
        RejectCode.UNSUPPORTED_FORMAT,
        f"The upload is a {fmt} image; allowed formats here are {allowed}. Convert it to "
        f"one of those, or {_ALLOW_HINT}.",
    )


def _sniff(prefix: bytes) -> str | None:
    """Format from magic bytes, for the formats this module can decode."""
    if prefix.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if prefix.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if prefix[:4] == b"RIFF" and prefix[8:12] == b"WEBP" and prefix[12:16] in _WEBP_CHUNKS:
        return "WEBP"
    if prefix[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if prefix[:4] in TiffImagePlugin.PREFIXES:
        return "TIFF"
    return None


def _pillow_format_name(prefix: bytes) -> str | None:
    """Name another Pillow format by its magic-byte check only (its parser never runs)."""
    Image.init()
    for name, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix) is True:
                return name
        except _DECODER_FAILURES:
            continue
    return None


def _declared_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """Width and height as the header declares them, read without Pillow."""
    if fmt == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if fmt == "GIF" and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return int(width), int(height)
    if fmt == "WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(
                data[27:30], "little"
            ) + 1
        if chunk == b"VP8L" and data[20] == 0x2F:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fmt == "JPEG":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the markers up to the first scan; the SOFn frame size, if one came first."""
    pos, size, progressive = 2, None, False
    for _ in range(_MAX_JPEG_HEADER_STEPS):
        if pos + 4 > len(data):
            return size
        marker = data[pos + 1]
        if data[pos] != 0xFF or marker == 0xFF:  # stray byte, or fill byte before a marker
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        elif marker == 0xD9:  # end of image
            return size
        elif marker == 0xDA:  # first scan
            if progressive and _jpeg_scan_count(data, pos) > _MAX_JPEG_SCANS:
                raise _slow_header("JPEG", f"more than {_MAX_JPEG_SCANS} scans")
            return size
        else:
            if marker in _JPEG_SOF and size is None and pos + 9 <= len(data):
                height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
                size = int(width), int(height)
                progressive = marker in _JPEG_PROGRESSIVE_SOF
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    raise _slow_header("JPEG", f"more than {_MAX_JPEG_HEADER_STEPS} markers or padding bytes")


def _jpeg_scan_count(data: bytes, first_scan: int) -> int:
    """SOS markers from the first scan to the end of this image (0xFF is byte-stuffed in
    scan data). Bytes after the EOI, such as a motion photo's video, are not counted."""
    count = data.count(b"\xff\xda", first_scan)
    if count > _MAX_JPEG_SCANS:  # rare: only then pay for finding the end of the image
        end = data.find(b"\xff\xd9", first_scan)
        count = data.count(b"\xff\xda", first_scan, end if end >= 0 else len(data))
    return count


def _png_exif_chunk(data: bytes) -> bytes | None:
    """Payload of the first eXIf chunk, wherever it is, by walking chunk headers only."""
    pos, found = 8, None
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 8 > len(data):
            return found
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"eXIf" and found is None:
            found = data[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            return found
        pos += 12 + length
    raise _slow_header("PNG", f"more than {_MAX_PNG_CHUNKS} chunks")


def _slow_header(fmt: str, what: str) -> ImageRejectedError:
    return _reject(
        RejectCode.DECOMPRESSION_BOMB,
        f"The {fmt} file has {what}, far more than any real image; it would take very "
        "long to parse. Re-save the image with an ordinary encoder and submit again.",
    )


def _stored_size(im: ImageFile.ImageFile) -> tuple[int, int]:
    """Size before orientation. Pillow's TIFF plugin already swaps ``size`` for it."""
    if isinstance(im, TiffImagePlugin.TiffImageFile):
        width = im.tag_v2.get(TiffImagePlugin.IMAGEWIDTH)
        height = im.tag_v2.get(TiffImagePlugin.IMAGELENGTH)
        if isinstance(width, int) and isinstance(height, int):
            return width, height
    return im.size


def _check_tiles(im: ImageFile.ImageFile, fmt: str, limits: DecodeLimits) -> None:
    """A TIFF may declare tiles far larger than the image; the decoder allocates them."""
    if not isinstance(im, TiffImagePlugin.TiffImageFile):
        return
    tile_width = im.tag_v2.get(TiffImagePlugin.TILEWIDTH)
    tile_height = im.tag_v2.get(TiffImagePlugin.TILELENGTH)
    if (
        isinstance(tile_width, int)
        and isinstance(tile_height, int)
        and tile_width * tile_height > limits.max_pixels
    ):
        raise _reject(
            RejectCode.DECOMPRESSION_BOMB,
            f"The {fmt} image declares {tile_width}x{tile_height} tiles, over the "
            f"limit of {limits.max_pixels:,} pixels. Re-save it with ordinary tiles "
            "or strips and submit again.",
        )


def _orientation(im: ImageFile.ImageFile, png_exif: bytes | None) -> tuple[int, list[str]]:
    """EXIF orientation (1..8) without decoding pixels; unusable EXIF is ignored."""
    try:
        if png_exif is not None and "exif" not in im.info:  # eXIf after the pixel data
            im.info["exif"] = b"Exif\x00\x00" + png_exif
        # The base method: PngImageFile.getexif would decode the pixels to look further.
        value = Image.Image.getexif(im).get(_ORIENTATION, 1)
    except _DECODER_FAILURES:
        return 1, ["exif_orientation_ignored"]
    if not isinstance(value, int) or not 1 <= value <= 8:
        return 1, ["exif_orientation_ignored"]
    return value, [f"exif_orientation:{value}"] if value != 1 else []


def _has_16bit_samples(im: ImageFile.ImageFile) -> bool:
    """Pillow reads 16-bit RGB(A)/LA samples into 8-bit modes (high byte); say so."""
    for tile in im.tile:
        args = tile.args
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _to_rgb(im: Image.Image, sixteen_bit: bool, conversions: list[str]) -> Image.Image:
    """Explicit conversion of every supported mode to RGB, recorded in ``conversions``."""
    if im.mode in _SIXTEEN_BIT_MODES:
        im = _sixteen_to_eight(im)
        sixteen_bit = True
    if sixteen_bit:
        conversions.append("16bit->8bit")
    step, has_alpha = _MODE_STEPS[im.mode]
    if "transparency" in im.info and im.mode in ("1", "L", "P", "RGB"):
        has_alpha = True  # a palette entry or color key marks transparent pixels
    if step is not None:
        conversions.append(step)
    if not has_alpha:
        return im if im.mode == "RGB" else im.convert("RGB")
    conversions.append("alpha->rgb_on_white")
    rgba = im if im.mode == "RGBA" else im.convert("RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, (0, 0), rgba)  # blends by rgba's alpha; no RGBA intermediate copies
    return white


def _sixteen_to_eight(im: Image.Image) -> Image.Image:
    """16-bit gray (and 32-bit ``I``, clipped to 0..65535) to 8-bit: round(v * 255 / 65535)."""
    values = np.asarray(im)
    if im.mode == "I":
        values = np.clip(values, 0, 65535)
    values = values.astype(np.uint16, copy=False)
    # v * 255 / 65535 == v / 257; rounded to nearest it is q + (r >= 129).
    quotient, remainder = np.divmod(values, np.uint16(257))
    gray = (quotient + (remainder >= 129)).astype(np.uint8)
    key = im.info.get("transparency")
    if isinstance(key, int):  # PNG tRNS color key for gray images
        alpha = np.where(values == key, np.uint8(0), np.uint8(255))
        return Image.fromarray(np.ascontiguousarray(np.dstack([gray, alpha])))
    return Image.fromarray(gray)
