"""Thumbnails for the report: stored images -> small inlined JPEG / PNG data: URIs.

Stored blobs are decoded with imgpipe.decode under the configured byte and pixel limits
(every supported format allowed: the blob was accepted when it was stored), upright, then
shrunk to at most ``THUMB_MAX_SIDE_PX`` a side, so a page of many jobs stays small.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from imgpipe.decode import SUPPORTED_FORMATS, DecodeLimits, decode_image

__all__ = ["THUMB_JPEG_QUALITY", "THUMB_MAX_SIDE_PX", "heatmap_overlay_uri", "thumbnail_uri"]

THUMB_MAX_SIDE_PX = 360
THUMB_JPEG_QUALITY = 82


def _data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _bounded(im: Image.Image) -> Image.Image:
    im.thumbnail((THUMB_MAX_SIDE_PX, THUMB_MAX_SIDE_PX), Image.Resampling.LANCZOS)
    return im


def thumbnail_uri(data: bytes, limits: DecodeLimits) -> str:
    """A stored image (upload or working copy) as a JPEG data: URI of bounded size."""
    lenient = DecodeLimits(limits.max_bytes, limits.max_pixels, SUPPORTED_FORMATS)
    decoded = decode_image(data, lenient, max_side_px=THUMB_MAX_SIDE_PX)
    im = _bounded(Image.fromarray(np.array(decoded.pixels)))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=THUMB_JPEG_QUALITY, optimize=True)
    return _data_uri(out.getvalue(), "image/jpeg")


def heatmap_overlay_uri(png: bytes, limits: DecodeLimits) -> str:
    """The anomaly stage's grey-scale heat map (128 = the threshold, 255 = twice it) as a
    translucent PNG to lay over the original: red where the score is high, its opacity
    growing with the score, transparent where the image looks like the good ones."""
    lenient = DecodeLimits(limits.max_bytes, limits.max_pixels, SUPPORTED_FORMATS)
    grey = decode_image(png, lenient, max_side_px=THUMB_MAX_SIDE_PX).pixels[:, :, 0]
    level = grey.astype(np.float32) / 255.0
    rgba = np.zeros((*grey.shape, 4), dtype=np.uint8)
    rgba[:, :, 0] = 255
    rgba[:, :, 1] = np.rint(255.0 * np.clip(1.0 - level, 0.0, 1.0) * 0.8).astype(np.uint8)
    rgba[:, :, 3] = np.rint(200.0 * level).astype(np.uint8)
    im = _bounded(Image.fromarray(rgba, "RGBA"))
    out = io.BytesIO()
    im.save(out, "PNG", optimize=True)
    return _data_uri(out.getvalue(), "image/png")
