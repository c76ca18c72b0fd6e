"""Local colour and brightness statistics of the working image, and the colour map.

The statistics (:func:`local_statistics`) join the backbone features in the patch search;
the colour map (:func:`colour_deviation`) scores each cell's local colour on its own
against the fit set's (``FeatureConfig.colour_map``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.anomaly.config import FeatureConfig

__all__ = [
    "COLOUR_REFERENCE_FLOOR",
    "COLOUR_REFERENCE_SIZE",
    "colour_deviation",
    "colour_map_reference",
    "colour_reference",
    "local_extremes",
    "local_statistics",
    "opponent_colour",
    "window_counts",
    "window_mean",
]

COLOUR_REFERENCE_SIZE = 4
"""Entries of :func:`colour_reference`; the last ones of a profile's ``layer_scales``."""
COLOUR_REFERENCE_FLOOR = 3.0
"""Fit-set spreads: the least colour deviation a good image's worst cell is taken to reach
(about the maximum of a thousand normal cells); on a greyscale source every good map is 0
and a tint would otherwise score without bound."""


def local_statistics(x: torch.Tensor, config: FeatureConfig) -> torch.Tensor:
    """N x 4 x G x G: each grid cell's neighbourhood mean colour (minus the image's mean)
    and brightness spread, over ``stats_cells`` cells square (40 px by default): the colour and
    shading cues that ImageNet texture features barely register (stains, dents, faint
    burns, a missing print motif). Computed from per-cell sums, so it costs well under a
    millisecond."""
    luma = x.mean(dim=1, keepdim=True)
    cells = F.avg_pool2d(torch.cat([x, luma, luma * luma], dim=1), config.grid_stride)
    image_mean = x.mean(dim=(2, 3), keepdim=True)
    out = []
    for k in (config.stats_cells, config.stats_fine_cells):
        if k <= 0:
            continue
        near = F.avg_pool2d(cells, k, 1, k // 2, count_include_pad=False)
        mean, lmean, lsq = near[:, :3] - image_mean, near[:, 3:4], near[:, 4:5]
        spread = (lsq - lmean * lmean).clamp_min(0).sqrt()
        out += [_opponent(mean) if config.stats_scaling != "norm" else mean, spread]
    return torch.cat(out, dim=1)


def _opponent(rgb: torch.Tensor) -> torch.Tensor:
    """N x 3 x ... RGB -> brightness, red-green, yellow-blue."""
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    return torch.cat([(r + g + b) / 3, r - g, (r + g) / 2 - b], dim=1)


def opponent_colour(stats: torch.Tensor, config: FeatureConfig) -> torch.Tensor:
    """N x 3 x G x G: brightness, red-green, yellow-blue of the statistics' mean colour
    (already in that form unless ``stats_scaling`` is ``"norm"``)."""
    return stats[:, :3] if config.stats_scaling != "norm" else _opponent(stats[:, :3])


def colour_reference(stats: torch.Tensor, config: FeatureConfig) -> torch.Tensor:
    """[centre red-green, centre yellow-blue, spread red-green, spread yellow-blue] of the
    fit patches' local colour (spreads floored at ``stats_floor`` x the brightness's)."""
    opp = opponent_colour(stats, config).transpose(0, 1).reshape(3, -1)
    spread = opp.std(dim=1)
    floor = max(float(spread[0]) * config.stats_floor, 1e-6)
    return torch.cat([opp[1:].mean(dim=1), spread[1:].clamp_min(floor)])


def colour_deviation(
    stats: torch.Tensor, config: FeatureConfig, reference: torch.Tensor
) -> torch.Tensor:
    """N x G x G: each cell's local colour's distance from the fit set's, in spreads."""
    colour = opponent_colour(stats, config)[:, 1:]
    centre, spread = reference.to(colour.device).reshape(2, 2, 1, 1)
    z: torch.Tensor = (colour - centre) / spread
    return z.square().sum(dim=1).sqrt()


def colour_map_reference(deviation: torch.Tensor, border_cells: int) -> float:
    """The colour map's score reference: the largest colour deviation (N x G x G, inner
    cells) of the memory-bank images, at least ``COLOUR_REFERENCE_FLOOR``. The colour map
    is a 4-parameter model, not a memory bank, so the images it was fitted on can
    calibrate it; their maximum, rather than a few held-out images' mean, keeps the colour
    map from adding noise to good images' scores: only a colour no good image showed
    raises the score."""
    b = border_cells
    inner = deviation[:, b:-b, b:-b] if b > 0 else deviation
    return max(float(inner.amax()), COLOUR_REFERENCE_FLOOR)


def local_extremes(x: torch.Tensor, config: FeatureConfig) -> torch.Tensor:
    """N x 2 x G x G: each grid cell's largest brightness excess and deficit of a pixel
    over the mean of its ``extremes_px`` neighbourhood (max-pooled over the cell). Pits,
    holes and hairline scratches set these although they cover a few pixels of a cell
    whose averaged backbone features hardly move."""
    luma = x.mean(dim=1, keepdim=True)
    k = config.extremes_px
    # the k x k mean as a row pass then a column pass: equal (the window is a rectangle
    # even where it is cut by the border)
    residual = luma - window_mean(window_mean(luma, k, 3), k, 2)
    n, g, cell = x.shape[0], config.grid_size, config.grid_stride
    by_cell = torch.cat([residual, -residual], dim=1).reshape(n, 2, g, cell, g, cell)
    return by_cell.amax(dim=(3, 5))


def window_mean(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Each element's mean over the ``k`` (odd) elements around it along ``dim``, the window
    cut at the ends (``avg_pool2d`` with ``count_include_pad=False`` along one axis), from
    prefix sums: 0.6 against 1.5 ms for both passes of a 9 px mean at 256 px on a 2-core
    AVX2 VM (avg_pool2d at stride 1 is slow there, a 9 x 9 convolution far slower)."""
    size, half = x.shape[dim], k // 2
    sums = x.cumsum(dim)
    shape = list(sums.shape)
    shape[dim] = half + 1
    before = sums.new_zeros(shape)
    shape[dim] = half
    after = sums.narrow(dim, size - 1, 1).expand(shape)
    padded = torch.cat([before, sums, after], dim)
    total = padded.narrow(dim, k, size) - padded.narrow(dim, 0, size)
    view = [1] * x.ndim
    view[dim] = size
    return total / window_counts(size, k, x).reshape(view)


def window_counts(size: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """How many of ``size`` positions the ``k`` (odd) window around each one covers, the
    window cut at the ends; ``like``'s device and dtype."""
    at = torch.arange(size, device=like.device)
    count = (at + k // 2).clamp(max=size - 1) - (at - k // 2).clamp(min=0) + 1
    return count.to(like.dtype)
