"""Pixel conversions for :mod:`imgpipe.decode`: EXIF orientation and every mode to RGB.

Each conversion is recorded in the ``conversions`` list in the fixed vocabulary of
docs/input-limits.md.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from PIL import ExifTags, Image, ImageFile

from imgpipe._imageheader import DECODER_FAILURES

__all__ = [
    "ORIENTATION",
    "SUPPORTED_MODES",
    "TRANSPOSE",
    "exif_orientation",
    "has_16bit_samples",
    "to_rgb",
]

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
SUPPORTED_MODES: Final = frozenset(_MODE_STEPS) | _SIXTEEN_BIT_MODES
ORIENTATION: Final = ExifTags.Base.Orientation
TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(im: ImageFile.ImageFile, png_exif: bytes | None) -> tuple[int, list[str]]:
    """EXIF orientation (1..8) without decoding pixels; unusable EXIF is ignored."""
    try:
        if png_exif is not None and "exif" not in im.info:  # eXIf after the pixel data
            im.info["exif"] = b"Exif\x00\x00" + png_exif
        # The base method: PngImageFile.getexif would decode the pixels to look further.
        value = Image.Image.getexif(im).get(ORIENTATION, 1)
    except DECODER_FAILURES:
        return 1, ["exif_orientation_ignored"]
    if not isinstance(value, int) or not 1 <= value <= 8:
        return 1, ["exif_orientation_ignored"]
    return value, [f"exif_orientation:{value}"] if value != 1 else []


def has_16bit_samples(im: ImageFile.ImageFile) -> bool:
    """Pillow reads 16-bit RGB(A)/LA samples into 8-bit modes (high byte); say so."""
    for tile in im.tile:
        args = tile.args
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def to_rgb(im: Image.Image, sixteen_bit: bool, conversions: list[str]) -> Image.Image:
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
