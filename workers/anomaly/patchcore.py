"""PatchCore-style patch features, coreset subsampling and nearest-neighbour scoring.

Pipeline for a batch of images (all steps on the worker's device, one forward pass):

1. :func:`preprocess`: resize to ``resolution`` x ``resolution`` (area interpolation when
   shrinking, bilinear when enlarging), RGB 0..1, and optionally standardise each image
   (zero mean, unit variance over its pixels, then rescaled to mean 0.5 / std 0.2) so
   that global brightness and contrast changes between shots do not look like defects.
2. Backbone block outputs (EfficientNet-Lite0), each averaged over a 3x3 neighbourhood
   (local context, as in PatchCore), resampled to one grid of ``grid_stride`` pixels,
   each layer divided by its mean patch norm on the fit set (so no layer dominates the
   distance), concatenated, and optionally multiplied by a fixed random Gaussian
   projection (Johnson-Lindenstrauss: distances are roughly kept and the search gets
   cheaper; off by default because 48 dims are cheap already, see docs/anomaly.md).
3. Fit: greedy k-center coreset of all fit patches -> memory bank.
4. Score: each patch's Euclidean distance to its nearest memory-bank entry, computed in
   matrix-multiply form (``|q|^2 + |m|^2 - 2 q.m``) in chunks. The distance map is then
   averaged over windows of ``score_scales`` grid cells (1 = single patch: holes,
   scratches; 3 and 5 = 24 and 40 px at 256: stains, which raise many neighbouring
   patches a little), each scale is divided by the mean maximum that held-out good
   images reach at that scale, and the maps are fused by a per-pixel max (minus 1). The
   fused map is the heat map; its maximum is the image score (0 = as far from the bank
   as a typical good image's worst spot, 0.3 = 30% farther). With ``colour_map`` one
   more map joins the fusion: each cell's local colour against the fit set's (see
   :func:`colour_deviation`), divided by the largest value a bank image reached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from workers.anomaly.config import FeatureConfig
from workers.anomaly.statistics import (
    colour_reference,
    local_extremes,
    local_statistics,
    window_counts,
)
from workers.models.efficientnet_lite0 import EfficientNetLite0Features, FeatureRequest

__all__ = [
    "Extracted",
    "FeatureConfig",
    "ScoreScales",
    "box_mean",
    "extract_features",
    "feature_scales",
    "fuse_scales",
    "greedy_coreset",
    "layer_norms",
    "make_projection",
    "multiscale_maps",
    "nearest_distances",
    "patch_features",
    "pooled_blocks",
    "preprocess",
    "resample_grid",
    "scaled_blocks",
    "search_matrix",
]

_STANDARD_MEAN = 0.5
_STANDARD_STD = 0.2
# query rows x bank rows per distance chunk; a GPU wants big GEMMs. CPU: 4 MiB of float32
# (256 queries against a 4 096-row bank, 728 against the 1 440-row fine bank). With the
# search as one plain GEMM (search_matrix), paired runs of the default recipe on a 2-core
# Xeon VM took 0.98x (batch 1) and 0.90x (batch 8) the time of 16 MiB chunks. (With the
# earlier addmm form a 2-core AVX2 VM had 17 against 8 ms per image for 1 Mi elements.)
_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}


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
    # NCHW memory order, not the channels_last strides the permuted HWC array has: the
    # 3-channel ops below (flattening, channel means, extremes, statistics) took 1.5 ms
    # more per crop on channels_last on a 2-core EPYC VM; converting the uint8 copy on
    # the device is the cheap place for it
    x = torch.from_numpy(np.stack(resized)).to(device).permute(0, 3, 1, 2).contiguous()
    x = x.float() / 255.0
    if config.flatten_px > 0:
        x = flatten_illumination(x, config.flatten_px)
    if config.standardize:
        dims = (2, 3) if config.per_channel else (1, 2, 3)
        mean = x.mean(dim=dims, keepdim=True)
        # two-pass standard deviation (Bessel-corrected, as Tensor.std): 0.16 against 1.0 ms
        # for Tensor.std at 256 px on a 2-core AVX2 VM, equal to 1e-7
        count = math.prod(x.shape[d] for d in dims)
        var = (x - mean).square().mean(dim=dims, keepdim=True) * (count / max(1, count - 1))
        std = var.sqrt().clamp_min(1e-3)
        x = (x - mean) / std * _STANDARD_STD + _STANDARD_MEAN
    return x


def flatten_illumination(x: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Divide each channel by its Gaussian blur (computed at 1/8 resolution, then enlarged),
    keeping the image's mean level.

    The blur (reflect-padded, separable) and the bilinear enlargement are both linear along
    each axis, so they are applied as one matrix per axis (:func:`_light_matrix`):
    ``light = M_h @ low @ M_w^T``. Equal to the convolutions and ``F.interpolate`` to float
    rounding, 0.3 against 1.0 ms at 256 px on a 2-core Xeon VM (four small oneDNN calls)."""
    factor = 8
    low = F.avg_pool2d(x, factor)
    rows = _light_matrix(x.shape[-2], low.shape[-2], sigma_px / factor, x.device, x.dtype)
    cols = _light_matrix(x.shape[-1], low.shape[-1], sigma_px / factor, x.device, x.dtype)
    light = rows @ low @ cols.T
    return x / light.clamp_min(1e-3) * light.mean(dim=(1, 2, 3), keepdim=True)


@functools.lru_cache(maxsize=16)
def _light_matrix(
    size: int, low_size: int, sigma: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``size`` x ``low_size``: one axis of a signal of ``low_size`` samples blurred by a
    Gaussian of ``sigma`` samples (reflect padding, radius 3 sigma, at most ``low_size`` -
    1), then enlarged to ``size`` samples (linear, half-pixel centres as ``F.interpolate``
    with ``align_corners=False``), as a matrix: the operators applied to unit impulses."""
    radius = max(1, min(int(3 * sigma), low_size - 1))
    # a normal tensor even when first called under inference_mode: it is cached
    with torch.inference_mode(False), torch.no_grad():
        taps = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = (kernel / kernel.sum()).reshape(1, 1, -1)
        impulses = torch.eye(low_size, device=device, dtype=dtype)[:, None, :]
        blurred = F.conv1d(F.pad(impulses, (radius, radius), mode="reflect"), kernel)
        enlarged = F.interpolate(blurred, size=size, mode="linear", align_corners=False)
        return enlarged[:, 0, :].T.contiguous()


def make_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A fixed Gaussian random projection ``in_dim -> out_dim`` scaled by 1/sqrt(out_dim)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)


def pooled_blocks(block_maps: Sequence[torch.Tensor], config: FeatureConfig) -> list[torch.Tensor]:
    """Block outputs (each N x C x h x w) -> 3x3-aggregated maps on the common G x G grid,
    channels_last (see :func:`_channels_last`)."""
    pooled = []
    for fmap in block_maps:
        fmap = _channels_last(fmap)
        if config.smooth_px > 1:
            fmap = box_mean(fmap, config.smooth_px)
        pooled.append(resample_grid(fmap, config.grid_size))
    return pooled


def _channels_last(fmap: torch.Tensor) -> torch.Tensor:
    """``fmap`` as float32 in channels_last memory order (a copy only if it is not): the
    CPU's depthwise box mean and adaptive pooling run NHWC kernels there, 0.58 against
    1.16 ms for two 24 x 64 x 64 block maps on a 2-core Xeon VM (values equal)."""
    return fmap.float().contiguous(memory_format=torch.channels_last)


def resample_grid(fmap: torch.Tensor, size: int) -> torch.Tensor:
    """N x C x h x w -> N x C x size x size: area-averaged when larger, bilinear when
    smaller."""
    if fmap.shape[-1] > size:
        return F.adaptive_avg_pool2d(fmap, size)
    if fmap.shape[-1] < size:
        return F.interpolate(fmap, size=(size, size), mode="bilinear", align_corners=False)
    return fmap


def box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each pixel's mean over the k x k window around it (odd k), the window clipped at the
    border: ``F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)``, as a depthwise
    convolution of ones divided by the window's pixel count (0.18 against 1.1 ms for a
    24 x 64 x 64 map on a 2-core AVX2 VM, whose avg_pool2d kernel is slow at stride 1).
    For small ``k``: the convolution's cost grows with k^2 (a 9 x 9 one over one 256 x 256
    channel took 68 ms there; :func:`window_mean` is the one for that)."""
    channels, (height, width) = x.shape[1], x.shape[-2:]
    total = F.conv2d(x, x.new_ones(channels, 1, k, k), padding=k // 2, groups=channels)
    return total / (window_counts(height, k, x)[:, None] * window_counts(width, k, x)[None, :])


def layer_norms(pooled: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean L2 norm of each block's patch vectors (used to weight blocks equally)."""
    return torch.stack([fmap.norm(dim=1).mean() for fmap in pooled])


def feature_scales(pooled: Sequence[torch.Tensor], config: FeatureConfig) -> torch.Tensor:
    """What the fit set fixes about feature scaling, stored as a profile's ``layer_scales``:
    each pooled map's mean patch norm (the statistics' after their per-channel gains), then
    for ``stats_scaling`` ``"colour"`` those gains, for ``"whiten"`` the statistics' means and
    spreads, and last, with ``colour_map``, the :func:`colour_reference`."""
    tail = [colour_reference(pooled[-1], config)] if config.colour_map else []
    if not (config.stats_weight > 0 and config.stats_scaling != "norm"):
        return torch.cat([layer_norms(pooled), *tail])
    stats = pooled[-1].transpose(0, 1).reshape(pooled[-1].shape[1], -1)
    spread = stats.std(dim=1).clamp_min(1e-6)
    if config.stats_scaling == "whiten":
        spread = spread.clamp_min(float(spread[0]) * config.stats_floor)
        return torch.cat([layer_norms(pooled), stats.mean(dim=1), spread, *tail])
    gains = torch.ones_like(spread)
    for start in range(0, stats.shape[0], 4):  # per window: brightness, 2 colours, spread
        brightness = spread[start]
        colour = spread[start + 1 : start + 3].clamp_min(float(brightness) * config.stats_floor)
        gains[start + 1 : start + 3] = brightness / colour
    scaled = pooled[-1] * gains[None, :, None, None]
    return torch.cat([layer_norms([*pooled[:-1], scaled]), gains, *tail])


def patch_features(
    pooled: Sequence[torch.Tensor],
    layer_scales: torch.Tensor,
    projection: torch.Tensor | None,
    config: FeatureConfig,
) -> torch.Tensor:
    """Pooled maps (backbone blocks, then the extremes and the statistics when on; see
    :func:`extract_features`) -> N x G x G x D patch features: each block scaled to a mean
    norm of 1, the extremes to ``extremes_weight``, the statistics to ``stats_weight``,
    concatenated."""
    scales = layer_scales.to(pooled[0].device).clamp_min(1e-6)
    parts = scaled_blocks(pooled, scales, config)
    if config.extremes_weight > 0:
        i = len(config.blocks)
        parts.append(pooled[i] * (config.extremes_weight / scales[i]))
    if config.stats_weight > 0:
        stats, count, n = pooled[-1], pooled[-1].shape[1], len(pooled)
        if config.stats_scaling == "whiten":
            centre, spread = scales[n : n + 2 * count].reshape(2, count, 1, 1)
            # unit spread per statistic; / sqrt(count) keeps the block's typical norm at 1
            parts.append((stats - centre) / spread * (config.stats_weight / math.sqrt(count)))
        else:
            colour = config.stats_scaling == "colour"
            gains = scales[n : n + count].reshape(count, 1, 1) if colour else 1.0
            parts.append(stats * gains * (config.stats_weight / scales[n - 1]))
    feats = torch.cat(parts, dim=1)
    feats = feats.permute(0, 2, 3, 1)
    if projection is not None:
        feats = feats @ projection.to(feats.device)
    return feats.contiguous()


def scaled_blocks(
    pooled: Sequence[torch.Tensor], scales: torch.Tensor, config: FeatureConfig
) -> list[torch.Tensor]:
    """The backbone blocks' pooled maps, each divided by its mean patch norm on the fit set
    (``scales``: the profile's ``layer_scales`` on the maps' device, clamped above 0)."""
    return [fmap / scales[i] for i, fmap in enumerate(pooled[: len(config.blocks)])]


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


def search_matrix(bank: torch.Tensor) -> torch.Tensor:
    """The memory ``bank`` (B x D) as :func:`nearest_distances` multiplies it: a
    (D + 1) x B matrix, ``-2 m`` over ``|m|^2`` per bank row ``m``, so that one GEMM with a
    query row and a trailing 1 gives ``|m|^2 - 2 q.m`` (a profile keeps one per device)."""
    sq = (bank * bank).sum(dim=1, keepdim=True)
    return torch.cat([bank * -2.0, sq], dim=1).T.contiguous()


def nearest_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    search: torch.Tensor | None = None,
    k: int = 1,
) -> torch.Tensor:
    """Euclidean distance of each query row (Q x D) to its nearest ``bank`` row (B x D);
    with ``k`` > 1 the mean distance to the ``k`` nearest rows. ``search`` is
    :func:`search_matrix` of ``bank`` (computed here when None).

    |q - m|^2 = |q|^2 + (|m|^2 - 2 q.m): the bracket is one plain GEMM per chunk of
    queries (an ``addmm`` with the norms as its bias first copies them into every row of
    the output: 4.6 against 2.6 ms for 900 queries and a 4 096 x 54 bank on a 2-core
    Xeon VM), |q|^2 is added after the minimum."""
    if search is None:
        search = search_matrix(bank)
    augmented = torch.cat([queries, queries.new_ones(queries.shape[0], 1)], dim=1)
    query_sq = (queries * queries).sum(dim=1)
    chunk = _CHUNK_ELEMENTS.get(queries.device.type, 1 << 24)
    rows = max(1, chunk // max(1, search.shape[1]))
    out = torch.empty(queries.shape[0], device=queries.device, dtype=queries.dtype)
    for start in range(0, queries.shape[0], rows):
        d2 = torch.mm(augmented[start : start + rows], search)
        if k == 1:
            torch.amin(d2, dim=1, out=out[start : start + rows])
        else:
            near = d2.topk(k, dim=1, largest=False).values + query_sq[start : start + rows, None]
            out[start : start + rows] = near.clamp_min_(0).sqrt_().mean(dim=1)
    if k == 1:
        out += query_sq
        out.clamp_min_(0).sqrt_()
    return out


@dataclass(frozen=True)
class Extracted:
    """What one backbone forward pass gives the scoring: see :func:`extract_features`."""

    pooled: list[torch.Tensor]
    """The pooled block maps, then the local extremes and statistics when on."""
    fine: list[torch.Tensor]
    """The ``fine_blocks`` outputs on the fine grid (2G x 2G), unscaled; empty when off."""


def extract_features(
    backbone: EfficientNetLite0Features,
    images: Sequence[NDArray[np.uint8]],
    config: FeatureConfig,
) -> Extracted:
    """One backbone forward pass over ``images`` -> pooled block maps (see pooled_blocks)
    and the fine map's block outputs."""
    x = preprocess(images, config, backbone.device)
    wanted = tuple(dict.fromkeys((*config.blocks, *config.fine_blocks)))
    per_image = backbone.predict([FeatureRequest(img, wanted) for img in x])
    by_block = {b: _stack([maps[i] for maps in per_image]) for i, b in enumerate(wanted)}
    pooled = pooled_blocks([by_block[b] for b in config.blocks], config)
    if config.extremes_weight > 0:
        pooled.append(local_extremes(x, config))
    if config.stats_weight > 0:
        pooled.append(local_statistics(x, config))
    size = 2 * config.grid_size
    fine = [resample_grid(by_block[b], size) for b in config.fine_blocks]
    return Extracted(pooled, fine)


def _stack(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image C x h x w maps -> N x C x h x w float32, channels_last. On the CPU one copy
    per map, whatever layout the backbone returned (``torch.stack`` would give NCHW, and
    :func:`_channels_last` a second copy); on a GPU one stacking kernel for the batch
    rather than one launch per image."""
    if maps[0].device.type != "cpu":
        return _channels_last(torch.stack(list(maps)))
    out = torch.empty(
        (len(maps), *maps[0].shape),
        dtype=torch.float32,
        device=maps[0].device,
        memory_format=torch.channels_last,
    )
    for i, fmap in enumerate(maps):
        out[i].copy_(fmap)
    return out


def multiscale_maps(
    distances: torch.Tensor, scales: Sequence[int], border_cells: int = 0
) -> torch.Tensor:
    """N x G x G nearest-neighbour distances -> N x S x G x G window means, one per scale."""
    x = distances[:, None]
    if border_cells > 0:
        b = border_cells
        x = F.pad(x[:, :, b:-b, b:-b], (b, b, b, b), mode="replicate")
    maps = [x if k == 1 else F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False) for k in scales]
    return torch.cat(maps, dim=1)


@dataclass(frozen=True)
class ScoreScales:
    """Per-scale reference: the mean map maximum of held-out good images at that scale."""

    reference: torch.Tensor

    @classmethod
    def from_good_maps(
        cls,
        maps: torch.Tensor,
        colour_reference: float | None = None,
        largest: Sequence[int] = (),
    ) -> ScoreScales:
        """``maps``: N x S x G x G multiscale maps of good images not in the memory bank.

        ``colour_reference`` (with ``colour_map``, the last map) replaces the held-out
        images' mean maximum for that map: see :func:`colour_map_reference`. The maps at
        indices ``largest`` take the largest held-out maximum instead of the mean: a map
        that only some defects raise (the region map) then adds to a good image's score
        only where it goes beyond every held-out good image."""
        maxima = maps.flatten(2).amax(dim=2)
        reference = maxima.mean(dim=0)
        for i in largest:
            reference[i] = maxima[:, i].max()
        reference = reference.clamp_min(1e-6)
        if colour_reference is not None:
            reference[-1] = colour_reference
        return cls(reference=reference)


def fuse_scales(maps: torch.Tensor, scales: ScoreScales) -> torch.Tensor:
    """N x S x G x G maps -> N x G x G fused map: ``max over scales of map / reference - 1``.

    0 means "as far from the memory bank as a typical good image's worst spot", 0.5 means
    50% farther. Dividing by a mean rather than z-scoring keeps the few held-out images'
    spread (a noisy estimate from 3..10 images) out of the score.
    """
    reference = scales.reference.to(maps.device)[None, :, None, None]
    return (maps / reference).amax(dim=1) - 1.0
