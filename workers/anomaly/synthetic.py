"""Deterministic good/defective crops of a texture, for tests and the anomaly benchmark.

Crops for the memory bank come from the top half of one texture image; held-out good
crops (which calibrate the threshold) and evaluation crops come from the bottom half. So
no held-out or evaluated pixel was seen by the memory bank, as with separate photos
(crops overlapping bank crops would be memorised, scoring too low), and held-out and
evaluation crops are drawn alike, as a new good photo would be. Defects are
drawn with OpenCV/NumPy from a seeded generator and stay in the texture's own colours:

* ``scratch``: a 2-3 px wide (at 128 px) slightly bent line, lighter or darker than the
  texture's mean by 2.5 standard deviations of its intensity;
* ``stain``: a soft-edged ellipse (16..36 px across) where the texture is multiplied by
  0.4..0.6 with a faint warm tint (red kept 10% more than blue): the texture still shows;
* ``hole``: a near-black disc (8..18 px across) with a blurred rim.

Sizes scale with the crop. They are meant to be defects a human inspector would flag at
a glance, not needles in the texture (thinner, fainter marks on grass are invisible).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["DEFECT_KINDS", "TextureSplit", "add_defect", "texture_split"]

DefectKind = Literal["scratch", "stain", "hole"]
DEFECT_KINDS: tuple[DefectKind, ...] = ("scratch", "stain", "hole")
_BANK_ROWS = 0.5


def _to_rgb(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    return np.ascontiguousarray(image[:, :, :3])


def _random_crops(
    image: NDArray[np.uint8], rows: tuple[int, int], size: int, count: int, rng: np.random.Generator
) -> list[NDArray[np.uint8]]:
    top, bottom = rows
    if bottom - top < size or image.shape[1] < size:
        raise ValueError(f"region rows {rows} of a {image.shape} image cannot hold {size} px crops")
    crops = []
    for _ in range(count):
        y = int(rng.integers(top, bottom - size + 1))
        x = int(rng.integers(0, image.shape[1] - size + 1))
        crops.append(image[y : y + size, x : x + size].copy())
    return crops


def add_defect(
    crop: NDArray[np.uint8], kind: DefectKind, rng: np.random.Generator
) -> NDArray[np.uint8]:
    """A copy of ``crop`` (HxWx3 uint8) with one defect of ``kind`` drawn on it."""
    out = crop.astype(np.float32)
    h, w = crop.shape[:2]
    scale = min(h, w) / 128.0
    gray = out.mean(axis=2)
    mean, std = float(gray.mean()), float(gray.std()) + 1.0
    mask: NDArray[np.float32] = np.zeros((h, w), np.float32)
    if kind == "scratch":
        n = 3
        start = rng.uniform([0.15 * w, 0.15 * h], [0.85 * w, 0.85 * h])
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.4, 0.7) * min(h, w)
        steps = np.linspace(-0.5, 0.5, n)[:, None] * length
        pts = start + steps * np.array([np.cos(angle), np.sin(angle)])
        pts += rng.normal(0, 2.0 * scale, pts.shape)
        thickness = max(1, round(rng.uniform(2, 3.4) * scale))
        cv2.polylines(mask, [pts.astype(np.int32)], False, 1.0, thickness, cv2.LINE_AA)
        target = np.full(3, mean + (2.5 if rng.random() < 0.5 else -2.5) * std, np.float32)
        alpha = mask[:, :, None]
        out = out * (1 - alpha) + np.clip(target, 0, 255) * alpha
    elif kind == "stain":
        center = rng.uniform([0.25 * w, 0.25 * h], [0.75 * w, 0.75 * h]).astype(int)
        axes = (rng.uniform(8, 18, 2) * scale).astype(int)
        cv2.ellipse(mask, tuple(center), tuple(axes), rng.uniform(0, 180), 0, 360, 1.0, -1)
        mask = np.asarray(cv2.GaussianBlur(mask, (0, 0), 2.0 * scale), np.float32)
        factor = rng.uniform(0.4, 0.6) * np.array([1.05, 1.0, 0.95], np.float32)
        out = out * (1 - mask[:, :, None] * (1 - factor))
    else:
        center = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h]).astype(int)
        radius = max(2, round(rng.uniform(4, 9) * scale))
        cv2.circle(mask, tuple(center), radius, 1.0, -1, cv2.LINE_AA)
        mask = np.asarray(cv2.GaussianBlur(mask, (0, 0), 0.8 * scale), np.float32)
        out = out * (1 - mask[:, :, None]) + 12.0 * mask[:, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class TextureSplit:
    fit: list[NDArray[np.uint8]]
    holdout: list[NDArray[np.uint8]]
    good: list[NDArray[np.uint8]]
    bad: list[NDArray[np.uint8]]
    bad_kinds: list[DefectKind]


def texture_split(
    texture: NDArray[np.uint8],
    *,
    crop_px: int = 128,
    n_fit: int = 32,
    n_holdout: int = 8,
    n_good: int = 30,
    n_bad_per_kind: int = 10,
    kinds: Sequence[DefectKind] = DEFECT_KINDS,
    seed: int = 0,
) -> TextureSplit:
    """Bank, held-out, good and defective crops of ``texture`` from disjoint row bands."""
    rng = np.random.default_rng(seed)
    image = _to_rgb(texture)
    h = image.shape[0]
    bank_end = int(h * _BANK_ROWS)
    fit = _random_crops(image, (0, bank_end), crop_px, n_fit, rng)
    eval_rows = (bank_end, h)
    holdout = _random_crops(image, eval_rows, crop_px, n_holdout, rng)
    good = _random_crops(image, eval_rows, crop_px, n_good, rng)
    bad: list[NDArray[np.uint8]] = []
    bad_kinds: list[DefectKind] = []
    for kind in kinds:
        for crop in _random_crops(image, eval_rows, crop_px, n_bad_per_kind, rng):
            bad.append(add_defect(crop, kind, rng))
            bad_kinds.append(kind)
    return TextureSplit(fit=fit, holdout=holdout, good=good, bad=bad, bad_kinds=bad_kinds)
