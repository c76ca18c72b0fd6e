"""Scoring images against a loaded profile (one backbone forward pass per call)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from imgpipe.errors import PermanentError
from workers.anomaly.fine import fine_distances
from workers.anomaly.patchcore import (
    FeatureConfig,
    extract_features,
    fuse_scales,
    multiscale_maps,
    nearest_distances,
    patch_features,
)
from workers.anomaly.region import region_distances
from workers.anomaly.statistics import COLOUR_REFERENCE_SIZE, colour_deviation
from workers.models.efficientnet_lite0 import EfficientNetLite0Features, default_weights_path
from workers.models.registry import cached_model, model_precision

if TYPE_CHECKING:
    from workers.anomaly.profile import Profile

__all__ = [
    "ImageScore",
    "backbone_for",
    "distance_maps",
    "largest_reference_maps",
    "score_images",
]


def backbone_for(device: str) -> EfficientNetLite0Features:
    """The process-wide EfficientNet-Lite0 feature extractor on ``device``."""
    path = default_weights_path()
    precision = model_precision()
    key = f"{EfficientNetLite0Features.name}:{path}:{device}:{precision}"
    model = cached_model(
        key, lambda: EfficientNetLite0Features(path, device=device, precision=precision)
    )
    return cast(EfficientNetLite0Features, model)


@dataclass(frozen=True)
class ImageScore:
    score: float
    heatmap: NDArray[np.float32]
    """G x G fused z-score map (the profile's grid); its max is ``score``."""


def _check_backbone(profile: Profile, backbone: EfficientNetLite0Features) -> None:
    if backbone.weights_sha256 != profile.backbone["weights_sha256"]:
        raise PermanentError(
            f"profile {profile.path} was fitted with {profile.backbone['name']} weights "
            f"{profile.backbone['weights_sha256']} but this worker has {backbone.weights_sha256}; "
            "refit the profile with the installed weights"
        )


def largest_reference_maps(config: FeatureConfig) -> tuple[int, ...]:
    """Indices of the :func:`distance_maps` maps whose score reference is the largest
    held-out maximum (``ScoreScales.from_good_maps``): the region map, which follows the
    distance scales."""
    return (len(config.score_scales),) if config.region_cells else ()


def distance_maps(
    backbone: EfficientNetLite0Features,
    images: Sequence[NDArray[np.uint8]],
    config: FeatureConfig,
    layer_scales: torch.Tensor,
    projection: torch.Tensor | None,
    bank: torch.Tensor,
    search: torch.Tensor | None = None,
    region_bank: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    fine_bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """N x S x G x G maps (one forward pass): the multiscale nearest-neighbour distances,
    then with ``region_cells`` the region distances (``region_bank``: the bank and its
    ``patchcore.search_matrix`` or None), with ``fine_blocks`` the fine distances
    (``fine_bank``: the fine blocks' scales, the bank and its search matrix or None), then
    with ``colour_map`` the colour deviation. ``search``: the patch bank's search matrix
    or None."""
    extracted = extract_features(backbone, images, config)
    pooled = extracted.pooled
    feats = patch_features(pooled, layer_scales, projection, config)
    b = config.border_cells
    if b > 0:  # edge cells are not searched: multiscale_maps copies their inner neighbours
        feats = feats[:, b:-b, b:-b]
    n, g, _, d = feats.shape
    dist = nearest_distances(feats.reshape(-1, d), bank, search, config.knn).reshape(n, g, g)
    maps = multiscale_maps(F.pad(dist, (b, b, b, b)), config.score_scales, b)
    if config.region_cells:
        if region_bank is None:
            raise ValueError("region_cells is set: distance_maps needs the region bank")
        region = region_distances(pooled, layer_scales, config, *region_bank)
        maps = torch.cat([maps, region[:, None]], dim=1)
    if config.fine_blocks:
        if fine_bank is None:
            raise ValueError("fine_blocks is set: distance_maps needs the fine bank")
        scales, bank_rows, rows_search = fine_bank
        fine = fine_distances(extracted.fine, scales, config, bank_rows, rows_search)
        maps = torch.cat([maps, fine[:, None]], dim=1)
    if config.colour_map:  # one more map: local colour against the fit set's
        colour = colour_deviation(pooled[-1], config, layer_scales[-COLOUR_REFERENCE_SIZE:])
        maps = torch.cat([maps, multiscale_maps(colour, (1,), b)], dim=1)
    return maps


def score_images(
    profile: Profile, images: Sequence[NDArray[np.uint8]], backbone: EfficientNetLite0Features
) -> list[ImageScore]:
    """Score ``images`` (HxWx3 RGB uint8) against ``profile`` in one forward pass."""
    if not images:
        return []
    _check_backbone(profile, backbone)
    bank, search = profile.bank_on(backbone.device)
    region_bank = profile.region_bank_on(backbone.device)
    fine_bank = profile.fine_bank_on(backbone.device)
    with torch.inference_mode():
        maps = distance_maps(
            backbone,
            images,
            profile.config,
            profile.layer_scales,
            profile.projection,
            bank,
            search,
            region_bank,
            fine_bank,
        )
        fused = fuse_scales(maps, profile.score_scales).cpu().numpy().astype(np.float32)
    return [ImageScore(score=float(m.max()), heatmap=m) for m in fused]
