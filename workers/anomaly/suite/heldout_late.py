"""Three more procedural families, written in the fifth session of 2026-12-01, after every
recipe choice so far: steel tread plate, terrazzo and woven wire mesh.

A second check on surfaces the recipe was never tuned on (the first three are in
:mod:`.heldout`), with kinds of structure the suite did not have: embossed relief lit from
one side, large chips of every colour in a matrix, and an open mesh whose gaps show a
dark background. Same conventions as :mod:`.surfaces` (renderer ``(rng, n, flaw)``, 256 px
crops of about 5 cm). Reported apart in docs/anomaly.md; do not tune the recipe on them.
"""

from __future__ import annotations

import cv2
import numpy as np

from workers.anomaly.suite.canvas import Image, aniso_noise, coords, lerp, rgb, smooth_noise
from workers.anomaly.suite.surfaces import Renderer, Structural, cell_of

__all__ = ["LATE_STRUCTURAL", "LATE_SURFACES"]

_SUB = 16  # cv2 drawing sub-pixel factor (4 fractional bits)


def tread_plate(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Steel tread plate: raised lentil lugs on a 24 px grid, neighbours at +45 / -45
    degrees, lit from the upper left over a brushed base."""
    pitch = 24.0
    x, y = coords(n, rng)
    ix, fx = cell_of(x, pitch)
    iy, fy = cell_of(y, pitch)
    u, v = (fx - 0.5) * pitch, (fy - 0.5) * pitch
    s = np.where((ix + iy) % 2 == 0, 1.0, -1.0).astype(np.float32)  # +45 or -45 degrees
    r = np.float32(np.sqrt(0.5))
    along, across = (u + s * v) * r, (v - s * u) * r
    height = np.sqrt(np.clip(1 - (along / 8.0) ** 2 - (across / 2.6) ** 2, 0, None))
    if flaw is not None:  # flattened_lug: one lug ground off, flat plate where it stood
        col, row = int(flaw.at[0]), int(flaw.at[1])
        gone = (ix == ix[row, col]) & (iy == iy[row, col])
        height = np.where(gone, 0.0, height)
    height = np.asarray(cv2.GaussianBlur(height.astype(np.float32), (0, 0), 0.7), np.float32)
    gy, gx = np.gradient(height)
    relief = -(gx + gy)  # lit from the upper left
    metal = 1 + 0.04 * aniso_noise(rng, n, 30.0, 0.6) + 0.03 * smooth_noise(rng, n, 70.0)
    lum = metal * (0.85 + 0.15 * height) + 0.9 * relief
    return np.asarray(rgb(0.62, 0.63, 0.66) * np.clip(lum, 0.05, None)[..., None], np.float32)


_CHIP_COLOURS = np.array(
    [
        [0.92, 0.91, 0.88],  # white marble
        [0.12, 0.12, 0.13],  # black
        [0.72, 0.38, 0.24],  # terracotta
        [0.35, 0.50, 0.38],  # green
        [0.55, 0.55, 0.56],  # grey
        [0.80, 0.70, 0.52],  # ochre
    ],
    np.float32,
)


def terrazzo(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Terrazzo: chips of 4-22 px across (marble, black, terracotta, green, grey, ochre)
    set in a speckled cement matrix and ground flat."""
    img = np.broadcast_to(rgb(0.70, 0.68, 0.64), (n, n, 3)).copy()
    img *= (1 + 0.04 * smooth_noise(rng, n, 1.0) + 0.03 * smooth_noise(rng, n, 20.0))[..., None]
    count = n * n // 90
    centres = rng.uniform(0, n, (count, 2))
    radii = np.clip(rng.lognormal(np.log(3.5), 0.5, count), 2.0, 11.0)
    colours = _CHIP_COLOURS[rng.integers(0, len(_CHIP_COLOURS), count)]
    shades = rng.uniform(0.85, 1.1, count)
    popped = -1
    if flaw is not None:  # popped_chip: the nearest chip of radius >= 5 px is gone
        big = np.flatnonzero(radii >= 5.0)
        near = np.hypot(*(centres[big] - np.array(flaw.at)).T)
        popped = int(big[np.argmin(near)])
    pits = np.zeros((n, n), np.float32)
    for i in range(count):
        k = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        reach = radii[i] * rng.uniform(0.6, 1.0, k)
        pts = centres[i] + np.stack([np.cos(angles), np.sin(angles)], 1) * reach[:, None]
        poly = [np.round(pts * _SUB).astype(np.int32)]
        if i == popped:
            cv2.fillPoly(pits, poly, 1.0, cv2.LINE_AA, 4)
        else:
            colour = (colours[i] * shades[i]).tolist()
            cv2.fillPoly(img, poly, colour, cv2.LINE_AA, 4)
    if popped >= 0:  # a cavity: dark floor, darker still under its upper-left rim
        rim_shadow = np.clip(pits - np.roll(pits, (2, 2), axis=(0, 1)), 0, 1)
        img = lerp(img, rgb(0.22, 0.21, 0.20), pits * 0.85)
        img = img * (1 - 0.5 * rim_shadow)[..., None]
    return np.asarray(cv2.GaussianBlur(img, (0, 0), 0.6), np.float32)


def wire_mesh(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Plain-woven square wire mesh, 12 px pitch, 4 px wires with a bright crest, over a
    dark backing; at every crossing one wire passes over, the other dips under."""
    pitch, half_width = 12.0, 2.2
    x, y = coords(n, rng)
    ix, fx = cell_of(x, pitch)
    iy, fy = cell_of(y, pitch)
    # distance from the wire centre lines (wires along x sit at fy = 0.5, along y at fx = 0.5)
    off_h = (fy - 0.5) * pitch
    off_v = (fx - 0.5) * pitch
    wire_h = np.clip(half_width - np.abs(off_h) + 0.5, 0, 1)
    wire_v = np.clip(half_width - np.abs(off_v) + 0.5, 0, 1)
    crest_h = np.sqrt(np.clip(1 - (off_h / half_width) ** 2, 0, None))
    crest_v = np.sqrt(np.clip(1 - (off_v / half_width) ** 2, 0, None))
    # plain weave: the horizontal wire is over at crossings where ix + iy is even, and
    # darkens where it dips under (near the crossings where it is not)
    h_over = (ix + iy) % 2 == 0
    near_cross = np.exp(-(((fx - 0.5) * pitch / 3.5) ** 2))
    dip_h = np.where(h_over, 0.0, 0.45 * near_cross)
    near_cross_v = np.exp(-(((fy - 0.5) * pitch / 3.5) ** 2))
    dip_v = np.where(h_over, 0.45 * near_cross_v, 0.0)
    if flaw is not None:  # broken_wire: a 12 px stretch (one pitch) of one wire missing
        col, row = int(flaw.at[0]), int(flaw.at[1])
        if flaw.rng.uniform() < 0.5:
            cut = (iy == iy[row, col]) & (np.abs(x - x[row, col]) < pitch * 0.5)
            wire_h = np.where(cut, 0.0, wire_h)
        else:
            cut = (ix == ix[row, col]) & (np.abs(y - y[row, col]) < pitch * 0.5)
            wire_v = np.where(cut, 0.0, wire_v)
    tone = 1 + 0.05 * smooth_noise(rng, n, 40.0)
    lum_h = (0.45 + 0.6 * crest_h) * (1 - dip_h)
    lum_v = (0.45 + 0.6 * crest_v) * (1 - dip_v)
    both = (wire_h > 0) & (wire_v > 0)
    use_h = np.where(both, h_over, wire_h >= wire_v)
    top = np.where(use_h, lum_h, lum_v)
    cover = np.maximum(wire_h, wire_v)
    backing = 0.12 * (1 + 0.1 * smooth_noise(rng, n, 3.0))
    lum = backing + (top * tone - backing) * cover
    return np.asarray(rgb(0.74, 0.72, 0.66) * lum[..., None], np.float32)


LATE_SURFACES: dict[str, Renderer] = {
    "tread_plate": tread_plate,
    "terrazzo": terrazzo,
    "wire_mesh": wire_mesh,
}
"""Late held-out family name -> renderer."""

LATE_STRUCTURAL: dict[str, tuple[str, ...]] = {
    "tread_plate": ("flattened_lug",),
    "terrazzo": ("popped_chip",),
    "wire_mesh": ("broken_wire",),
}
"""Late held-out family name -> the structural defects its renderer can build in."""
