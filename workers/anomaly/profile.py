"""Anomaly profiles: fit one from good images, save/load it safely, evaluate it.

A profile is one ``.npz`` file written by ``np.savez`` (no pickle; loaded with
``allow_pickle=False``) holding the memory bank, the block weights, the optional random
projection, the per-scale score normalisers and a JSON metadata record (feature config,
threshold, backbone weights sha256, image counts, created_at, version). The sha256 of
the file is the profile's identity: results record ``{name, version, sha256}``.

Threshold rule (see docs/anomaly.md): ``holdout_fraction`` of the fit images (at least
3) never enter the memory bank. Their score maps give the per-scale references; each of
them is then scored leave-one-out (references from the other held-out images, as a new
image would be) and ``threshold = max(max(those scores) + THRESHOLD_MARGIN, THRESHOLD_MARGIN)``,
so the threshold is always positive.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from imgpipe.errors import PermanentError
from workers.anomaly.metrics import auroc, confusion_at
from workers.anomaly.patchcore import (
    FeatureConfig,
    ScoreScales,
    extract_pooled,
    fuse_scales,
    greedy_coreset,
    layer_norms,
    make_projection,
    patch_features,
)
from workers.anomaly.scoring import backbone_for, distance_maps, score_images
from workers.models.base import sha256_file

__all__ = [
    "PROFILE_FORMAT",
    "THRESHOLD_MARGIN",
    "EvalReport",
    "Profile",
    "ProfileInfo",
    "evaluate_profile",
    "fit_profile",
    "load_profile",
]

PROFILE_FORMAT = "imgpipe-anomaly-profile"
PROFILE_FORMAT_VERSION = 1
THRESHOLD_MARGIN = 0.1
"""Added to the highest leave-one-out holdout score: 10% of a good image's worst spot."""
MIN_HOLDOUT_IMAGES = 3
MIN_BANK_IMAGES = 2
SCORE_BATCH = 8
_ARRAYS = ("memory_bank", "layer_scales", "projection", "score_reference", "meta")


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
    _on_device: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def record(self) -> dict[str, str]:
        """The ``models``-style identity stored with every result."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def bank_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory bank, its squared row norms) on ``device``, copied once per device."""
        key = str(device)
        if key not in self._on_device:
            bank = self.memory_bank.to(device)
            self._on_device[key] = (bank, (bank * bank).sum(dim=1))
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- saving and loading ---------------------------------------------------------------------
def _save(path: Path, arrays: dict[str, NDArray[Any]], meta: dict[str, Any]) -> str:
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


def _read(path: Path) -> Profile:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _ARRAYS if k not in data.files]
            if missing:
                raise PermanentError(f"{path} is not an anomaly profile (missing {missing})")
            arrays = {k: np.array(data[k]) for k in _ARRAYS}
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
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()
        }
        config = FeatureConfig(**kwargs)
        config.validate()
        projection = arrays["projection"]
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
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentError(f"anomaly profile {path} is malformed ({exc!r}); refit it") from exc


# -- scoring ----------------------------------------------------------------------------------
# -- fitting -----------------------------------------------------------------------------------
def _loo_scores(maps: torch.Tensor) -> list[float]:
    """Each held-out image's score with references from the other held-out images."""
    scores = []
    for i in range(maps.shape[0]):
        others = torch.cat([maps[:i], maps[i + 1 :]])
        scales = ScoreScales.from_good_maps(others)
        scores.append(float(fuse_scales(maps[i : i + 1], scales).max()))
    return scores


def _split_holdout(
    images: Sequence[NDArray[np.uint8]],
    holdout_images: Sequence[NDArray[np.uint8]] | None,
    holdout_fraction: float,
    seed: int,
) -> tuple[list[NDArray[np.uint8]], list[NDArray[np.uint8]]]:
    """(memory-bank images, held-out images)."""
    if holdout_images is not None:
        bank_images, holdout = list(images), list(holdout_images)
        if len(holdout) < MIN_HOLDOUT_IMAGES or len(bank_images) < MIN_BANK_IMAGES:
            raise PermanentError(
                f"fitting needs at least {MIN_BANK_IMAGES} images and {MIN_HOLDOUT_IMAGES} "
                f"held-out images, got {len(bank_images)} and {len(holdout)}"
            )
        return bank_images, holdout
    n_holdout = max(MIN_HOLDOUT_IMAGES, round(len(images) * holdout_fraction))
    if len(images) - n_holdout < MIN_BANK_IMAGES:
        raise PermanentError(
            f"fitting needs at least {MIN_HOLDOUT_IMAGES + MIN_BANK_IMAGES} good images "
            f"({MIN_HOLDOUT_IMAGES} are held out to set the threshold), got {len(images)}"
        )
    order = np.random.default_rng(seed).permutation(len(images))
    return [images[i] for i in order[n_holdout:]], [images[i] for i in order[:n_holdout]]


ProgressFn = Callable[[int, int], None]
"""Called as ``progress(images_done, images_total)`` after each batch of images."""


def _no_progress(_done: int, _total: int) -> None:
    return None


def fit_profile(
    images: Sequence[NDArray[np.uint8]],
    out_path: Path,
    *,
    name: str,
    device: str = "cpu",
    holdout_fraction: float = 0.2,
    coreset_fraction: float = 0.1,
    seed: int = 0,
    config: FeatureConfig | None = None,
    holdout_images: Sequence[NDArray[np.uint8]] | None = None,
    progress: ProgressFn = _no_progress,
) -> ProfileInfo:
    """Fit a profile from good images (HxWx3 RGB uint8) and write it to ``out_path``.

    ``holdout_images`` (at least 3 more good images, e.g. from another shoot) calibrate the
    threshold instead of a seeded random ``holdout_fraction`` of ``images``; pass them when
    the fit images overlap or are near-duplicates (crops of one photo, burst shots), since
    a held-out image that the memory bank has nearly seen scores too low.
    """
    started = time.perf_counter()
    config = config or FeatureConfig()
    config.validate()
    if not 0.0 < holdout_fraction < 1.0 or not 0.0 < coreset_fraction <= 1.0:
        raise PermanentError(
            f"holdout_fraction must be in (0, 1) and coreset_fraction in (0, 1], got "
            f"{holdout_fraction} and {coreset_fraction}"
        )
    bank_images, holdout = _split_holdout(images, holdout_images, holdout_fraction, seed)
    n_holdout = len(holdout)
    backbone = backbone_for(device)
    total, done = len(bank_images) + n_holdout, 0
    with torch.inference_mode():
        pooled_chunks = []
        for i in range(0, len(bank_images), SCORE_BATCH):
            chunk = bank_images[i : i + SCORE_BATCH]
            pooled_chunks.append(extract_pooled(backbone, chunk, config))
            done += len(chunk)
            progress(done, total)
        pooled = [torch.cat(parts) for parts in zip(*pooled_chunks, strict=True)]
        scales = layer_norms(pooled)
        projection = None
        if config.projection_dim:
            in_dim = sum(p.shape[1] for p in pooled)
            projection = make_projection(in_dim, config.projection_dim, seed).to(backbone.device)
        feats = patch_features(pooled, scales, projection)
        feats = feats.reshape(-1, feats.shape[-1])
        count = max(1, round(feats.shape[0] * coreset_fraction))
        bank = feats[greedy_coreset(feats, count, seed)].contiguous()
        map_chunks = []
        for i in range(0, len(holdout), SCORE_BATCH):
            chunk = holdout[i : i + SCORE_BATCH]
            map_chunks.append(distance_maps(backbone, chunk, config, scales, projection, bank))
            done += len(chunk)
            progress(done, total)
        maps = torch.cat(map_chunks)
        score_scales = ScoreScales.from_good_maps(maps)
        holdout_scores = _loo_scores(maps)
    threshold = max(max(holdout_scores) + THRESHOLD_MARGIN, THRESHOLD_MARGIN)

    created = datetime.now(UTC)
    version = created.strftime("%Y%m%dT%H%M%SZ")
    meta: dict[str, Any] = {
        "format": PROFILE_FORMAT,
        "format_version": PROFILE_FORMAT_VERSION,
        "name": name,
        "version": version,
        "created_at": created.isoformat(),
        "config": asdict(config),
        "threshold": threshold,
        "threshold_rule": f"max(leave-one-out holdout scores) + {THRESHOLD_MARGIN}, at least that",
        "holdout_scores": holdout_scores,
        "backbone": {k: v for k, v in backbone.info().to_json().items() if k != "device"},
        "normalisation": "per-image standardisation" if config.standardize else "none",
        "fit_images": len(bank_images) + n_holdout,
        "bank_images": len(bank_images),
        "holdout_images": n_holdout,
        "coreset_fraction": coreset_fraction,
        "memory_bank_size": int(bank.shape[0]),
        "seed": seed,
    }
    arrays: dict[str, NDArray[Any]] = {
        "memory_bank": bank.cpu().numpy().astype(np.float32),
        "layer_scales": scales.cpu().numpy().astype(np.float32),
        "projection": (
            projection.cpu().numpy() if projection is not None else np.zeros((0, 0), np.float32)
        ),
        "score_reference": score_scales.reference.cpu().numpy(),
    }
    sha = _save(Path(out_path), arrays, meta)
    return ProfileInfo(
        path=str(out_path),
        name=name,
        version=version,
        sha256=sha,
        threshold=threshold,
        fit_images=len(bank_images) + n_holdout,
        bank_images=len(bank_images),
        holdout_images=n_holdout,
        memory_bank_size=int(bank.shape[0]),
        holdout_scores=holdout_scores,
        fit_s=time.perf_counter() - started,
    )


def evaluate_profile(
    path: Path,
    good: Sequence[NDArray[np.uint8]],
    bad: Sequence[NDArray[np.uint8]],
    device: str = "cpu",
    progress: ProgressFn = _no_progress,
) -> EvalReport:
    """Score labelled good and bad images with the profile at ``path``."""
    if not good or not bad:
        raise PermanentError("evaluation needs at least one good and one bad image")
    profile = load_profile(path)
    backbone = backbone_for(device)
    started = time.perf_counter()
    scores: list[list[float]] = []
    total, done = len(good) + len(bad), 0
    for group in (good, bad):
        group_scores: list[float] = []
        for i in range(0, len(group), SCORE_BATCH):
            chunk = group[i : i + SCORE_BATCH]
            group_scores.extend(s.score for s in score_images(profile, chunk, backbone))
            done += len(chunk)
            progress(done, total)
        scores.append(group_scores)
    elapsed_ms = (time.perf_counter() - started) * 1000
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
    )
