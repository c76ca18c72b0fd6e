"""Classical no-reference image quality: metrics, a 0..100 score, flags and the gate.

Pure: ``assess_quality(image, params)`` takes an RGB uint8 array and returns a
``QualityResult``; no I/O. Everything is computed on the luma (BT.601 grey):

* at full resolution: noise sigma (Immerkaer's 3x3 operator, robust median estimate)
  and JPEG blockiness (8-pixel grid discontinuity ratio), both pixel-scale artefacts;
* on a working copy whose long side is at most ``analysis_max_side_px`` (INTER_AREA):
  sharpness, brightness, clipping and RMS contrast, so that these do not depend on how
  many pixels the camera had.

Each metric maps to a severity in 0..1 (0 = fine, 1 = as bad as it gets) between two
fixed anchors; ``score = 100 * prod(1 - weight * severity)``. Flags compare metrics
with the thresholds in ``QualityParams``. docs/quality-enhance.md has the table.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray

from imgpipe.errors import PermanentError
from imgpipe.stageoutputs import QualityOutput
from workers.stages._params import is_number, params_from_json, require

__all__ = [
    "FLAGS",
    "QualityParams",
    "QualityResult",
    "assess_quality",
    "check_rgb_image",
]

FLAGS: Final = ("blurry", "dark", "overexposed", "low_contrast", "noisy", "low_res", "blocky")

# Immerkaer (1996): the difference of two Laplacians; its response to white noise of
# sigma s has standard deviation 6 s and it cancels (locally) linear image content.
_IMMERKAER: Final = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
_IMMERKAER_GAIN: Final = 6.0
_MAD_TO_SIGMA: Final = 1.4826
# Noise-energy gains of the sharpness operators (sum of squared kernel weights).
_LAPLACIAN_NOISE_GAIN: Final = 20.0  # 4-neighbour Laplacian
_GRADIENT_NOISE_GAIN: Final = 2 * 12.0 / 64.0  # Sobel x and y, each scaled by 1/8
_QUANTISATION_VAR: Final = 1.0 / 12.0  # uint8 rounding noise: the floor for noise variance
_SHADOW_CLIP_LEVEL: Final = 4
_HIGHLIGHT_CLIP_LEVEL: Final = 251
_BLOCK_PX: Final = 8
_BLOCK_REGULARISER_LEVELS: Final = 0.5


@dataclass(frozen=True)
class _Ramp:
    """Severity 0 at ``good``, 1 at ``bad``; linear, or linear in log(metric)."""

    good: float
    bad: float
    log: bool = False

    def severity(self, value: float) -> float:
        if self.log:
            value, good, bad = (math.log(max(v, 1e-9)) for v in (value, self.good, self.bad))
        else:
            good, bad = self.good, self.bad
        return min(1.0, max(0.0, (value - good) / (bad - good)))


# Anchors and weights of the score (part of the stage version: change them, bump it).
_SCORE_TERMS: Final[dict[str, tuple[_Ramp, float]]] = {
    "sharpness": (_Ramp(good=1.5, bad=0.2, log=True), 0.6),
    "dark": (_Ramp(good=80.0, bad=10.0), 0.6),
    "overexposed": (_Ramp(good=190.0, bad=250.0), 0.6),
    "highlights_clipped": (_Ramp(good=0.02, bad=0.4), 0.6),
    "contrast": (_Ramp(good=0.14, bad=0.02, log=True), 0.5),
    "noise": (_Ramp(good=2.0, bad=16.0, log=True), 0.5),
    "blockiness": (_Ramp(good=1.3, bad=2.5), 0.4),
    "resolution": (_Ramp(good=720.0, bad=32.0, log=True), 0.3),
}


@dataclass(frozen=True)
class QualityParams:
    """Flag thresholds and the quality gate. Luma values are 8-bit grey levels (0..255)."""

    min_side_px: int = 256
    """Shorter side below this -> flag ``low_res``."""
    unusable_below_side_px: int = 32
    """Shorter side below this -> ``usable=False`` (too tiny to process)."""
    uniform_below_luma_std_levels: float = 2.0
    """Luma standard deviation below this -> ``usable=False`` (blank/uniform image)."""
    analysis_max_side_px: int = 1024
    """Long side of the working copy for sharpness, exposure and contrast."""
    blurry_below_sharpness: float = 1.0
    """Sharpness (edge frequency, 1/px on the working copy) below this -> ``blurry``."""
    dark_below_luma_levels: float = 50.0
    """Mean luma below this -> ``dark``."""
    overexposed_above_luma_levels: float = 200.0
    """Mean luma above this -> ``overexposed``."""
    overexposed_above_clipped_frac: float = 0.10
    """Fraction of pixels with luma >= 251 above this -> ``overexposed``."""
    low_contrast_below_rms: float = 0.09
    """RMS contrast (luma std / 255) below this -> ``low_contrast``."""
    noisy_above_sigma_levels: float = 4.0
    """Estimated luma noise sigma above this -> ``noisy``."""
    blocky_above_ratio: float = 1.5
    """8x8 grid discontinuity ratio above this -> ``blocky``."""

    def __post_init__(self) -> None:
        own = type(self).__name__
        require(self.unusable_below_side_px >= 1, own, "unusable_below_side_px must be >= 1")
        require(
            self.min_side_px >= self.unusable_below_side_px,
            own,
            "min_side_px must be >= unusable_below_side_px",
        )
        require(self.analysis_max_side_px >= 64, own, "analysis_max_side_px must be >= 64")
        for key in (
            "uniform_below_luma_std_levels",
            "blurry_below_sharpness",
            "dark_below_luma_levels",
            "overexposed_above_luma_levels",
            "overexposed_above_clipped_frac",
            "low_contrast_below_rms",
            "noisy_above_sigma_levels",
            "blocky_above_ratio",
        ):
            require(getattr(self, key) >= 0, own, f"{key} must be >= 0")

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> QualityParams:
        return params_from_json(cls, data)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class QualityResult:
    score: float
    """0..100, higher is better."""
    flags: tuple[str, ...]
    """Subset of ``FLAGS``, in that order."""
    metrics: dict[str, float]
    """Raw metrics and the per-term sub-scores (``score_<term>``, 0..1)."""
    usable: bool
    """False: the quality gate trips (blank/uniform image, too tiny to process)."""
    unusable_reason: str | None

    def to_json(self) -> QualityOutput:
        return {
            "score": self.score,
            "flags": list(self.flags),
            "metrics": dict(self.metrics),
            "usable": self.usable,
            "unusable_reason": self.unusable_reason,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> QualityResult:
        own = cls.__name__
        require(isinstance(data, Mapping), own, "expected a JSON object")
        expected = ("score", "flags", "metrics", "usable", "unusable_reason")
        for key in data:
            require(key in expected, own, f"unknown key {key!r}; expected {', '.join(expected)}")
        for key in expected:
            require(key in data, own, f"missing key {key!r}")
        score, flags, metrics = data["score"], data["flags"], data["metrics"]
        usable, reason = data["usable"], data["unusable_reason"]
        if not is_number(score):
            raise PermanentError(f"{own}: 'score' must be a number, got {score!r}")
        if not isinstance(flags, list) or any(f not in FLAGS for f in flags):
            raise PermanentError(f"{own}: 'flags' must be a list of {', '.join(FLAGS)}")
        if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and is_number(v) for k, v in metrics.items()
        ):
            raise PermanentError(f"{own}: 'metrics' must map names to numbers")
        if not isinstance(usable, bool):
            raise PermanentError(f"{own}: 'usable' must be true or false, got {usable!r}")
        if reason is not None and not isinstance(reason, str):
            raise PermanentError(f"{own}: 'unusable_reason' must be a string or null")
        return cls(
            score=float(typing.cast(float, score)),
            flags=tuple(str(f) for f in flags),
            metrics={str(k): float(v) for k, v in metrics.items()},
            usable=usable,
            unusable_reason=reason,
        )


def check_rgb_image(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """``image`` as a C-contiguous HxWx3 uint8 array; ``PermanentError`` for anything else."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        got = getattr(image, "dtype", type(image).__name__)
        raise PermanentError(f"expected an RGB uint8 array, got {got}; decode with Pillow first")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise PermanentError(
            f"expected an HxWx3 RGB array, got shape {image.shape}; convert to RGB first"
        )
    return np.ascontiguousarray(image)


def _median_abs(values: NDArray[np.int16]) -> float:
    """Median of |values| (saturating at 255) from a 256-bin histogram, interpolated in-bin."""
    magnitude = cv2.convertScaleAbs(values)
    hist = cv2.calcHist([magnitude], [0], None, [256], [0, 256]).ravel()
    total = float(hist.sum())
    if total == 0:
        return 0.0
    cumulative = np.cumsum(hist)
    k = int(np.searchsorted(cumulative, total / 2.0))
    below = float(cumulative[k - 1]) if k > 0 else 0.0
    low = max(k - 0.5, 0.0)
    width = (k + 0.5) - low
    return low + width * (total / 2.0 - below) / max(float(hist[k]), 1.0)


def _noise_sigma(grey: NDArray[np.uint8]) -> float:
    """Robust noise sigma (grey levels): Immerkaer operator, median absolute response."""
    if min(grey.shape) < 3:
        return 0.0
    response = cv2.filter2D(grey, cv2.CV_16S, _IMMERKAER)[1:-1, 1:-1]
    return _MAD_TO_SIGMA * _median_abs(np.ascontiguousarray(response)) / _IMMERKAER_GAIN


def _grid_ratio(column_means: NDArray[np.float64]) -> float:
    """Strongest 8-px phase of neighbour differences over the mean of the other phases."""
    usable = len(column_means) - len(column_means) % _BLOCK_PX
    if usable < 2 * _BLOCK_PX:
        return 1.0
    phases = column_means[:usable].reshape(-1, _BLOCK_PX).mean(axis=0)
    strongest = int(np.argmax(phases))
    others = float(np.delete(phases, strongest).mean())
    reg = _BLOCK_REGULARISER_LEVELS
    return (float(phases[strongest]) + reg) / (others + reg)


def _blockiness(grey: NDArray[np.uint8]) -> float:
    """JPEG blocking: how much stronger edges are on one 8-px grid phase (1.0 = none)."""
    dx = cv2.absdiff(grey[:, 1:], grey[:, :-1])
    dy = cv2.absdiff(grey[1:, :], grey[:-1, :])
    col = cv2.reduce(dx, 0, cv2.REDUCE_AVG, dtype=cv2.CV_64F).ravel()
    row = cv2.reduce(dy, 1, cv2.REDUCE_AVG, dtype=cv2.CV_64F).ravel()
    return 0.5 * (_grid_ratio(np.asarray(col)) + _grid_ratio(np.asarray(row)))


def _sharpness(work: NDArray[np.uint8], noise_sigma: float) -> float:
    """Edge frequency sqrt(E[lap^2] / E[|grad|^2]) in 1/px, noise energy subtracted.

    Independent of brightness and contrast (both energies scale alike); falls as edges
    widen (blur). The expected noise energy of each operator is removed first, so noise
    does not read as detail.
    """
    pixels = work.astype(np.float32)
    lap = np.asarray(cv2.Laplacian(pixels, cv2.CV_32F, ksize=1), dtype=np.float32)
    gx = np.asarray(cv2.Sobel(pixels, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8), dtype=np.float32)
    gy = np.asarray(cv2.Sobel(pixels, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8), dtype=np.float32)
    noise_var = max(noise_sigma**2, _QUANTISATION_VAR)

    def energy(a: NDArray[np.float32]) -> float:
        mean, std = cv2.meanStdDev(a)
        return float(mean[0, 0] ** 2 + std[0, 0] ** 2)

    lap_energy = energy(lap) - _LAPLACIAN_NOISE_GAIN * noise_var
    grad_energy = energy(gx) + energy(gy) - _GRADIENT_NOISE_GAIN * noise_var
    if grad_energy <= 1e-6:
        return 0.0
    return math.sqrt(max(lap_energy, 0.0) / grad_energy)


def _luma_stats(work: NDArray[np.uint8]) -> dict[str, float]:
    hist = cv2.calcHist([work], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    total = float(hist.sum())
    levels = np.arange(256, dtype=np.float64)
    mean = float((hist * levels).sum() / total)
    var = float((hist * (levels - mean) ** 2).sum() / total)
    return {
        "brightness": mean,
        "luma_std": math.sqrt(var),
        "contrast_rms": math.sqrt(var) / 255.0,
        "shadows_clipped_frac": float(hist[: _SHADOW_CLIP_LEVEL + 1].sum() / total),
        "highlights_clipped_frac": float(hist[_HIGHLIGHT_CLIP_LEVEL:].sum() / total),
    }


def _working_copy(grey: NDArray[np.uint8], max_side_px: int) -> tuple[NDArray[np.uint8], float]:
    height, width = grey.shape
    scale = min(1.0, max_side_px / max(height, width))
    if scale >= 1.0:
        return grey, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), np.uint8), scale


def _score(metrics: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    inputs = {
        "sharpness": metrics["sharpness"],
        "dark": metrics["brightness"],
        "overexposed": metrics["brightness"],
        "highlights_clipped": metrics["highlights_clipped_frac"],
        "contrast": metrics["contrast_rms"],
        "noise": metrics["noise_sigma"],
        "blockiness": metrics["blockiness"],
        "resolution": metrics["min_side_px"],
    }
    factors = {
        term: 1.0 - weight * ramp.severity(inputs[term])
        for term, (ramp, weight) in _SCORE_TERMS.items()
    }
    # Dark, overexposed and clipped highlights are one "exposure" term: the worst counts.
    exposure = min(
        factors.pop("dark"), factors.pop("overexposed"), factors.pop("highlights_clipped")
    )
    factors["exposure"] = exposure
    return 100.0 * math.prod(factors.values()), factors


def _flags(metrics: Mapping[str, float], p: QualityParams) -> tuple[str, ...]:
    raised = {
        "blurry": metrics["sharpness"] < p.blurry_below_sharpness,
        "dark": metrics["brightness"] < p.dark_below_luma_levels,
        "overexposed": metrics["brightness"] > p.overexposed_above_luma_levels
        or metrics["highlights_clipped_frac"] > p.overexposed_above_clipped_frac,
        "low_contrast": metrics["contrast_rms"] < p.low_contrast_below_rms,
        "noisy": metrics["noise_sigma"] > p.noisy_above_sigma_levels,
        "low_res": metrics["min_side_px"] < p.min_side_px,
        "blocky": metrics["blockiness"] > p.blocky_above_ratio,
    }
    return tuple(flag for flag in FLAGS if raised[flag])


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in values.items()}


def assess_quality(image: NDArray[np.uint8], params: QualityParams | None = None) -> QualityResult:
    """Measure ``image`` (HxWx3 RGB uint8) and score it. Pure: no I/O, deterministic."""
    p = params or QualityParams()
    image = check_rgb_image(image)
    height, width = image.shape[:2]
    metrics: dict[str, float] = {
        "width_px": float(width),
        "height_px": float(height),
        "min_side_px": float(min(height, width)),
        "megapixels": width * height / 1e6,
    }
    if min(height, width) < p.unusable_below_side_px:
        return QualityResult(
            score=0.0,
            flags=("low_res",),
            metrics=_rounded(metrics),
            usable=False,
            unusable_reason=(
                f"image is {width}x{height} px; the shorter side must be at least "
                f"{p.unusable_below_side_px} px"
            ),
        )

    grey = np.asarray(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), dtype=np.uint8)
    work, scale = _working_copy(grey, p.analysis_max_side_px)
    metrics["analysis_scale"] = scale
    metrics.update(_luma_stats(work))
    metrics["noise_sigma"] = _noise_sigma(grey)
    work_noise = metrics["noise_sigma"] if scale == 1.0 else _noise_sigma(work)
    metrics["sharpness"] = _sharpness(work, work_noise)
    metrics["blockiness"] = _blockiness(grey)

    score, factors = _score(metrics)
    metrics.update({f"score_{term}": factor for term, factor in factors.items()})
    flags = _flags(metrics, p)
    usable, reason = True, None
    if metrics["luma_std"] < p.uniform_below_luma_std_levels:
        usable, score = False, 0.0
        reason = (
            f"image is blank/uniform: luma standard deviation {metrics['luma_std']:.2f} "
            f"< {p.uniform_below_luma_std_levels} grey levels"
        )
    return QualityResult(
        score=round(score, 2),
        flags=flags,
        metrics=_rounded(metrics),
        usable=usable,
        unusable_reason=reason,
    )
