"""Fitting an anomaly profile from good images (PatchCore-style memory bank).

Threshold rule (see docs/anomaly.md): ``holdout_fraction`` of the fit images (at least
3) never enter the memory bank. Their score maps give the per-scale references; each of
them is then scored leave-one-out (references from the other held-out images, as a new
image would be) and ``threshold = max(max(those scores) + THRESHOLD_MARGIN, THRESHOLD_MARGIN)``,
so the threshold is always positive. The file format and loading: profile.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from imgpipe.errors import PermanentError
from workers.anomaly.fine import fine_descriptors
from workers.anomaly.patchcore import (
    FeatureConfig,
    ScoreScales,
    extract_features,
    feature_scales,
    fuse_scales,
    greedy_coreset,
    layer_norms,
    make_projection,
    patch_features,
    search_matrix,
)
from workers.anomaly.profile import (
    MIN_BANK_IMAGES,
    MIN_HOLDOUT_IMAGES,
    PROFILE_FORMAT,
    PROFILE_FORMAT_VERSION,
    SCORE_BATCH,
    THRESHOLD_MARGIN,
    ProfileInfo,
    ProgressFn,
    no_progress,
    write_profile_file,
)
from workers.anomaly.region import region_descriptors
from workers.anomaly.scoring import backbone_for, distance_maps, largest_reference_maps
from workers.anomaly.statistics import COLOUR_REFERENCE_SIZE, colour_deviation, colour_map_reference
from workers.models.efficientnet_lite0 import EfficientNetLite0Features

__all__ = ["DEFAULT_CORESET_FRACTION", "fit_profile", "whitening_matrix"]

DEFAULT_CORESET_FRACTION = 0.1
"""Share of the fit patches kept in the memory bank (docs/anomaly.md "Recipe": 5 % halves
the search at -0.003 mean AUROC on the suite)."""


def _loo_scores(
    maps: torch.Tensor, colour_reference: float | None, largest: Sequence[int]
) -> list[float]:
    """Each held-out image's score with references from the other held-out images."""
    scores = []
    for i in range(maps.shape[0]):
        others = torch.cat([maps[:i], maps[i + 1 :]])
        scales = ScoreScales.from_good_maps(others, colour_reference, largest)
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


def fit_profile(
    images: Sequence[NDArray[np.uint8]],
    out_path: Path,
    *,
    name: str,
    device: str = "cpu",
    holdout_fraction: float = 0.2,
    coreset_fraction: float = DEFAULT_CORESET_FRACTION,
    seed: int = 0,
    config: FeatureConfig | None = None,
    holdout_images: Sequence[NDArray[np.uint8]] | None = None,
    progress: ProgressFn = no_progress,
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
    backbone = backbone_for(device)
    fitted = _fit_bank(backbone, bank_images, holdout, config, coreset_fraction, seed, progress)
    meta = _meta(name, config, fitted, backbone, bank_images, holdout, coreset_fraction, seed)
    sha = write_profile_file(Path(out_path), fitted.arrays(), meta)
    return ProfileInfo(
        path=str(out_path),
        name=name,
        version=meta["version"],
        sha256=sha,
        threshold=fitted.threshold,
        fit_images=meta["fit_images"],
        bank_images=meta["bank_images"],
        holdout_images=meta["holdout_images"],
        memory_bank_size=meta["memory_bank_size"],
        holdout_scores=fitted.holdout_scores,
        fit_s=time.perf_counter() - started,
    )


def _meta(
    name: str,
    config: FeatureConfig,
    fitted: _Fitted,
    backbone: EfficientNetLite0Features,
    bank_images: Sequence[NDArray[np.uint8]],
    holdout: Sequence[NDArray[np.uint8]],
    coreset_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """The profile file's JSON metadata record."""
    created = datetime.now(UTC)
    return {
        "format": PROFILE_FORMAT,
        "format_version": PROFILE_FORMAT_VERSION,
        "name": name,
        "version": created.strftime("%Y%m%dT%H%M%SZ"),
        "created_at": created.isoformat(),
        "config": asdict(config),
        "threshold": fitted.threshold,
        "threshold_rule": f"max(leave-one-out holdout scores) + {THRESHOLD_MARGIN}, at least that",
        "holdout_scores": fitted.holdout_scores,
        "backbone": {k: v for k, v in backbone.info().to_json().items() if k != "device"},
        "normalisation": _normalisation(config),
        "fit_images": len(bank_images) + len(holdout),
        "bank_images": len(bank_images),
        "holdout_images": len(holdout),
        "coreset_fraction": coreset_fraction,
        "memory_bank_size": int(fitted.bank.shape[0]),
        "region_bank_size": 0 if fitted.region_bank is None else int(fitted.region_bank.shape[0]),
        "fine_bank_size": 0 if fitted.fine_bank is None else int(fitted.fine_bank.shape[0]),
        "seed": seed,
    }


def _normalisation(config: FeatureConfig) -> str:
    """The input normalisation in words, for people reading the profile's metadata."""
    steps = []
    if config.flatten_px > 0:
        steps.append(f"illumination flattened (sigma {config.flatten_px:g} px)")
    if config.standardize:
        steps.append(
            "per-channel standardisation" if config.per_channel else "per-image standardisation"
        )
    return ", ".join(steps) or "none"


@dataclass(frozen=True)
class _Fitted:
    """What fitting computes: the tensors a profile file stores, and its threshold."""

    bank: torch.Tensor
    region_bank: torch.Tensor | None
    fine_bank: torch.Tensor | None
    fine_scales: torch.Tensor | None
    scales: torch.Tensor
    projection: torch.Tensor | None
    score_scales: ScoreScales
    holdout_scores: list[float]

    @property
    def threshold(self) -> float:
        return max(max(self.holdout_scores) + THRESHOLD_MARGIN, THRESHOLD_MARGIN)

    def arrays(self) -> dict[str, NDArray[Any]]:
        projection = self.projection
        return {
            "memory_bank": self.bank.cpu().numpy().astype(np.float32),
            "layer_scales": self.scales.cpu().numpy().astype(np.float32),
            "projection": (
                projection.cpu().numpy() if projection is not None else np.zeros((0, 0), np.float32)
            ),
            "score_reference": self.score_scales.reference.cpu().numpy(),
            "region_bank": _array_or_empty(self.region_bank, 2),
            "fine_bank": _array_or_empty(self.fine_bank, 2),
            "fine_scales": _array_or_empty(self.fine_scales, 1),
        }


def _array_or_empty(tensor: torch.Tensor | None, ndim: int) -> NDArray[np.float32]:
    """``tensor`` as a float32 array, or an empty one of ``ndim`` dimensions."""
    if tensor is None:
        return np.zeros((0,) * ndim, np.float32)
    return tensor.cpu().numpy().astype(np.float32)


def whitening_matrix(rows: torch.Tensor, regularisation: float) -> torch.Tensor:
    """D x D matrix ``W`` with ``W W^T = (C + regularisation * mean(diag C) * I)^-1`` for
    the covariance ``C`` of ``rows`` (M x D): ``|(x - y) W|`` is the regularised
    Mahalanobis distance between rows ``x`` and ``y`` (FeatureConfig ``whiten``). Computed
    in float64, returned in the rows' dtype and device."""
    x = rows.double()
    centred = x - x.mean(dim=0)
    cov = centred.T @ centred / max(1, x.shape[0] - 1)
    ridge = regularisation * cov.diagonal().mean().clamp_min(1e-12)
    cov = cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    factor: torch.Tensor = torch.linalg.cholesky(torch.linalg.inv(cov))
    return factor.to(rows.dtype)


def _coreset(rows: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A greedy k-center coreset of ``fraction`` of ``rows`` (M x D), at least one row."""
    count = max(1, round(rows.shape[0] * fraction))
    return rows[greedy_coreset(rows, count, seed)].contiguous()


def _fit_bank(
    backbone: EfficientNetLite0Features,
    bank_images: Sequence[NDArray[np.uint8]],
    holdout: Sequence[NDArray[np.uint8]],
    config: FeatureConfig,
    coreset_fraction: float,
    seed: int,
    progress: ProgressFn,
) -> _Fitted:
    """The memory bank (a coreset of the bank images' patch features) and the held-out
    images' leave-one-out scores against it."""
    total, done = len(bank_images) + len(holdout), 0
    with torch.inference_mode():
        pooled_chunks, fine_chunks = [], []
        for i in range(0, len(bank_images), SCORE_BATCH):
            chunk = bank_images[i : i + SCORE_BATCH]
            extracted = extract_features(backbone, chunk, config)
            pooled_chunks.append(extracted.pooled)
            fine_chunks.append(extracted.fine)
            done += len(chunk)
            progress(done, total)
        pooled = [torch.cat(parts) for parts in zip(*pooled_chunks, strict=True)]
        fine = [torch.cat(parts) for parts in zip(*fine_chunks, strict=True)]
        scales = feature_scales(pooled, config)
        projection = None
        if config.projection_dim:
            in_dim = sum(p.shape[1] for p in pooled)
            projection = make_projection(in_dim, config.projection_dim, seed).to(backbone.device)
        feats = patch_features(pooled, scales, projection, config)
        if config.whiten > 0:
            b = config.border_cells
            inner = feats[:, b : feats.shape[1] - b, b : feats.shape[2] - b]
            whitening = whitening_matrix(inner.reshape(-1, inner.shape[-1]), config.whiten)
            feats = feats @ whitening
            projection = whitening if projection is None else projection @ whitening
        feats = feats.reshape(-1, feats.shape[-1])
        colour_reference = None
        if config.colour_map:
            deviation = colour_deviation(pooled[-1], config, scales[-COLOUR_REFERENCE_SIZE:])
            colour_reference = colour_map_reference(deviation, config.border_cells)
        bank = _coreset(feats, coreset_fraction, seed)
        region_bank = None
        if config.region_cells:
            regions = region_descriptors(pooled, scales, config)
            region_bank = _coreset(regions.reshape(-1, regions.shape[-1]), coreset_fraction, seed)
        region = None if region_bank is None else (region_bank, search_matrix(region_bank))
        fine_bank, fine_scales, fine_search = None, None, None
        if config.fine_blocks:
            fine_scales = layer_norms(fine)
            rows = fine_descriptors(fine, fine_scales, config)
            fine_bank = _coreset(rows.reshape(-1, rows.shape[-1]), config.fine_coreset, seed)
            fine_search = (fine_scales, fine_bank, search_matrix(fine_bank))
        del fine, fine_chunks
        map_chunks, search = [], search_matrix(bank)
        for i in range(0, len(holdout), SCORE_BATCH):
            chunk = holdout[i : i + SCORE_BATCH]
            maps = distance_maps(
                backbone, chunk, config, scales, projection, bank, search, region, fine_search
            )
            map_chunks.append(maps)
            done += len(chunk)
            progress(done, total)
        maps = torch.cat(map_chunks)  # N x S x G x G
        largest = largest_reference_maps(config)
        return _Fitted(
            bank,
            region_bank,
            fine_bank,
            fine_scales,
            scales,
            projection,
            ScoreScales.from_good_maps(maps, colour_reference, largest),
            _loo_scores(maps, colour_reference, largest),
        )
