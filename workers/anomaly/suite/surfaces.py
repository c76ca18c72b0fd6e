"""The procedural surface families: each renders an n x n material image (float RGB 0..1).

A renderer takes ``(rng, n, flaw)``. ``rng`` decides everything about the good surface
(phase, per-thread / per-loop / per-grain variation, noise), so two calls with equal
generators give equal images. ``flaw`` (or None) adds a *structural* defect, one that
lives in how the surface is built (a missing thread, a dropped stitch, missing tufts, a
knot, a missing print motif); it draws its own randomness from ``flaw.rng`` so that the
defective render differs from the good one only where the defect is. Defects painted on
a finished surface (stains, holes, scratches...) are in :mod:`.flaws`.

Scales are for 256 px crops of a camera that sees about 5 cm: threads 8 px apart,
carpet loops 5 px, wood rings about 22 px.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from workers.anomaly.suite.canvas import (
    Image,
    Plane,
    aniso_noise,
    coords,
    lerp,
    rgb,
    smooth_noise,
    soft_blob,
)

__all__ = ["STRUCTURAL", "SURFACES", "Renderer", "Structural", "cell_of"]

_TABLE = 4096


@dataclass(frozen=True)
class Structural:
    """A structural defect to build into a render, centred near ``at`` (pixel x, y)."""

    kind: str
    rng: np.random.Generator
    at: tuple[float, float]


Renderer = Callable[[np.random.Generator, int, Structural | None], Image]


def cell_of(v: Plane, pitch: float) -> tuple[np.ndarray, Plane]:
    """Integer cell index and the 0..1 position inside the cell, along one axis."""
    scaled = v / np.float32(pitch)
    index = np.floor(scaled)
    return index.astype(np.int64), np.asarray(scaled - index, np.float32)


def _blob_at(n: int, flaw: Structural, r_lo: float, r_hi: float, elong: float = 1.6) -> Plane:
    r = float(np.exp(flaw.rng.uniform(np.log(r_lo), np.log(r_hi))))
    ratio = flaw.rng.uniform(1.0, elong)
    return soft_blob((n, n), flaw.at, (r * ratio, r), flaw.rng.uniform(0, 180), flaw.rng)


def woven(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Plain weave: warp (vertical) and weft (horizontal) threads alternate over/under."""
    pitch = 8.0
    x, y = coords(n, rng)
    widths = [1 + 0.08 * rng.standard_normal(_TABLE).astype(np.float32) for _ in range(2)]
    shades = [0.07 * rng.standard_normal(_TABLE).astype(np.float32) for _ in range(2)]
    slub_warp = 0.07 * aniso_noise(rng, n, 0.8, 10.0)
    slub_weft = 0.07 * aniso_noise(rng, n, 10.0, 0.8)
    ix, fx = cell_of(x, pitch)
    iy, fy = cell_of(y, pitch)
    if flaw is not None:
        axis = int(flaw.rng.integers(2))
        col, row = int(flaw.at[0]), int(flaw.at[1])
        k = int(ix[row, col] if axis == 0 else iy[row, col]) % _TABLE
        widths[axis][k] = 0.0 if flaw.kind == "missing_thread" else 1.75
        if flaw.kind == "thick_thread":
            shades[axis][k] = 0.25
    warp_w, weft_w = widths[0][ix % _TABLE], widths[1][iy % _TABLE]
    a = np.sqrt(np.clip(1 - ((fx - 0.5) / (0.46 * warp_w + 1e-6)) ** 2, 0, 1))
    b = np.sqrt(np.clip(1 - ((fy - 0.5) / (0.46 * weft_w + 1e-6)) ** 2, 0, 1))
    warp_lum = a * (0.72 + 0.28 * np.sin(np.pi * fy)) * (1 + slub_warp + shades[0][ix % _TABLE])
    weft_lum = b * (0.72 + 0.28 * np.sin(np.pi * fx)) * (1 + slub_weft + shades[1][iy % _TABLE])
    over = (ix + iy) % 2 == 0
    show_warp = (a > 0.05) & (over | (b <= 0.05))
    show_weft = ~show_warp & (b > 0.05)
    lum = np.where(
        show_warp,
        warp_lum * np.where(over, 1.0, 0.8),
        np.where(show_weft, weft_lum * np.where(over, 0.8, 1.0), 0.0),
    ).astype(np.float32)
    colour = lerp(rgb(0.60, 0.52, 0.40), rgb(0.52, 0.44, 0.33), show_warp.astype(np.float32))
    gap = rgb(0.10, 0.08, 0.07)
    return np.asarray(gap + (colour - gap) * lum[..., None], np.float32)


def knitted(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Stockinette: columns of V-shaped loops in a heathered yarn."""
    cw, ch = 10.0, 8.0
    x, y = coords(n, rng)
    ix, fx = cell_of(x, cw)
    iy, fy = cell_of(y, ch)
    key = (ix * 7919 + iy * 104729) % _TABLE
    jitter = 0.06 * rng.standard_normal(_TABLE).astype(np.float32)
    fibre = 0.07 * smooth_noise(rng, n, 0.7) + 0.04 * smooth_noise(rng, n, 3.0)
    t = np.abs(fx - 0.5)
    d = np.abs(t - (0.07 + 0.33 * (1 - fy)))
    lum = np.exp(-((d / 0.13) ** 2)) * (0.7 + 0.3 * np.sin(np.pi * fy)) * (1 + jitter[key])
    yarn = np.broadcast_to(rgb(0.50, 0.19, 0.22), (n, n, 3)).copy()
    if flaw is not None:
        col, row = int(flaw.at[0]), int(flaw.at[1])
        kx, ky = ix[row, col], iy[row, col]
        if flaw.kind == "dropped_stitch":
            rows = int(flaw.rng.integers(2, 9))
            ladder = (ix == kx) & (iy >= ky) & (iy < ky + rows)
            bar = 0.85 * np.exp(-(((fy - 0.5) / 0.16) ** 2))
            lum = np.where(ladder, bar, lum)
        else:  # wrong_yarn: a few stitches knitted from another yarn
            span = int(flaw.rng.integers(1, 4))
            odd = (np.abs(ix - kx) < span) & (np.abs(iy - ky) < span)
            other = rgb(*flaw.rng.uniform(0.25, 0.75, 3))
            yarn[odd] = other
    lum = lum * (1 + fibre)
    bg = rgb(0.10, 0.04, 0.05)
    return np.asarray(bg + (yarn - bg) * lum[..., None], np.float32)


_PILE_PALETTE = np.array(
    [[0.62, 0.56, 0.48], [0.45, 0.40, 0.34], [0.76, 0.71, 0.63], [0.30, 0.26, 0.22]], np.float32
)


def pile(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Heathered loop-pile carpet: offset rows of yarn loops in four heather colours."""
    pitch = 5.0
    x, y = coords(n, rng)
    iy, fy = cell_of(y, pitch)
    ix, fx = cell_of(np.asarray(x + 0.5 * pitch * (iy % 2), np.float32), pitch)
    key = (ix * 7919 + iy * 104729) % _TABLE
    colours = rng.choice(4, _TABLE, p=[0.45, 0.3, 0.15, 0.1])
    jx, jy = (0.12 * rng.standard_normal((2, _TABLE))).astype(np.float32)
    bright = (1 + 0.1 * rng.standard_normal(_TABLE)).astype(np.float32)
    r = np.hypot(fx - 0.5 - jx[key], fy - 0.5 - jy[key])
    loop = 0.85 * np.exp(-(((r - 0.27) / 0.14) ** 2)) + 0.35 * np.exp(-((r / 0.2) ** 2))
    img = _PILE_PALETTE[colours[key]] * ((0.3 + 0.8 * loop) * bright[key])[..., None]
    if flaw is not None:
        region = _blob_at(n, flaw, 4.0 if flaw.kind == "missing_tufts" else 7.0, 18.0, elong=2.5)[
            ..., None
        ]
        if flaw.kind == "missing_tufts":
            yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
            jute = 0.8 + 0.2 * np.sin(xx * 1.3) * np.sin(yy * 1.3)
            backing = rgb(0.36, 0.30, 0.20) * jute[..., None]
            img = img * (1 - region) + backing * region
        else:  # crushed_pile: loops flattened, a little darker and glossier
            flat = cv2.GaussianBlur(img, (0, 0), 1.6) * 0.82 + 0.04
            img = img * (1 - region) + flat * region
    return np.asarray(img, np.float32)


def brushed(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Brushed steel: long fine streaks along x, finer grain, a broad sheen."""
    streak = 0.05 * aniso_noise(rng, n, 60.0, 0.6) + 0.03 * aniso_noise(rng, n, 6.0, 0.5)
    sheen = 0.04 * smooth_noise(rng, n, 80.0)
    if flaw is not None:  # cross_brushing: a patch brushed in another direction
        region = _blob_at(n, flaw, 8.0, 30.0)
        other = 0.06 * aniso_noise(flaw.rng, n, 25.0, 0.6)
        angle = float(flaw.rng.uniform(25, 90))
        turn = cv2.getRotationMatrix2D((n / 2, n / 2), angle, 1.0)
        other = np.asarray(cv2.warpAffine(other, turn, (n, n), borderMode=cv2.BORDER_REFLECT))
        streak = streak * (1 - region) + other * region
    lum = 1 + streak + sheen
    return np.asarray(rgb(0.60, 0.61, 0.64) * lum[..., None], np.float32)


def wood(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Flat-sawn wood: cathedral growth rings, grain streaks along x, dark pores."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    xc = xx - n / 2 + np.float32(rng.uniform(-300, 300))
    t = yy + np.float32(rng.uniform(0, 1000)) + np.float32(rng.uniform(0.0008, 0.002)) * xc**2
    t = t + 5.0 * smooth_noise(rng, n, 25.0)
    streak = 0.05 * aniso_noise(rng, n, 40.0, 0.7)
    pores = np.clip(aniso_noise(rng, n, 3.0, 0.5) - 2.4, 0, None)
    core = np.zeros((n, n), np.float32)
    if flaw is not None:  # knot: rings bend around a dark core
        r = float(np.exp(flaw.rng.uniform(np.log(4.0), np.log(16.0))))
        dist = np.hypot(xx - flaw.at[0], (yy - flaw.at[1]) * flaw.rng.uniform(1.0, 1.6))
        t = t + 1.8 * r * np.exp(-((dist / (1.8 * r)) ** 2))
        core = np.exp(-((dist / r) ** 2)).astype(np.float32) * (0.6 + 0.2 * np.sin(dist / 1.5))
    ring = np.mod(t / 22.0, 1.0)
    late = np.exp(-(((ring - 0.85) / 0.08) ** 2)).astype(np.float32)
    img = lerp(rgb(0.78, 0.60, 0.42), rgb(0.52, 0.34, 0.19), late)
    img = img * (1 + streak - 0.35 * pores)[..., None]
    return np.asarray(lerp(img, rgb(0.28, 0.16, 0.08), core), np.float32)


def granular(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """Granular aggregate (sandpaper, asphalt): lit grains of varied size and tone in a binder."""
    img = np.broadcast_to(rgb(0.33, 0.31, 0.29), (n, n, 3)).copy()
    img *= (1 + 0.05 * smooth_noise(rng, n, 2.0))[..., None]
    count = n * n // 16
    pts = rng.uniform(0, n, (count, 2))
    radii = np.clip(rng.exponential(1.4, count) + 0.8, 0.8, 5.0)
    tones = rng.uniform(0.15, 0.85, count)
    tints = rng.uniform(0.94, 1.06, (count, 3))
    skip = np.zeros(count, bool)
    if flaw is not None:  # missing_grains: a bald patch of binder
        region = _blob_at(n, flaw, 7.0, 20.0)
        skip = region[pts[:, 1].astype(int), pts[:, 0].astype(int)] > 0.5
    for (px, py), rad, tone, tint, gone in zip(pts, radii, tones, tints, skip, strict=True):
        if gone:
            continue
        c = (int(px * 16), int(py * 16))
        cv2.circle(img, c, int(rad * 16), (tone * tint).tolist(), -1, cv2.LINE_AA, 4)
        hi = (int((px - 0.35 * rad) * 16), int((py - 0.35 * rad) * 16))
        cv2.circle(
            img, hi, int(rad * 8), (min(1.0, tone * 1.25) * tint).tolist(), -1, cv2.LINE_AA, 4
        )
    return np.asarray(cv2.GaussianBlur(img, (0, 0), 0.6), np.float32)


def printed(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """A printed repeat: red dots and blue diamonds on cream, with ink-density variation."""
    period = 32.0
    x, y = coords(n, rng)
    ink = 1 + 0.04 * smooth_noise(rng, n, 30.0) + 0.02 * smooth_noise(rng, n, 0.8)
    dx, dy = np.zeros_like(x), np.zeros_like(y)
    ix, fx = cell_of(x, period)
    iy, fy = cell_of(y, period)
    missing = np.zeros((n, n), bool)
    if flaw is not None:
        col, row = int(flaw.at[0]), int(flaw.at[1])
        if flaw.kind == "missing_motif":
            missing = (ix == ix[row, col]) & (iy == iy[row, col])
        else:  # misregistration: the red plate shifted in a region
            region = _blob_at(n, flaw, 16.0, 40.0)
            angle = flaw.rng.uniform(0, 2 * np.pi)
            shift = flaw.rng.uniform(3.0, 6.0) * np.array([np.cos(angle), np.sin(angle)])
            dx, dy = region * np.float32(shift[0]), region * np.float32(shift[1])
    _, gx = cell_of(x + dx, period)
    _, gy = cell_of(y + dy, period)
    dot = np.clip(6.5 - np.hypot(gx - 0.5, gy - 0.5) * period, 0, 1) * ~missing
    hx, hy = np.mod(fx + 0.5, 1.0) - 0.5, np.mod(fy + 0.5, 1.0) - 0.5
    diamond = np.clip((0.13 - (np.abs(hx) + np.abs(hy))) * period, 0, 1)
    img = np.broadcast_to(rgb(0.93, 0.90, 0.82), (n, n, 3)).astype(np.float32)
    img = lerp(img, rgb(0.80, 0.15, 0.18), np.clip(dot * ink, 0, 1).astype(np.float32))
    img = lerp(img, rgb(0.15, 0.30, 0.65), np.clip(diamond * ink, 0, 1).astype(np.float32))
    return np.asarray(img, np.float32)


def coated(rng: np.random.Generator, n: int, flaw: Structural | None) -> Image:
    """A painted panel: one colour, orange-peel texture, slow shading."""
    peel = smooth_noise(rng, n, 2.5) - 0.6 * smooth_noise(rng, n, 6.0)
    lum = 1 + 0.025 * peel + 0.03 * smooth_noise(rng, n, 60.0)
    if flaw is not None:  # run: a sag of thicker paint with a bright lower lip
        r = float(flaw.rng.uniform(3.0, 8.0))
        sag = soft_blob((n, n), flaw.at, (r, r * flaw.rng.uniform(2.0, 5.0)), 90.0, flaw.rng)
        lip = np.clip(np.roll(sag, -2, axis=0) - sag, 0, 1)
        lum = lum * (1 - 0.1 * sag) + 0.3 * lip
    return np.asarray(rgb(0.16, 0.38, 0.62) * lum[..., None], np.float32)


SURFACES: dict[str, Renderer] = {
    "woven": woven,
    "knitted": knitted,
    "pile": pile,
    "brushed": brushed,
    "wood": wood,
    "granular": granular,
    "printed": printed,
    "coated": coated,
}
"""Family name -> renderer."""

STRUCTURAL: dict[str, tuple[str, ...]] = {
    "woven": ("missing_thread", "thick_thread"),
    "knitted": ("dropped_stitch", "wrong_yarn"),
    "pile": ("missing_tufts", "crushed_pile"),
    "brushed": ("cross_brushing",),
    "wood": ("knot",),
    "granular": ("missing_grains",),
    "printed": ("missing_motif", "misregistration"),
    "coated": ("run",),
}
"""Family name -> the structural defects its renderer can build in."""
