"""Adaptive classical restoration driven by the quality flags.

Pure: ``enhance_image(image, quality, params)`` returns a new RGB uint8 image of the
same size and the list of operations it applied, with their parameters. The flags of
``quality`` pick the operations, always in this order:

1. ``noisy``              -> ``denoise``: bilateral filter on Y (YCrCb) with its range
                             sigma tied to the measured noise, 5x5 median on Cr and Cb.
2. ``dark``/``overexposed`` -> ``gamma``: one LUT on R, G and B: a gain that puts the
                             99.5th luma percentile near white (dark only), then the
                             gamma that brings mean luma to the target.
3. ``low_contrast``       -> ``stretch`` (levels, if the luma range is still narrow)
                             then ``clahe`` on L (LAB).
4. ``blurry``             -> ``unsharp`` mask on Y (YCrCb), radius scaled to the image
                             size, amount from how far sharpness is below its target.

Denoise runs first so that nothing amplifies the noise before it is removed; sharpening
runs last so that it does not sharpen noise. An unusable image or one with no flags is
returned unchanged with ``applied == ()``. ``blocky`` and ``low_res`` have no operation.
docs/quality-enhance.md has the choices and the measured time budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray

from imgpipe.stageoutputs import AppliedOpOutput, EnhanceOutput
from workers.stages._params import params_from_json, require
from workers.stages.quality import QualityResult, check_rgb_image

__all__ = ["AppliedOp", "EnhanceParams", "EnhanceResult", "enhance_image"]

_LEVELS: Final = np.arange(256, dtype=np.float64)
_CHROMA_MEDIAN_PX: Final = 5
# Colour spaces with the luma/lightness first: (from RGB, back to RGB).
_YCRCB: Final = (cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB)
_LAB: Final = (cv2.COLOR_RGB2LAB, cv2.COLOR_LAB2RGB)
_Channel = Callable[[NDArray[np.uint8]], NDArray[np.uint8]]


@dataclass(frozen=True)
class EnhanceParams:
    """Strengths of the operations. Luma values are 8-bit grey levels (0..255)."""

    dark_target_luma_levels: float = 110.0
    """Mean luma a ``dark`` image is brought to."""
    bright_target_luma_levels: float = 165.0
    """Mean luma an ``overexposed`` image is brought down to."""
    max_gain: float = 4.0
    """Largest linear gain for a dark image (and for the contrast stretch)."""
    white_point_percentile: float = 99.5
    """Luma percentile mapped near white by the gain / stretch."""
    gamma_min: float = 0.4
    gamma_max: float = 2.5
    contrast_rms_target: float = 0.10
    """``low_contrast`` ops run only while RMS contrast (after ``gamma``) is below this."""
    clahe_clip_limit: float = 2.0
    clahe_tiles: int = 8
    """CLAHE grid: ``clahe_tiles`` x ``clahe_tiles`` tiles."""
    denoise_strength: float = 2.0
    """Bilateral range sigma = strength x measured noise sigma."""
    denoise_diameter_px: int = 5
    """Bilateral neighbourhood, odd, 3..15 (the cost grows with its square)."""
    unsharp_sigma_px: float = 1.5
    """Unsharp radius at the quality stage's analysis scale (scaled up for big images)."""
    unsharp_amount_min: float = 0.8
    unsharp_amount_max: float = 2.5
    unsharp_target_sharpness: float = 1.5
    """Sharpness the amount is chosen to approach; the quality stage's 'good' anchor."""

    def __post_init__(self) -> None:
        own = type(self).__name__
        require(
            0.0 < self.dark_target_luma_levels < 255.0, own, "dark_target_luma_levels in (0, 255)"
        )
        require(
            0.0 < self.bright_target_luma_levels < 255.0,
            own,
            "bright_target_luma_levels in (0, 255)",
        )
        require(self.max_gain >= 1.0, own, "max_gain must be >= 1")
        require(
            50.0 <= self.white_point_percentile <= 100.0,
            own,
            "white_point_percentile in [50, 100]",
        )
        require(
            0.0 < self.gamma_min <= 1.0 <= self.gamma_max,
            own,
            "need 0 < gamma_min <= 1 <= gamma_max",
        )
        require(self.clahe_clip_limit > 0.0, own, "clahe_clip_limit must be > 0")
        require(1 <= self.clahe_tiles <= 64, own, "clahe_tiles in [1, 64]")
        require(self.denoise_strength > 0.0, own, "denoise_strength must be > 0")
        require(
            3 <= self.denoise_diameter_px <= 15 and self.denoise_diameter_px % 2 == 1,
            own,
            "denoise_diameter_px must be odd, 3..15 (the cost grows with its square)",
        )
        require(self.unsharp_sigma_px > 0.0, own, "unsharp_sigma_px must be > 0")
        require(
            0.0 <= self.unsharp_amount_min <= self.unsharp_amount_max,
            own,
            "need 0 <= unsharp_amount_min <= unsharp_amount_max",
        )
        require(self.unsharp_target_sharpness > 0.0, own, "unsharp_target_sharpness must be > 0")

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> EnhanceParams:
        return params_from_json(cls, data)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class AppliedOp:
    op: str
    """``denoise``, ``gamma``, ``stretch``, ``clahe`` or ``unsharp``."""
    reason: str
    """The flag and metric value that triggered it."""
    params: dict[str, float]

    def to_json(self) -> AppliedOpOutput:
        return {"op": self.op, "reason": self.reason, "params": dict(self.params)}


@dataclass(frozen=True)
class EnhanceResult:
    image: NDArray[np.uint8]
    """HxWx3 RGB uint8, the same size as the input."""
    applied: tuple[AppliedOp, ...]
    """In the order applied; empty if nothing needed doing."""
    duration_ms: float

    def to_json(self) -> EnhanceOutput:
        height, width = (int(n) for n in self.image.shape[:2])
        return {
            "applied": [op.to_json() for op in self.applied],
            "duration_ms": self.duration_ms,
            "width_px": width,
            "height_px": height,
            # the image read, which has the output's size (kept for existing readers)
            "width": width,
            "height": height,
        }


def _luma_hist(image: NDArray[np.uint8]) -> NDArray[np.float64]:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    hist = cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    return np.asarray(hist / max(float(hist.sum()), 1.0))


def _percentile(hist: NDArray[np.float64], pct: float) -> float:
    return float(np.searchsorted(np.cumsum(hist), pct / 100.0))


def _curve(gain: float, gamma: float, black: float = 0.0) -> NDArray[np.float64]:
    """Output level of each input level for gain (after subtracting black) then gamma."""
    x = np.clip((_LEVELS - black) * gain / 255.0, 0.0, 1.0)
    return np.asarray(255.0 * x**gamma)


def _lut(curve: NDArray[np.float64]) -> NDArray[np.uint8]:
    return np.clip(np.rint(curve), 0, 255).astype(np.uint8)


def _solve_gamma(
    hist: NDArray[np.float64], gain: float, target: float, lo: float, hi: float
) -> float:
    """Gamma in [lo, hi] whose curve moves the mean of ``hist`` closest to ``target``."""
    for _ in range(30):  # bisection: the mean falls as gamma rises
        mid = 0.5 * (lo + hi)
        if float(hist @ _curve(gain, mid)) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _remap_hist(hist: NDArray[np.float64], lut: NDArray[np.uint8]) -> NDArray[np.float64]:
    return np.bincount(lut, weights=hist, minlength=256).astype(np.float64)


def _rms_contrast(hist: NDArray[np.float64]) -> float:
    mean = float(hist @ _LEVELS)
    return float(np.sqrt(hist @ (_LEVELS - mean) ** 2)) / 255.0


def _per_channel(
    image: NDArray[np.uint8],
    space: tuple[int, int],
    luma: _Channel,
    chroma: _Channel | None = None,
) -> NDArray[np.uint8]:
    """Convert to ``space``, filter its first (luma) and optionally other channels, convert back."""
    to_space, to_rgb = space
    channels = [np.asarray(c, dtype=np.uint8) for c in cv2.split(cv2.cvtColor(image, to_space))]
    channels[0] = luma(channels[0])
    if chroma is not None:
        channels[1:] = [chroma(c) for c in channels[1:]]
    return np.asarray(cv2.cvtColor(cv2.merge(channels), to_rgb), dtype=np.uint8)


def _denoise(
    image: NDArray[np.uint8], sigma: float, p: EnhanceParams
) -> tuple[NDArray[np.uint8], dict[str, float]]:
    sigma_color = p.denoise_strength * sigma
    sigma_space = p.denoise_diameter_px / 2.0

    def luma(y: NDArray[np.uint8]) -> NDArray[np.uint8]:
        filtered = cv2.bilateralFilter(y, p.denoise_diameter_px, sigma_color, sigma_space)
        return np.asarray(filtered, dtype=np.uint8)

    def chroma(c: NDArray[np.uint8]) -> NDArray[np.uint8]:
        return np.asarray(cv2.medianBlur(c, _CHROMA_MEDIAN_PX), dtype=np.uint8)

    params = {
        "diameter_px": float(p.denoise_diameter_px),
        "sigma_color": round(sigma_color, 3),
        "sigma_space_px": sigma_space,
        "chroma_median_px": float(_CHROMA_MEDIAN_PX),
    }
    return _per_channel(image, _YCRCB, luma, chroma), params


def _clahe(lum: NDArray[np.uint8], p: EnhanceParams) -> NDArray[np.uint8]:
    tiles = (p.clahe_tiles, p.clahe_tiles)
    clahe = cv2.createCLAHE(clipLimit=p.clahe_clip_limit, tileGridSize=tiles)
    return np.asarray(clahe.apply(lum), dtype=np.uint8)


def _unsharp(lum: NDArray[np.uint8], sigma_px: float, amount: float) -> NDArray[np.uint8]:
    blurred = cv2.GaussianBlur(lum, (0, 0), sigma_px)
    return np.asarray(cv2.addWeighted(lum, 1.0 + amount, blurred, -amount, 0), dtype=np.uint8)


def _exposure(
    image: NDArray[np.uint8], flag: str, p: EnhanceParams
) -> tuple[NDArray[np.uint8], AppliedOp, NDArray[np.float64]]:
    """Gain (dark only) and gamma as one LUT on R, G, B; also returns the new luma histogram."""
    hist = _luma_hist(image)
    before = float(hist @ _LEVELS)
    if flag == "dark":
        # Undo under-exposure with a gain first (it keeps the tonal shape), capped so that
        # it neither clips more than the top percentile nor overshoots the target mean;
        # a gamma < 1 then lifts the mean the rest of the way.
        white = max(_percentile(hist, p.white_point_percentile), 1.0)
        gain_wanted = min(250.0 / white, p.dark_target_luma_levels / max(before, 1.0))
        gain = float(np.clip(gain_wanted, 1.0, p.max_gain))
        target, lo, hi = p.dark_target_luma_levels, p.gamma_min, 1.0
    else:  # overexposed: clipped highlights cannot come back; a gamma > 1 lowers the mean
        gain = 1.0
        target, lo, hi = p.bright_target_luma_levels, 1.0, p.gamma_max
    gamma = _solve_gamma(hist, gain, target, lo, hi)
    lut = _lut(_curve(gain, gamma))
    hist = _remap_hist(hist, lut)
    op = AppliedOp(
        "gamma",
        f"{flag}: mean luma {before:.1f}",
        {
            "gain": round(gain, 4),
            "gamma": round(gamma, 4),
            "target_luma": target,
            "mean_luma_after": round(float(hist @ _LEVELS), 2),
        },
    )
    return np.asarray(cv2.LUT(image, lut), dtype=np.uint8), op, hist


def _stretch(
    image: NDArray[np.uint8], hist: NDArray[np.float64], contrast: float, p: EnhanceParams
) -> tuple[NDArray[np.uint8], AppliedOp | None]:
    """Levels: the luma percentiles (100 - w, w) onto the full range, gain capped."""
    black = _percentile(hist, 100.0 - p.white_point_percentile)
    white = _percentile(hist, p.white_point_percentile)
    gain = float(np.clip(255.0 / max(white - black, 1.0), 1.0, p.max_gain))
    if gain < 1.05:
        return image, None
    lut = _lut(_curve(gain, 1.0, black=black))
    op = AppliedOp(
        "stretch",
        f"low_contrast: contrast_rms {contrast:.3f}",
        {"black_level": black, "gain": round(gain, 4)},
    )
    return np.asarray(cv2.LUT(image, lut), dtype=np.uint8), op


def _restore_contrast(
    image: NDArray[np.uint8],
    hist: NDArray[np.float64] | None,
    metrics: Mapping[str, float],
    p: EnhanceParams,
) -> tuple[NDArray[np.uint8], list[AppliedOp]]:
    """Stretch, then CLAHE, unless the contrast is already back on target: correcting the
    exposure often restores the contrast too, so it is measured again first (``hist``:
    the luma histogram after the exposure step, if it ran)."""
    hist = _luma_hist(image) if hist is None else hist
    contrast = _rms_contrast(hist)
    if contrast >= p.contrast_rms_target:
        return image, []
    out, stretched = _stretch(image, hist, contrast, p)
    applied = [stretched] if stretched else []
    out = _per_channel(out, _LAB, lambda lum: _clahe(lum, p))
    applied.append(
        AppliedOp(
            "clahe",
            f"low_contrast: contrast_rms {metrics.get('contrast_rms', 0.0):.3f}",
            {"clip_limit": p.clahe_clip_limit, "tiles": float(p.clahe_tiles)},
        )
    )
    return out, applied


def _sharpen(
    image: NDArray[np.uint8], metrics: Mapping[str, float], p: EnhanceParams
) -> tuple[NDArray[np.uint8], AppliedOp]:
    sharpness = metrics.get("sharpness", 0.0)
    # Sharpness was measured on the analysis copy: scale the radius back up.
    sigma_px = p.unsharp_sigma_px / (metrics.get("analysis_scale", 1.0) or 1.0)
    wanted = p.unsharp_target_sharpness / max(sharpness, 1e-3) - 1.0
    amount = float(np.clip(wanted, p.unsharp_amount_min, p.unsharp_amount_max))
    out = _per_channel(image, _YCRCB, lambda y: _unsharp(y, sigma_px, amount))
    op = AppliedOp(
        "unsharp",
        f"blurry: sharpness {sharpness:.3f}",
        {"sigma_px": round(sigma_px, 3), "amount": round(amount, 3)},
    )
    return out, op


def enhance_image(
    image: NDArray[np.uint8], quality: QualityResult, params: EnhanceParams | None = None
) -> EnhanceResult:
    """Apply the restorations ``quality.flags`` call for. Pure: no I/O."""
    started = time.perf_counter()
    p = params or EnhanceParams()
    out = check_rgb_image(image)
    flags = set(quality.flags) if quality.usable else set()
    metrics = quality.metrics
    applied: list[AppliedOp] = []

    if "noisy" in flags:
        sigma = metrics.get("noise_sigma", 0.0)
        out, op_params = _denoise(out, sigma, p)
        applied.append(AppliedOp("denoise", f"noisy: noise_sigma {sigma:.2f}", op_params))

    hist: NDArray[np.float64] | None = None
    exposure_flag = "dark" if "dark" in flags else "overexposed" if "overexposed" in flags else ""
    if exposure_flag:
        out, op, hist = _exposure(out, exposure_flag, p)
        applied.append(op)

    if "low_contrast" in flags:
        out, ops = _restore_contrast(out, hist, metrics, p)
        applied.extend(ops)

    if "blurry" in flags:
        out, op = _sharpen(out, metrics, p)
        applied.append(op)

    elapsed_ms = round((time.perf_counter() - started) * 1000.0, 3)
    return EnhanceResult(image=out, applied=tuple(applied), duration_ms=elapsed_ms)
