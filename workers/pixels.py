"""Giving stages pixels cheaply, without a storage blow-up (DESIGN principle 7).

A *working copy* is the blob a stage's pixels are decoded from. It is compressed:

* for an upload, the uploaded bytes themselves (``images.working_blob_key`` equals
  ``images.blob_key``): no second blob at all;
* for an image-producing stage (enhance), :func:`encode_working_copy`'s JPEG q95, the
  same bytes as the viewable artifact, so the two share one content-addressed blob;
* legacy rows may still point at a raw ``.npy`` blob (written before this module
  changed); those still decode, and ``db.gc.collect_working_copies`` removes them.

Choice measured in docs/pixels.md (``python -m benchmarks.working_copy``). Every working
copy that is not ``.npy`` is decoded by :func:`imgpipe.decode.decode_image` under the
configured limits, so stored untrusted bytes meet the same checks as at submit. A stage
that needs fewer pixels (``StageKind.input_side_px``) gets them decoded at reduced size
(JPEG draft mode: 1/2 to 1/8 scale inside libjpeg). Decoded arrays are kept per worker
process in an LRU cache bounded by bytes, keyed by (blob key, max side).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from db.blobs import BlobStore
from imgpipe.decode import DecodeLimits, decode_image, reduction_factor
from imgpipe.errors import PermanentError

__all__ = [
    "WORKING_COPY_JPEG_QUALITY",
    "WORKING_COPY_MEDIA_TYPE",
    "PixelCache",
    "decode_npy",
    "decode_working_copy",
    "encode_npy",
    "encode_working_copy",
]

WORKING_COPY_MEDIA_TYPE: Final = "image/jpeg"
WORKING_COPY_JPEG_QUALITY: Final = 95
"""Pillow's defaults otherwise (4:2:0), i.e. byte-identical to the enhance stage's
viewable JPEG artifact, so the working copy costs no storage of its own."""
_NPY_MAGIC: Final = b"\x93NUMPY"


def encode_working_copy(pixels: NDArray[np.uint8]) -> tuple[bytes, str]:
    """The stored working copy of an image a stage produced: (bytes, media type)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise PermanentError(
            f"a stage produced an image of shape {pixels.shape} dtype {pixels.dtype}; "
            "image-producing stages must return HxWx3 RGB uint8"
        )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(
        buffer, format="JPEG", quality=WORKING_COPY_JPEG_QUALITY
    )
    return buffer.getvalue(), WORKING_COPY_MEDIA_TYPE


def encode_npy(pixels: NDArray[np.uint8]) -> bytes:
    """Raw .npy bytes. Superseded by :func:`encode_working_copy`; kept for callers not yet
    moved over (their blobs still decode and are collected)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(pixels), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> NDArray[np.uint8]:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise PermanentError(
            f"working copy has shape {array.shape} dtype {array.dtype}, expected HxWx3 uint8; "
            "resubmit the image"
        )
    result: NDArray[np.uint8] = array
    return result


def shrink_to(pixels: NDArray[np.uint8], max_side_px: int | None) -> NDArray[np.uint8]:
    """``pixels`` reduced like :func:`imgpipe.decode.decode_image` reduces (whole factor,
    box filter), for arrays already in memory (legacy .npy, the full-size cache entry)."""
    height, width = pixels.shape[:2]
    factor = reduction_factor((width, height), max_side_px)
    if factor == 1:
        return pixels
    size = (-(-width // factor), -(-height // factor))
    return np.asarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def decode_working_copy(
    data: bytes, max_side_px: int | None = None, limits: DecodeLimits | None = None
) -> NDArray[np.uint8]:
    """HxWx3 RGB uint8, upright, read-only; longer side at most ``max_side_px`` if given.

    Image bytes go through :func:`imgpipe.decode.decode_image` (format allow-list, byte
    and pixel limits, bomb checks): a working copy may be the untrusted upload itself.
    """
    if data.startswith(_NPY_MAGIC):
        pixels = shrink_to(decode_npy(data), max_side_px)
    else:
        pixels = decode_image(data, limits or DecodeLimits(), max_side_px).pixels
    pixels = np.ascontiguousarray(pixels)
    pixels.setflags(write=False)
    return pixels


CacheKey = tuple[str, int | None]


class PixelCache:
    """Decoded working copies of one worker process, LRU, at most ``max_bytes`` of pixels.

    ``get`` is thread-safe; two threads missing on the same key may both decode it (the
    result is the same). An array larger than the whole budget is returned, not kept.
    """

    def __init__(
        self, blobs: BlobStore, max_bytes: int, limits: DecodeLimits | None = None
    ) -> None:
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.limits = limits or DecodeLimits()
        self._items: OrderedDict[CacheKey, NDArray[np.uint8]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def get(self, key: str, max_side_px: int | None = None) -> NDArray[np.uint8]:
        """The pixels of blob ``key``, longer side at most ``max_side_px`` (None: full)."""
        wanted: CacheKey = (key, max_side_px)
        with self._lock:
            pixels = self._lookup(wanted)
            if pixels is not None:
                self.hits += 1
                return pixels
            full = self._lookup((key, None)) if max_side_px is not None else None
        if full is not None:  # shrinking what is in memory beats decoding again
            pixels = shrink_to(full, max_side_px)
            pixels.setflags(write=False)
        else:
            pixels = decode_working_copy(self.blobs.get(key), max_side_px, self.limits)
        with self._lock:
            self.misses += 1
            self._store(wanted, pixels)
        return pixels

    def _lookup(self, key: CacheKey) -> NDArray[np.uint8] | None:
        pixels = self._items.get(key)
        if pixels is not None:
            self._items.move_to_end(key)
        return pixels

    def _store(self, key: CacheKey, pixels: NDArray[np.uint8]) -> None:
        if pixels.nbytes > self.max_bytes or key in self._items:
            return
        self._items[key] = pixels
        self._bytes += pixels.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.nbytes
