"""Test images: PNG bytes of random pixels (each seed its own image, so its own sha256)."""

from __future__ import annotations

import io
import uuid

import numpy as np
from PIL import Image

__all__ = ["noise_png"]


def noise_png(seed: int | None = None, side_px: int = 48) -> bytes:
    """A ``side_px`` square PNG of random pixels; no seed: one never seen before."""
    rng = np.random.default_rng(seed if seed is not None else uuid.uuid4().int % 2**32)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side_px, side_px, 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()
