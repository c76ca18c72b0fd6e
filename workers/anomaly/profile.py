"""Anomaly profiles: save/load one safely, evaluate it (fitting: workers/anomaly/fit.py).

A profile is one ``.npz`` file written by ``np.savez`` (no pickle; loaded with
``allow_pickle=False``) holding the memory bank, the block weights, the optional random
projection, the per-scale score normalisers and a JSON metadata record (feature config,
threshold, backbone weights sha256, image counts, created_at, version). The sha256 of
the file is the profile's identity: results record ``{name, version, sha256}``.

Threshold rule: workers/anomaly/fit.py.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from imgpipe.errors import PermanentError
from workers.anomaly.metrics import Confusion, auroc, confusion_at, pixel_auroc
from workers.anomaly.patchcore import (
    FeatureConfig,
    ScoreScales,
    search_matrix,
)
from workers.anomaly.scoring import backbone_for, score_images
from workers.models.base import sha256_file

__all__ = [
    "PROFILE_FORMAT",
    "THRESHOLD_MARGIN",
    "EvalReport",
    "Profile",
    "ProfileInfo",
    "evaluate_profile",
    "load_profile",
    "write_profile_file",
]

PROFILE_FORMAT = "imgpipe-anomaly-profile"
PROFILE_FORMAT_VERSION = 1
THRESHOLD_MARGIN = 0.1
"""Added to the highest leave-one-out holdout score: 10% of a good image's worst spot."""
LEGACY_CONFIG: dict[str, Any] = {
    "per_channel": False,
    "flatten_px": 0.0,
    "knn": 1,
    "border_cells": 0,
    "stats_weight": 0.0,
    "stats_cells": 3,
    "stats_scaling": "norm",
    "colour_map": False,
    "extremes_weight": 0.0,
    "region_cells": 0,
    "fine_blocks": (),
    "whiten": 0.0,
}
"""What profiles written before these FeatureConfig fields existed were fitted with."""
MIN_HOLDOUT_IMAGES = 3
MIN_BANK_IMAGES = 2
SCORE_BATCH = 8
_ARRAYS = ("memory_bank", "layer_scales", "projection", "score_reference", "meta")
_OPTIONAL_ARRAYS = ("region_bank", "fine_bank", "fine_scales")
"""Arrays a profile has only with the recipe part that needs them (absent in older files)."""


ProgressFn = Callable[[int, int], None]
"""Called as ``progress(images_done, images_total)`` after each batch of images."""


def no_progress(_done: int, _total: int) -> None:
    return None


@dataclass(frozen=True)
class Profile:
    path: Path
    sha256: str
    name: str
    version: str
    created_at: str
    config: FeatureConfig
    threshold: float
    backbone: dict[str, str]
    fit_images: int
    memory_bank: torch.Tensor
    layer_scales: torch.Tensor
    projection: torch.Tensor | None
    score_scales: ScoreScales
    meta: dict[str, Any]
    region_bank: torch.Tensor | None = None
    """Memory bank of fit regions (``FeatureConfig.region_cells``); None when off."""
    fine_bank: torch.Tensor | None = None
    """Memory bank of fit fine descriptors (``FeatureConfig.fine_blocks``); None when off."""
    fine_scales: torch.Tensor | None = None
    """Mean norm of each fine block on the fit set; None when off."""
    _on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def record(self) -> dict[str, str]:
        """The ``models``-style identity stored with every result."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def bank_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory bank, its ``patchcore.search_matrix``) on ``device``, made once per device."""
        return self._cached_on(device, "patch", self.memory_bank)

    def region_bank_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(region memory bank, its search matrix) on ``device``; None when off."""
        if self.region_bank is None:
            return None
        return self._cached_on(device, "region", self.region_bank)

    def fine_bank_on(
        self, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(fine block scales, fine memory bank, its search matrix) on ``device``; None when
        off."""
        if self.fine_bank is None or self.fine_scales is None:
            return None
        bank, search = self._cached_on(device, "fine", self.fine_bank)
        return self.fine_scales.to(device), bank, search

    def _cached_on(
        self, device: torch.device, kind: str, bank: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = f"{kind}:{device}"
        if key not in self._on_device:
            moved = bank.to(device)
            self._on_device[key] = (moved, search_matrix(moved))
        return self._on_device[key]


@dataclass(frozen=True)
class ProfileInfo:
    path: str
    name: str
    version: str
    sha256: str
    threshold: float
    fit_images: int
    bank_images: int
    holdout_images: int
    memory_bank_size: int
    holdout_scores: list[float]
    fit_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalReport:
    profile: dict[str, str]
    auroc: float
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    good_scores: list[float]
    bad_scores: list[float]
    score_ms_per_image: float
    pixel_auroc: float | None = None
    """Heat map against defect masks (``metrics.pixel_auroc``); None without masks."""

    def to_json(self) -> dict[str, Any]:
        """The fields plus n_good, n_bad, precision, recall and false_positive_rate."""
        counts = Confusion(tp=self.tp, fp=self.fp, tn=self.tn, fn=self.fn)
        return {
            "profile": dict(self.profile),
            "auroc": self.auroc,
            "pixel_auroc": self.pixel_auroc,
            "threshold": self.threshold,
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
            "n_good": len(self.good_scores),
            "n_bad": len(self.bad_scores),
            "precision": counts.precision,
            "recall": counts.recall,
            "false_positive_rate": counts.false_positive_rate,
            "score_ms_per_image": self.score_ms_per_image,
            "good_scores": list(self.good_scores),
            "bad_scores": list(self.bad_scores),
        }


# -- saving and loading ---------------------------------------------------------------------
def write_profile_file(path: Path, arrays: dict[str, NDArray[Any]], meta: dict[str, Any]) -> str:
    """Write atomically (temp file + rename); returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_bytes = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            payload: dict[str, Any] = {"meta": meta_bytes, **arrays}
            np.savez(fh, **payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(path)


_cache: dict[Path, tuple[tuple[int, int], Profile]] = {}
_cache_lock = threading.Lock()


def load_profile(path: Path | str, *, use_cache: bool = True) -> Profile:
    """Load and validate a profile; cached per process until the file changes."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise PermanentError(
            f"anomaly profile {path} does not exist; fit one with "
            "`imgpipe anomaly fit PROFILE IMAGES...` or fix the stage's `profile` parameter"
        ) from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        hit = _cache.get(path)
        if use_cache and hit is not None and hit[0] == stamp:
            return hit[1]
    profile = _read(path)
    with _cache_lock:
        _cache[path] = (stamp, profile)
    return profile


def _tensor_or_none(array: NDArray[Any]) -> torch.Tensor | None:
    return torch.from_numpy(array.astype(np.float32)) if array.size else None


def _read(path: Path) -> Profile:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _ARRAYS if k not in data.files]
            if missing:
                raise PermanentError(f"{path} is not an anomaly profile (missing {missing})")
            arrays = {
                k: np.array(data[k]) for k in (*_ARRAYS, *_OPTIONAL_ARRAYS) if k in data.files
            }
        meta = json.loads(arrays["meta"].tobytes().decode())
    except PermanentError:
        raise
    except Exception as exc:
        raise PermanentError(f"cannot read anomaly profile {path}: {exc}; refit it") from exc
    if meta.get("format") != PROFILE_FORMAT or meta.get("format_version") != PROFILE_FORMAT_VERSION:
        raise PermanentError(
            f"{path} has format {meta.get('format')!r} v{meta.get('format_version')}, expected "
            f"{PROFILE_FORMAT!r} v{PROFILE_FORMAT_VERSION}; refit the profile with this version"
        )
    try:
        config = FeatureConfig.from_json({**LEGACY_CONFIG, **meta["config"]})
        config.validate()
        projection = arrays["projection"]
        region = arrays.get("region_bank", np.zeros((0, 0), np.float32))
        if config.region_cells and not region.size:
            raise ValueError("region_cells is set but the file has no region_bank")
        fine_bank = arrays.get("fine_bank", np.zeros((0, 0), np.float32))
        fine_scales = arrays.get("fine_scales", np.zeros(0, np.float32))
        if config.fine_blocks and (
            not fine_bank.size or fine_scales.size != len(config.fine_blocks)
        ):
            raise ValueError("fine_blocks is set but the file has no fine_bank or fine_scales")
        return Profile(
            path=path,
            sha256=sha256_file(path),
            name=str(meta["name"]),
            version=str(meta["version"]),
            created_at=str(meta["created_at"]),
            config=config,
            threshold=float(meta["threshold"]),
            backbone={k: str(v) for k, v in meta["backbone"].items()},
            fit_images=int(meta["fit_images"]),
            memory_bank=torch.from_numpy(arrays["memory_bank"].astype(np.float32)),
            layer_scales=torch.from_numpy(arrays["layer_scales"].astype(np.float32)),
            projection=(
                torch.from_numpy(projection.astype(np.float32)) if projection.size else None
            ),
            score_scales=ScoreScales(
                reference=torch.from_numpy(arrays["score_reference"].astype(np.float32))
            ),
            meta=meta,
            region_bank=_tensor_or_none(region),
            fine_bank=_tensor_or_none(fine_bank),
            fine_scales=_tensor_or_none(fine_scales),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentError(f"anomaly profile {path} is malformed ({exc!r}); refit it") from exc


# -- evaluating ------------------------------------------------------------------------------
def _check_masks(bad: Sequence[NDArray[np.uint8]], masks: Sequence[NDArray[np.bool_]]) -> None:
    if len(masks) != len(bad):
        raise PermanentError(f"{len(masks)} defect masks for {len(bad)} bad images; give one each")
    for i, (image, mask) in enumerate(zip(bad, masks, strict=True)):
        if mask.shape != image.shape[:2]:
            raise PermanentError(
                f"defect mask {i} is {mask.shape[1]}x{mask.shape[0]} but bad image {i} is "
                f"{image.shape[1]}x{image.shape[0]}; resize the mask to its image"
            )
    if not any(mask.any() for mask in masks):
        raise PermanentError("the defect masks mark no pixel; mark the defects (nonzero pixels)")


def evaluate_profile(
    path: Path,
    good: Sequence[NDArray[np.uint8]],
    bad: Sequence[NDArray[np.uint8]],
    device: str = "cpu",
    progress: ProgressFn = no_progress,
    bad_masks: Sequence[NDArray[np.bool_]] | None = None,
) -> EvalReport:
    """Score labelled good and bad images with the profile at ``path``.

    With ``bad_masks`` (one H x W bool array per bad image, True = defect) the report also
    has the pixel AUROC of the heat maps, good images counting as defect-free.
    ``score_ms_per_image`` is the steady-state cost: one warm-up call is not timed.
    """
    if not good or not bad:
        raise PermanentError("evaluation needs at least one good and one bad image")
    if bad_masks is not None:
        _check_masks(bad, bad_masks)
    profile = load_profile(path)
    backbone = backbone_for(device)
    # one untimed call first: the first forward pass in a process builds the convolution
    # kernels for its shape (about 2x a steady call on a 2-vCPU Xeon), and a CLI run on
    # a few dozen images would otherwise report that start-up as the per-image cost
    score_images(profile, good[:1], backbone)
    started = time.perf_counter()
    scores: list[list[float]] = []
    heatmaps: list[NDArray[np.float32]] = []
    total, done = len(good) + len(bad), 0
    for group in (good, bad):
        group_scores: list[float] = []
        for i in range(0, len(group), SCORE_BATCH):
            chunk = group[i : i + SCORE_BATCH]
            scored = score_images(profile, chunk, backbone)
            group_scores.extend(s.score for s in scored)
            if bad_masks is not None:
                heatmaps.extend(s.heatmap for s in scored)
            done += len(chunk)
            progress(done, total)
        scores.append(group_scores)
    elapsed_ms = (time.perf_counter() - started) * 1000
    pixel = None
    if bad_masks is not None:
        good_masks = [np.zeros(image.shape[:2], bool) for image in good]
        pixel = pixel_auroc(heatmaps, [*good_masks, *bad_masks])
    counts = confusion_at(scores[0], scores[1], profile.threshold)
    return EvalReport(
        profile=profile.record(),
        auroc=auroc(scores[0], scores[1]),
        threshold=profile.threshold,
        tp=counts.tp,
        fp=counts.fp,
        tn=counts.tn,
        fn=counts.fn,
        good_scores=scores[0],
        bad_scores=scores[1],
        score_ms_per_image=elapsed_ms / max(1, len(good) + len(bad)),
        pixel_auroc=pixel,
    )
