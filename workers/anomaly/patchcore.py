"""PatchCore-style patch features, coreset subsampling and nearest-neighbour scoring.

Pipeline for a batch of images (all steps on the worker's device, one forward pass):

1. :func:`preprocess`: resize to ``resolution`` x ``resolution`` (area interpolation), RGB
   0..1, and optionally standardise each image (zero mean, unit variance over its pixels,
   then rescaled to mean 0.5 / std 0.2) so that global brightness and contrast changes
   between shots do not look like defects.
2. Backbone block outputs (EfficientNet-Lite0), each averaged over a 3x3 neighbourhood
   (local context, as in PatchCore), resampled to one grid of ``grid_stride`` pixels,
   each layer divided by its mean patch norm on the fit set (so no layer dominates the
   distance), concatenated, and multiplied by a fixed random Gaussian projection
   (Johnson-Lindenstrauss: distances are roughly kept, the nearest-neighbour search
   gets cheaper).
3. Fit: greedy k-center coreset of all fit patches -> memory bank.
4. Score: each patch's Euclidean distance to its nearest memory-bank entry, computed in
   matrix-multiply form (``|q|^2 + |m|^2 - 2 q.m``) in chunks; the patch-score map is
   the heat map, its maximum is the image score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from workers.models.efficientnet_lite0 import BLOCK_STRIDES

__all__ = [
    "FeatureConfig",
    "feature_dim",
    "greedy_coreset",
    "make_projection",
    "nearest_distances",
    "patch_features",
    "preprocess",
]

_STANDARD_MEAN = 0.5
_STANDARD_STD = 0.2
_CHUNK_ELEMENTS = 1 << 24  # query rows x bank rows per distance chunk (64 MiB of float32)


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that decides what a patch feature is; stored in every profile."""

    blocks: tuple[int, ...] = (2, 4)
    resolution: int = 256
    grid_stride: int = 8
    standardize: bool = True
    projection_dim: int = 0
    """0 keeps the concatenated channels as they are."""
    smooth_px: int = 3
    """Local aggregation window (patch neighbourhood) on each block's own grid."""

    def validate(self) -> None:
        if not self.blocks or any(not 0 <= b < len(BLOCK_STRIDES) for b in self.blocks):
            raise ValueError(f"blocks must be indices 0..{len(BLOCK_STRIDES) - 1}: {self.blocks}")
        if self.resolution % self.grid_stride or self.resolution < 32:
            raise ValueError(
                f"resolution {self.resolution} must be >= 32 and a multiple of "
                f"grid_stride {self.grid_stride}"
            )

    @property
    def grid_size(self) -> int:
        return self.resolution // self.grid_stride


def preprocess(
    images: Sequence[NDArray[np.uint8]], config: FeatureConfig, device: torch.device
) -> torch.Tensor:
    """HxWx3 RGB uint8 images -> N x 3 x R x R float tensor on ``device``."""
    size = (config.resolution, config.resolution)
    resized = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
        shrink = image.shape[0] > size[1] or image.shape[1] > size[0]
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        resized.append(cv2.resize(image, size, interpolation=interp))
    x = torch.from_numpy(np.stack(resized)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if config.standardize:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        x = (x - mean) / std * _STANDARD_STD + _STANDARD_MEAN
    return x


def feature_dim(config: FeatureConfig, channels: Sequence[int]) -> int:
    return config.projection_dim or sum(channels)


def make_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A fixed Gaussian random projection ``in_dim -> out_dim`` scaled by 1/sqrt(out_dim)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=generator) / out_dim**0.5


def patch_features(
    block_maps: Sequence[torch.Tensor],
    config: FeatureConfig,
    layer_scales: torch.Tensor | None,
    projection: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block outputs (each N x C x h x w) -> (N x G x G x D patch features, layer mean norms).

    ``layer_scales`` (one per block) divides each block's features; pass None during fit
    to get them computed from this batch (the mean L2 norm of that block's patch vectors).
    """
    grid = config.grid_size
    parts: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    for i, fmap in enumerate(block_maps):
        fmap = fmap.float()
        if config.smooth_px > 1:
            pad = config.smooth_px // 2
            fmap = F.avg_pool2d(fmap, config.smooth_px, 1, pad, count_include_pad=False)
        if fmap.shape[-1] > grid:
            fmap = F.adaptive_avg_pool2d(fmap, grid)
        elif fmap.shape[-1] < grid:
            fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)
        norm = fmap.norm(dim=1).mean()
        norms.append(norm)
        scale = layer_scales[i] if layer_scales is not None else norm
        parts.append(fmap / scale.clamp_min(1e-6))
    feats = torch.cat(parts, dim=1).permute(0, 2, 3, 1)
    if projection is not None:
        feats = feats @ projection.to(feats.device)
    return feats.contiguous(), torch.stack(norms)


def greedy_coreset(features: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``count`` rows of ``features`` (M x D) chosen by greedy k-center.

    Each step adds the row farthest from everything chosen so far, so the coreset covers
    the rare patches (the ones a random subsample would drop) with few entries.
    """
    total = features.shape[0]
    if count >= total:
        return torch.arange(total, device=features.device)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(total, (1,), generator=generator))
    chosen = torch.empty(count, dtype=torch.long, device=features.device)
    chosen[0] = first
    sq = (features * features).sum(dim=1)
    min_d = (sq - 2 * features @ features[first] + sq[first]).clamp_min_(0)
    for i in range(1, count):
        nxt = torch.argmax(min_d)
        chosen[i] = nxt
        row = features[nxt]
        d = (sq - 2 * features @ row + sq[nxt]).clamp_min_(0)
        torch.minimum(min_d, d, out=min_d)
    return chosen


def nearest_distances(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Euclidean distance of each query row (Q x D) to its nearest ``bank`` row (B x D)."""
    if bank_sq_norms is None:
        bank_sq_norms = (bank * bank).sum(dim=1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, bank.shape[0]))
    out = torch.empty(queries.shape[0], device=queries.device, dtype=queries.dtype)
    for start in range(0, queries.shape[0], rows):
        q = queries[start : start + rows]
        # |q - m|^2 = |q|^2 + |m|^2 - 2 q.m ; baddbmm-free form that stays one GEMM per chunk
        d2 = torch.addmm(bank_sq_norms[None, :], q, bank.T, beta=1.0, alpha=-2.0)
        min_d2 = d2.min(dim=1).values + (q * q).sum(dim=1)
        out[start : start + rows] = min_d2.clamp_min_(0).sqrt_()
    return out
