"""The region map: how the backbone features vary over a few grid cells around each cell,
searched in a memory bank of its own (``FeatureConfig.region_cells``).

A patch feature describes one 8 px cell and its 3 x 3 neighbourhood on the backbone's own
grid. Some defects change no single cell beyond what good images show, but change how the
cells around it differ from one another: a bald patch among grains, a missing print motif,
a scar's altered grain, a resin gap. A region descriptor is the mean and the spread of the
backbone features over ``region_cells`` x ``region_cells`` cells (24 px at the default 3);
each region's distance to its nearest fit region, divided by the largest maximum that the
held-out good images reach, joins the fused map as one more map (docs/anomaly.md "Recipe",
runs rg). Queries are taken every ``region_stride`` cells; the bank holds every fit region."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from workers.anomaly.config import FeatureConfig
from workers.anomaly.patchcore import box_mean, nearest_distances, scaled_blocks

__all__ = ["region_border", "region_descriptors", "region_distances"]


def region_border(config: FeatureConfig) -> int:
    """Grid cells at each edge whose regions are not searched (they take their inner
    neighbour's distance): half the window, at least ``border_cells``, so that no region
    is cut short by the frame (a cut window has another spread than any fit region)."""
    return max(config.region_cells // 2, config.border_cells)


def region_descriptors(
    pooled: Sequence[torch.Tensor], layer_scales: torch.Tensor, config: FeatureConfig
) -> torch.Tensor:
    """N x H x W x 2C: each inner cell's mean and spread of the backbone blocks' pooled
    features (each block scaled to a mean patch norm of 1, as in the patch search) over
    ``region_cells`` cells square. H = W = grid size minus twice :func:`region_border`."""
    scales = layer_scales.to(pooled[0].device).clamp_min(1e-6)
    blocks = torch.cat(scaled_blocks(pooled, scales, config), dim=1)
    k = config.region_cells
    mean = box_mean(blocks, k)
    spread = (box_mean(blocks * blocks, k) - mean * mean).clamp_min(0).sqrt()
    b = region_border(config)
    inner = torch.cat([mean, spread], dim=1)[:, :, b:-b, b:-b]
    return inner.permute(0, 2, 3, 1).contiguous()


def region_distances(
    pooled: Sequence[torch.Tensor],
    layer_scales: torch.Tensor,
    config: FeatureConfig,
    bank: torch.Tensor,
    search: torch.Tensor | None = None,
) -> torch.Tensor:
    """N x G x G: each region's distance to its nearest ``bank`` region (rows of
    :func:`region_descriptors` of fit images); the border cells take their inner
    neighbour's value."""
    regions = region_descriptors(pooled, layer_scales, config)
    n, h, w, d = regions.shape
    step = config.region_stride
    searched = regions[:, ::step, ::step]
    rows, cols = searched.shape[1:3]
    dist = nearest_distances(searched.reshape(-1, d), bank, search).reshape(n, 1, rows, cols)
    if step > 1:
        dist = dist.repeat_interleave(step, dim=2).repeat_interleave(step, dim=3)[..., :h, :w]
    b = region_border(config)
    return F.pad(dist, (b, b, b, b), mode="replicate")[:, 0]
