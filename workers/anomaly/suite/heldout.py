"""Three procedural families written after the recipe was chosen, to check it on surfaces
it was never tuned on: carbon-fibre twill, pebble-grain leather and perforated sheet.

Same conventions as :mod:`.surfaces` (renderer ``(rng, n, flaw)``, 256 px crops of about
5 cm). Their results are reported apart in docs/anomaly.md; do not tune the recipe on
them, or they stop measuring anything.
"""

from __future__ import annotations

import numpy as np

from workers.anomaly.suite.canvas import (
    Image,
    aniso_noise,
    coords,
    lerp,
    rgb,
    smooth_noise,
    soft_blob,
)
from workers.anomaly.suite.surfaces import Renderer, Structural, cell_of

__all__ = ["HELDOUT_STRUCTURAL", "HELDOUT_SURFACES"]


def twill(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """2/2 carbon-fibre twill: 8 px tows, each over two and under two, in diagonal steps."""
    pitch = 8.0
    x, y = coords(n, rng)
    ix, fx = cell_of(x, pitch)
    iy, fy = cell_of(y, pitch)
    warp_up = ((ix + iy) // 2) % 2 == 0
    along = np.where(warp_up, fx, fy)  # position across the visible tow
    sheen = np.exp(-(((along - 0.5) / 0.22) ** 2))
    tone = np.where(warp_up, 0.26, 0.20).astype(np.float32)
    lum = tone * (0.55 + 0.9 * sheen) * (1 + 0.06 * smooth_noise(rng, n, 1.0))
    lum = lum * np.clip(np.sin(np.pi * along) * 4, 0, 1)  # dark seams between tows
    if flaw is not None:  # resin_gap: one tow segment missing, resin shows through
        col, row = int(flaw.at[0]), int(flaw.at[1])
        length = int(flaw.rng.integers(2, 6))
        kx, ky = ix[row, col], iy[row, col]
        gap = (ix == kx) & (iy >= ky) & (iy < ky + length)
        lum = np.where(gap, 0.05 + 0.02 * smooth_noise(flaw.rng, n, 2.0), lum)
    lum = np.clip(lum, 0, None) * (1 + 0.04 * smooth_noise(rng, n, 50.0))
    return np.asarray(rgb(0.93, 0.97, 1.0) * lum[..., None], np.float32)


def leather(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Pebble-grain leather: rounded pebbles bounded by a network of fine creases, pores."""
    field = smooth_noise(rng, n, 3.2)
    scar = np.zeros((n, n), np.float32)
    if flaw is not None:  # scar: a healed cut, a smooth lighter band where the grain is gone
        scar = soft_blob((n, n), flaw.at, (float(flaw.rng.uniform(12, 30)), 3.5),
                         float(flaw.rng.uniform(0, 180)), flaw.rng, edge_px=2.0)  # fmt: skip
    crease = np.exp(-((field / 0.18) ** 2)) * (1 - scar)
    pores = np.clip(smooth_noise(rng, n, 0.7) - 2.2, 0, None) * (1 - scar)
    lum = (1 - 0.35 * crease - 0.3 * pores) * (1 + 0.05 * smooth_noise(rng, n, 40.0))
    lum = lum + 0.08 * np.clip(field, 0, None) * (1 - scar) + 0.15 * scar
    return np.asarray(rgb(0.46, 0.29, 0.17) * lum[..., None], np.float32)


def perforated(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Perforated steel sheet: round holes on a staggered 16 px grid, brushed metal between."""
    pitch, radius = 16.0, 4.6
    x, y = coords(n, rng)
    iy, fy = cell_of(y, pitch)
    ix, fx = cell_of(np.asarray(x + 0.5 * pitch * (iy % 2), np.float32), pitch)
    r = np.hypot(fx - 0.5, fy - 0.5) * pitch
    hole = np.clip(radius - r + 0.5, 0, 1)
    if flaw is not None:  # blocked_hole: one to three neighbouring holes filled
        col, row = int(flaw.at[0]), int(flaw.at[1])
        count = int(flaw.rng.integers(1, 4))
        kx, ky = ix[row, col], iy[row, col]
        hole = np.where((iy == ky) & (ix >= kx) & (ix < kx + count), 0.0, hole)
    rim = np.exp(-(((r - radius - 1.0) / 0.8) ** 2)) * (1 - hole)
    metal = 1 + 0.04 * aniso_noise(rng, n, 40.0, 0.6) + 0.03 * smooth_noise(rng, n, 60.0)
    lum = metal * (1 + 0.25 * rim)
    img = rgb(0.66, 0.67, 0.69) * lum[..., None]
    return lerp(np.asarray(img, np.float32), rgb(0.06, 0.06, 0.07), hole.astype(np.float32))


HELDOUT_SURFACES: dict[str, Renderer] = {
    "twill": twill,
    "leather": leather,
    "perforated": perforated,
}
"""Held-out family name -> renderer."""

HELDOUT_STRUCTURAL: dict[str, tuple[str, ...]] = {
    "twill": ("resin_gap",),
    "leather": ("scar",),
    "perforated": ("blocked_hole",),
}
"""Held-out family name -> the structural defects its renderer can build in."""
