"""Small numeric helpers shared by the surface renderers and the defect painters.

Images here are float32 H x W x 3 RGB in 0..1 ("material space", before the camera).
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

Image = NDArray[np.float32]
Plane = NDArray[np.float32]

__all__ = ["Image", "Plane", "aniso_noise", "coords", "lerp", "rgb", "smooth_noise", "soft_blob"]


def smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> Plane:
    """Zero-mean, unit-std Gaussian-filtered white noise (``size`` x ``size``)."""
    # large blurs are drawn at a coarser resolution and enlarged (same spectrum, much faster)
    factor = max(1, int(sigma_px / 3))
    small = size // factor + 4
    z = rng.standard_normal((small, small)).astype(np.float32)
    if sigma_px > 0:
        z = np.asarray(
            cv2.GaussianBlur(z, (0, 0), sigma_px / factor, borderType=cv2.BORDER_REFLECT),
            np.float32,
        )
    if factor > 1:
        big = (small * factor, small * factor)
        z = np.asarray(cv2.resize(z, big, interpolation=cv2.INTER_CUBIC), np.float32)
    z = np.ascontiguousarray(z[2 * factor : 2 * factor + size, 2 * factor : 2 * factor + size])
    return np.asarray((z - z.mean()) / (z.std() + 1e-6), np.float32)


def aniso_noise(rng: np.random.Generator, size: int, along_px: float, across_px: float) -> Plane:
    """Streaky noise (unit std): smooth ``along_px`` along x, ``across_px`` along y."""
    z = rng.standard_normal((size, size)).astype(np.float32)
    z = np.asarray(
        cv2.GaussianBlur(
            z, (0, 0), sigmaX=along_px, sigmaY=across_px, borderType=cv2.BORDER_REFLECT
        ),
        np.float32,
    )
    return np.asarray((z - z.mean()) / (z.std() + 1e-6), np.float32)


def coords(size: int, rng: np.random.Generator, span: float = 1000.0) -> tuple[Plane, Plane]:
    """Pixel coordinates (x, y) shifted by a random phase in [0, span)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ox, oy = rng.uniform(0, span, 2)
    return xx + np.float32(ox), yy + np.float32(oy)


def rgb(r: float, g: float, b: float) -> NDArray[np.float32]:
    return np.array([r, g, b], np.float32)


def lerp(a: NDArray[np.float32], b: NDArray[np.float32], t: Plane) -> Image:
    """Per-pixel mix of colours (or images) ``a`` and ``b`` by ``t`` in 0..1."""
    t3 = t[..., None] if t.ndim == 2 else t
    return np.asarray(a + (b - a) * t3, np.float32)


def soft_blob(
    size: tuple[int, int],
    center: tuple[float, float],
    axes: tuple[float, float],
    angle_deg: float,
    rng: np.random.Generator,
    edge_px: float = 1.5,
    rough: float = 0.25,
) -> Plane:
    """A filled ellipse with an irregular (noise-perturbed) soft edge, 0..1."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.deg2rad(angle_deg)
    dx, dy = xx - center[0], yy - center[1]
    u = (dx * np.cos(a) + dy * np.sin(a)) / max(axes[0], 0.5)
    v = (-dx * np.sin(a) + dy * np.cos(a)) / max(axes[1], 0.5)
    r = np.sqrt(u * u + v * v)
    noise = rng.standard_normal((h, w)).astype(np.float32)
    wobble = np.asarray(cv2.GaussianBlur(noise, (0, 0), max(2.0, min(axes) / 2)), np.float32)
    wobble = wobble / (wobble.std() + 1e-6)
    r = r * (1 + rough * 0.5 * wobble)
    scale = max(min(axes), 1.0)
    return np.asarray(np.clip((1 - r) * scale / edge_px + 0.5, 0, 1), np.float32)
