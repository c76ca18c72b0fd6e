"""Giving stages pixels cheaply: raw .npy working copies and a per-process LRU cache.

The submit path decodes each upload once and stores the RGB pixels as an .npy blob;
image-producing stages do the same for their output. Loading an .npy is a file read and
a memcpy (no decode), and a worker that sees the same image again (several stages of one
job on the same worker) takes it from memory.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np
from numpy.typing import NDArray

from db.blobs import BlobStore
from imgpipe.errors import PermanentError

__all__ = ["PixelCache", "decode_npy", "encode_npy"]


def encode_npy(pixels: NDArray[np.uint8]) -> bytes:
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


class PixelCache:
    def __init__(self, blobs: BlobStore, max_items: int) -> None:
        self.blobs = blobs
        self.max_items = max_items
        self._items: OrderedDict[str, NDArray[np.uint8]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> NDArray[np.uint8]:
        with self._lock:
            pixels = self._items.get(key)
            if pixels is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return pixels
        pixels = decode_npy(self.blobs.get(key))
        pixels.setflags(write=False)
        with self._lock:
            self.misses += 1
            if self.max_items > 0:
                self._items[key] = pixels
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
        return pixels
