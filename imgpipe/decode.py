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

This module holds the API and the limit checks; the header bytes are read in
``imgpipe._imageheader`` and the pixels converted in ``imgpipe._convert``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import NDArray
from PIL import (
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from imgpipe._convert import (
    ORIENTATION,
    SUPPORTED_MODES,
    TRANSPOSE,
    exif_orientation,
    has_16bit_samples,
    to_rgb,
)
from imgpipe._imageheader import (
    DECODER_FAILURES,
    RejectCode,
    declared_size,
    pillow_format_name,
    png_exif_chunk,
    reject,
    sniff,
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
    "reduction_factor",
]

SUPPORTED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "TIFF")
_FORMAT_ALIASES: Final = {"JPG": "JPEG", "TIF": "TIFF"}
_ALLOW_HINT: Final = (
    "the operator can allow it with IMGPIPE_ALLOWED_FORMATS (a JSON list, e.g. "
    '["JPEG","PNG","WEBP","GIF","TIFF"])'
)


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


_OPENERS: Final[dict[str, type[ImageFile.ImageFile]]] = {
    # JpegImageFile rather than Pillow's jpeg_factory: a multi-picture JPEG (MPO) is
    # decoded as its primary image, the one every JPEG viewer shows.
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}


def probe_image(data: bytes, limits: DecodeLimits) -> ImageHeader:
    """Read and check the header only: no pixel data is decoded."""
    im, header, _ = _open_checked(data, limits)
    im.close()
    return header


CRASH_DRILL_ENV: Final = "TEST_IMGPIPE_CRASH_DECODE_MAGIC"
"""Test-only: when this variable is set (only tests/reliability/test_poison_submit.py
sets it; the stack passes it on, as it does every variable not named IMGPIPE_*),
decoding bytes that start with its value ends the process at once, as a
decoder crash (a segfault in a native codec) would. No image is known that crashes this
Pillow, so the poison-image drill needs this stand-in; unset, it does nothing."""


def _crash_drill(data: bytes) -> None:
    magic = os.environ.get(CRASH_DRILL_ENV)
    if magic and data.startswith(magic.encode()):
        os._exit(70)


def decode_image(data: bytes, limits: DecodeLimits, max_side_px: int | None = None) -> DecodedImage:
    """Decode to upright HxWx3 RGB uint8 under the same checks as :func:`probe_image`.

    ``max_side_px`` (None: full resolution) says the caller needs no more than that many
    pixels on the longer side: the image is reduced by the largest whole factor that
    keeps the longer side at least ``max_side_px`` (so it ends between ``max_side_px``
    and twice that, or as it was if smaller). A JPEG is decoded at 1/2, 1/4 or 1/8 scale
    inside libjpeg (Pillow's draft mode); what remains, and other formats, is a box-filter
    ``Image.reduce``. Not resizing to an exact size is deliberate: at 1080p an exact
    antialiased resize cost more than the draft decode saved (docs/pixels.md), and every
    stage resizes to its network's input anyway. Every check runs on the declared full
    size first, exactly as without it; the returned header gives the returned size.
    """
    if max_side_px is not None and max_side_px < 1:
        raise ValueError(f"max_side_px must be >= 1 or None, got {max_side_px}")
    _crash_drill(data)
    im, header, conversions = _open_checked(data, limits)
    with im, _mapped_errors(header.format):
        factor = reduction_factor(im.size, max_side_px)
        if factor > 1 and isinstance(im, JpegImagePlugin.JpegImageFile):
            width, height = im.size  # draft picks the largest of 1/8, 1/4, 1/2 within
            im.draft(im.mode, (-(-width // factor), -(-height // factor)))
        pillow_orients = isinstance(im, TiffImagePlugin.TiffImageFile) and (
            ORIENTATION in im.tag_v2
        )
        sixteen_bit = has_16bit_samples(im)
        im.load()
        rgb = to_rgb(im, sixteen_bit, conversions)
        if isinstance(im, TiffImagePlugin.TiffImageFile) and ORIENTATION in im.tag_v2:
            pillow_orients = False  # this Pillow did not apply it during load
        method = TRANSPOSE.get(header.orientation)
        if method is not None and not pillow_orients:
            rgb = rgb.transpose(method)
        factor = reduction_factor(rgb.size, max_side_px)
        if factor > 1:
            rgb = rgb.reduce(factor)
        # A view on the bytes Pillow hands out: no second copy (measurably slower on
        # 1080p), and read-only, so a cached decode can be shared between stages.
        pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
        pixels.flags.writeable = False
    height, width = pixels.shape[:2]
    final = ImageHeader(header.format, width, height, header.mode, header.orientation)
    return DecodedImage(pixels=pixels, header=final, conversions=tuple(conversions))


def reduction_factor(size: tuple[int, int], max_side_px: int | None) -> int:
    """Largest whole factor that keeps ``size``'s longer side at least ``max_side_px``
    (1: keep the size). A reduced side is ``ceil(side / factor)``."""
    if max_side_px is None:
        return 1
    return max(1, max(size) // max_side_px)


@contextmanager
def _mapped_errors(fmt: str, declared: tuple[int, int] | None = None) -> Iterator[None]:
    """Turn whatever Pillow raises on bad data into an ImageRejectedError."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise reject(
            RejectCode.DECOMPRESSION_BOMB,
            f"The {fmt} data declares far more pixels than can be decoded safely ({exc}). "
            "Re-encode the image normally (e.g. re-save it as PNG or JPEG) and submit again.",
        ) from exc
    except DECODER_FAILURES as exc:
        detail = str(exc)[:200] or type(exc).__name__
        if declared is not None and 0 in declared:
            raise _bad_dimensions(fmt, declared) from exc
        if isinstance(exc, ValueError) and ("too large" in detail or "Too much" in detail):
            raise reject(
                RejectCode.DECOMPRESSION_BOMB,
                f"The {fmt} metadata decompresses to more than Pillow allows ({detail}). "
                "Strip the metadata (e.g. re-save the image) and submit again.",
            ) from exc
        raise reject(
            RejectCode.CORRUPT,
            f"The {fmt} data is damaged or truncated ({detail}). Check that the upload "
            "was complete, or re-export the image from its source, and submit again.",
        ) from exc


def _bad_dimensions(fmt: str, size: tuple[int, int]) -> ImageRejectedError:
    return reject(
        RejectCode.BAD_DIMENSIONS,
        f"The {fmt} header declares a {size[0]}x{size[1]} image; an image needs a width "
        "and height of at least 1 pixel. Re-export the image and submit again.",
    )


def _check_pixels(fmt: str, size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels:
        raise reject(
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
        raise reject(RejectCode.EMPTY, "The upload is empty (0 bytes). Submit the image file.")
    if len(data) > limits.max_bytes:
        raise reject(
            RejectCode.TOO_MANY_BYTES,
            f"The upload is {len(data):,} bytes, over the limit of {limits.max_bytes:,} bytes. "
            "Re-encode or downscale the image and submit again "
            "(the operator sets the limit with IMGPIPE_MAX_BYTES).",
        )
    fmt = _identify(data, limits)
    declared = declared_size(fmt, data)  # may reject a header built to be slow to parse
    png_exif = png_exif_chunk(data) if fmt == "PNG" else None
    if declared is not None:
        if 0 in declared and fmt != "GIF":  # a GIF's frames may still give it a size
            raise _bad_dimensions(fmt, declared)
        _check_pixels(fmt, declared, limits)
    elif fmt == "WEBP":  # Pillow's WebP decoder allocates the canvas while opening
        raise reject(
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
        if im.mode not in SUPPORTED_MODES:
            raise reject(
                RejectCode.UNSUPPORTED_FORMAT,
                f"The {fmt} image uses color mode {im.mode!r}, which imgpipe does not "
                "convert. Re-save it as 8- or 16-bit grayscale, RGB, RGBA or CMYK.",
            )
        if getattr(im, "is_animated", False):
            raise reject(
                RejectCode.ANIMATED,
                f"The {fmt} image has {getattr(im, 'n_frames', 'several')} frames; imgpipe "
                "checks still images only, and a verdict on one frame would not cover the "
                "others. Submit each frame you want checked as its own image.",
            )
        orientation, conversions = exif_orientation(im, png_exif)
        width, height = stored if orientation < 5 else stored[::-1]
    return im, ImageHeader(fmt, width, height, im.mode, orientation), conversions


def _identify(data: bytes, limits: DecodeLimits) -> str:
    prefix = data[:16]
    fmt = sniff(prefix)
    if fmt is not None and fmt in limits.allowed_formats:
        return fmt
    allowed = ", ".join(limits.allowed_formats)
    if fmt is None:
        other = pillow_format_name(prefix)
        if other is None:
            raise reject(
                RejectCode.UNSUPPORTED_FORMAT,
                f"The upload is not an image in any format imgpipe knows (it starts with "
                f"{prefix[:12]!r}). Submit an image in one of: {allowed}.",
            )
        raise reject(
            RejectCode.UNSUPPORTED_FORMAT,
            f"The upload looks like a {other} file, which imgpipe does not decode. "
            f"Convert it to one of: {allowed}.",
        )
    raise reject(
        RejectCode.UNSUPPORTED_FORMAT,
        f"The upload is a {fmt} image; allowed formats here are {allowed}. Convert it to "
        f"one of those, or {_ALLOW_HINT}.",
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
        raise reject(
            RejectCode.DECOMPRESSION_BOMB,
            f"The {fmt} image declares {tile_width}x{tile_height} tiles, over the "
            f"limit of {limits.max_pixels:,} pixels. Re-save it with ordinary tiles "
            "or strips and submit again.",
        )
