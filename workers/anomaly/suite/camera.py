"""Camera nuisance: how the same surface looks different from shot to shot.

Every crop, good or defective, gets its own :class:`Shot`: rotation (and, through the
renderer, a random phase), global gain, a linear light gradient, vignetting, a colour
cast, slight defocus blur and signal-dependent sensor noise, then 8-bit quantisation.
Ranges are those of a fixed industrial camera under drifting light.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from workers.anomaly.suite.canvas import Image, Plane

__all__ = ["Nuisance", "Shot", "canvas_px", "draw_shot", "expose", "rotate_crop"]


@dataclass(frozen=True)
class Nuisance:
    """Ranges of the per-shot nuisance factors."""

    max_rotation_deg: float = 15.0
    gain: float = 0.18
    """Global gain within 1 +/- gain."""
    gradient: float = 0.12
    """Peak-to-peak relative change of a linear light ramp across the crop, at most."""
    vignette: float = 0.15
    """Relative darkening in the corners, at most."""
    cast: float = 0.05
    """Per-channel gain within 1 +/- cast."""
    max_blur_px: float = 0.8
    read_noise: tuple[float, float] = (0.004, 0.012)
    """Std of additive noise (0..1 scale), drawn per shot."""
    shot_noise: float = 0.0004
    """Variance per unit of signal (photon noise)."""


@dataclass(frozen=True)
class Shot:
    angle_deg: float
    gain: float
    gradient: tuple[float, float]
    vignette: float
    vignette_centre: tuple[float, float]
    cast: tuple[float, float, float]
    blur_px: float
    read_noise: float
    noise_seed: int


def draw_shot(rng: np.random.Generator, nuisance: Nuisance) -> Shot:
    g = rng.uniform(-1, 1, 2)
    g = g / (np.abs(g).sum() + 1e-6) * rng.uniform(0, nuisance.gradient)
    return Shot(
        angle_deg=float(rng.uniform(-nuisance.max_rotation_deg, nuisance.max_rotation_deg)),
        gain=float(1 + rng.uniform(-nuisance.gain, nuisance.gain)),
        gradient=(float(g[0]), float(g[1])),
        vignette=float(rng.uniform(0, nuisance.vignette)),
        vignette_centre=(float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.35, 0.65))),
        cast=tuple(float(c) for c in 1 + rng.uniform(-nuisance.cast, nuisance.cast, 3)),  # type: ignore[arg-type]
        blur_px=float(rng.uniform(0, nuisance.max_blur_px)),
        read_noise=float(rng.uniform(*nuisance.read_noise)),
        noise_seed=int(rng.integers(2**31)),
    )


def canvas_px(crop_px: int, max_rotation_deg: float) -> int:
    """Side of a render that still covers a ``crop_px`` crop after any allowed rotation."""
    a = np.deg2rad(min(abs(max_rotation_deg), 45.0))
    return int(np.ceil(crop_px * (np.cos(a) + np.sin(a)))) + 4


def rotate_crop(image: NDArray[np.float32], angle_deg: float, crop_px: int) -> NDArray[np.float32]:
    """Rotate about the centre and cut the central ``crop_px`` square."""
    n = image.shape[0]
    turn = cv2.getRotationMatrix2D(((n - 1) / 2, (n - 1) / 2), angle_deg, 1.0)
    turned = cv2.warpAffine(
        image, turn, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    top = (n - crop_px) // 2
    return np.ascontiguousarray(turned[top : top + crop_px, top : top + crop_px])


def _illumination(shot: Shot, size: int) -> Plane:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size - 1)
    ramp = 1 + shot.gradient[0] * (xx - 0.5) + shot.gradient[1] * (yy - 0.5)
    r2 = (xx - shot.vignette_centre[0]) ** 2 + (yy - shot.vignette_centre[1]) ** 2
    vignette = 1 - shot.vignette * r2 / 0.5
    return np.asarray(shot.gain * ramp * vignette, np.float32)


def expose(image: Image, shot: Shot, nuisance: Nuisance) -> NDArray[np.uint8]:
    """Material image (crop) -> the 8-bit RGB frame the camera delivers."""
    size = image.shape[0]
    lit = image * _illumination(shot, size)[..., None] * np.array(shot.cast, np.float32)
    if shot.blur_px > 0.05:
        lit = np.asarray(cv2.GaussianBlur(lit, (0, 0), shot.blur_px), np.float32)
    rng = np.random.default_rng(shot.noise_seed)
    sigma = np.sqrt(shot.read_noise**2 + nuisance.shot_noise * np.clip(lit, 0, None))
    noisy = lit + sigma * rng.standard_normal(lit.shape).astype(np.float32)
    return np.asarray(np.clip(np.rint(noisy * 255), 0, 255), np.uint8)
