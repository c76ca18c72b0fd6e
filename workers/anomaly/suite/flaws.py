"""Defects painted on a finished surface crop (material space, float RGB 0..1).

Each painter takes ``(image, rng, size)`` where ``size`` in 0..1 picks the defect's extent
within its kind's range (0 = smallest, 1 = largest; the dataset draws it uniformly, so
sizes are log-spread) and returns a new image. The pixel mask is not drawn here: the
dataset compares the defective crop with the good one, so the mask is exactly where the
defect changed the surface.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from workers.anomaly.suite.canvas import Image, Plane, lerp, rgb, soft_blob

__all__ = ["PAINTERS", "Painter"]

Painter = Callable[[Image, np.random.Generator, float], Image]


def _span(image: Image, lo: float, hi: float, size: float) -> float:
    """Log-interpolate between ``lo`` and ``hi`` px (at a 256 px crop; scaled to this one)."""
    scale = float(min(image.shape[:2])) / 256
    return float(np.exp(np.log(lo) + (np.log(hi) - np.log(lo)) * size)) * scale


def _centre(image: Image, rng: np.random.Generator, margin: float = 0.15) -> tuple[float, float]:
    h, w = image.shape[:2]
    x, y = rng.uniform(margin, 1 - margin, 2)
    return float(x * w), float(y * h)


def _line_mask(image: Image, points: np.ndarray, thickness: int) -> Plane:
    mask = np.zeros(image.shape[:2], np.float32)
    pts = np.round(points * 16).astype(np.int32)
    cv2.polylines(mask, [pts], False, 1.0, thickness, cv2.LINE_AA, 4)
    return mask


def _path(
    image: Image, rng: np.random.Generator, length: float, bend: float, steps: int
) -> np.ndarray:
    """A random polyline of ``length`` px whose heading wanders by ``bend`` rad per step."""
    x, y = _centre(image, rng)
    heading = rng.uniform(0, 2 * np.pi)
    pts = [(x, y)]
    for _ in range(steps):
        heading += rng.normal(0, bend)
        x += np.cos(heading) * length / steps
        y += np.sin(heading) * length / steps
        pts.append((x, y))
    return np.array(pts, np.float64)


def scratch(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A thin, slightly bent line, brighter (exposed material) or darker than the surface."""
    mask = _line_mask(
        image, _path(image, rng, _span(image, 25, 180, size), 0.05, 4), 1 + int(size > 0.6)
    )
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.18, 0.3)
    return np.asarray(np.clip(image + delta * mask[..., None], 0, 1), np.float32)


def cut(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A straight dark slit with faintly lighter lips."""
    pts = _path(image, rng, _span(image, 10, 90, size), 0.0, 1)
    slit = _line_mask(image, pts, 1)
    lips = np.clip(_line_mask(image, pts, 3) - slit, 0, 1)
    out = image * (1 - 0.8 * slit[..., None]) + 0.08 * lips[..., None]
    return np.asarray(np.clip(out, 0, 1), np.float32)


def crack(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A jagged dark line with a short branch."""
    length = _span(image, 15, 150, size)
    main = _path(image, rng, length, 0.5, 14)
    mask = _line_mask(image, main, 1)
    branch_start = main[len(main) // 2]
    branch = branch_start + np.cumsum(rng.normal(0, 2.5, (5, 2)), axis=0)
    mask = np.maximum(mask, _line_mask(image, np.vstack([branch_start, branch]), 1))
    return np.asarray(image * (1 - 0.7 * mask[..., None]), np.float32)


def hole(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A near-black opening with a ragged edge and a dark rim."""
    r = _span(image, 2.5, 14.0, size)
    blob = soft_blob(image.shape[:2], _centre(image, rng), (r, r * rng.uniform(0.7, 1.0)),
                     rng.uniform(0, 180), rng, edge_px=1.0, rough=0.3)  # fmt: skip
    rim = np.clip(cv2.GaussianBlur(blob, (0, 0), 1.5) * 1.5 - blob, 0, 1)
    out = image * (1 - 0.4 * rim[..., None])
    return lerp(out, rgb(0.03, 0.03, 0.03), blob)


def pit(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A tiny dark pock mark."""
    r = _span(image, 1.6, 3.5, size)
    blob = soft_blob(image.shape[:2], _centre(image, rng), (r, r), 0.0, rng, edge_px=0.8, rough=0.1)
    return np.asarray(image * (1 - 0.65 * blob[..., None]), np.float32)


def stain(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A soft irregular blotch that darkens and tints the surface (the texture still shows)."""
    r = _span(image, 10.0, 40.0, size)
    blob = soft_blob(image.shape[:2], _centre(image, rng, 0.2), (r, r * rng.uniform(0.5, 1.0)),
                     rng.uniform(0, 180), rng, edge_px=max(2.0, r / 4), rough=0.35)  # fmt: skip
    tint = rgb(*rng.uniform(0.75, 1.0, 3))
    factor = rng.uniform(0.5, 0.75) * tint
    return np.asarray(image * (1 - blob[..., None] * (1 - factor)), np.float32)


def colour_spot(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A small spot of a foreign, saturated colour (paint fleck, dyed fibre)."""
    r = _span(image, 2.0, 9.0, size)
    blob = soft_blob(image.shape[:2], _centre(image, rng), (r, r * rng.uniform(0.6, 1.0)),
                     rng.uniform(0, 180), rng, edge_px=1.0)  # fmt: skip
    hue = int(rng.integers(0, 180))
    swatch = (
        np.asarray(cv2.cvtColor(np.array([[[hue, 220, 200]]], np.uint8), cv2.COLOR_HSV2RGB))[0, 0]
        / 255.0
    )
    return lerp(image, swatch.astype(np.float32), blob * rng.uniform(0.7, 1.0))


def dent(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A shallow dent: lit on one side, shadowed on the other."""
    r = _span(image, 8.0, 26.0, size)
    h, w = image.shape[:2]
    cx, cy = _centre(image, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = (xx - cx) / r, (yy - cy) / r
    light = rng.uniform(0, 2 * np.pi)
    shade = -(dx * np.cos(light) + dy * np.sin(light)) * np.exp(-(dx * dx + dy * dy))
    amp = rng.uniform(0.6, 0.9)
    return np.asarray(np.clip(image * (1 + amp * shade[..., None]), 0, 1), np.float32)


def burn(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A scorch: brown halo, charred core."""
    r = _span(image, 3.0, 24.0, size)
    centre = _centre(image, rng)
    halo = soft_blob(image.shape[:2], centre, (r * 1.4, r * 1.2), rng.uniform(0, 180), rng,
                     edge_px=r / 3, rough=0.4)  # fmt: skip
    core = soft_blob(
        image.shape[:2], centre, (r * 0.6, r * 0.5), rng.uniform(0, 180), rng, rough=0.5
    )
    out = lerp(image, rgb(0.25, 0.13, 0.05), 0.75 * halo)
    return lerp(out, rgb(0.04, 0.03, 0.02), core)


def smear(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A smudged region: the surface dragged (motion-blurred) along one direction."""
    r = _span(image, 6.0, 32.0, size)
    blob = soft_blob(image.shape[:2], _centre(image, rng), (r * 1.5, r), rng.uniform(0, 180), rng,
                     edge_px=r / 3)  # fmt: skip
    length = int(rng.integers(7, 15))
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    turn = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
    kernel = np.asarray(cv2.warpAffine(kernel, turn, (length, length)), np.float32)
    kernel = kernel / kernel.sum()
    dragged = cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT)
    return lerp(image, np.asarray(dragged, np.float32), blob)


def crater(image: Image, rng: np.random.Generator, size: float) -> Image:
    """A paint crater (fisheye): a dull centre inside a bright ring."""
    r = _span(image, 2.5, 10.0, size)
    h, w = image.shape[:2]
    cx, cy = _centre(image, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.hypot(xx - cx, yy - cy) / r
    ring = np.exp(-(((d - 1.0) / 0.25) ** 2))
    inner = np.clip(1.2 - d, 0, 1)
    lum = 1 + 0.35 * ring - 0.25 * inner
    return np.asarray(np.clip(image * lum[..., None], 0, 1), np.float32)


PAINTERS: dict[str, Painter] = {
    "scratch": scratch,
    "cut": cut,
    "crack": crack,
    "hole": hole,
    "pit": pit,
    "stain": stain,
    "colour_spot": colour_spot,
    "dent": dent,
    "burn": burn,
    "smear": smear,
    "crater": crater,
}
"""Defect kind -> painter."""
