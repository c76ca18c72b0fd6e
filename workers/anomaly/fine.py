"""The fine map: early backbone blocks at half the grid's cell size, without the 3 x 3
aggregation of the patch search, searched in a memory bank of their own
(``FeatureConfig.fine_blocks``).

The patch features average each block over 3 x 3 of its own positions and over an 8 px
cell, so a 1-2 px scratch or crack, or a 3-7 px pit, moves them little on a busy surface
(grass, gravel, a twill's seams). A fine descriptor is the blocks' raw vectors on a grid
of ``grid_stride / 2`` px (4 px by default: block 0 averaged over 2 x 2 of its positions,
block 1 as it is), each block divided by its mean norm on the fit set. Descriptors are
searched every ``fine_query_stride`` fine cells against a coreset of every fit descriptor
(``fine_coreset`` of them); the distances are max-pooled onto the grid and join the fused
map as one more map, calibrated like the distance scales (docs/anomaly.md "Recipe",
run fn)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from workers.anomaly.config import FeatureConfig
from workers.anomaly.patchcore import nearest_distances

__all__ = ["fine_descriptors", "fine_distances"]


def fine_descriptors(
    maps: Sequence[torch.Tensor], scales: torch.Tensor, config: FeatureConfig, step: int = 1
) -> torch.Tensor:
    """N x H x W x C descriptors of the inner fine cells (the ``border_cells`` frame, in
    grid cells, left out), taken every ``step`` fine cells; each block divided by its
    ``scales`` entry (the profile's ``fine_scales``: ``patchcore.layer_norms`` of the fit
    images' fine maps)."""
    scales = scales.to(maps[0].device).clamp_min(1e-6)
    joined = torch.cat([fmap / scales[i] for i, fmap in enumerate(maps)], dim=1)
    b = 2 * config.border_cells
    if b > 0:
        joined = joined[:, :, b:-b, b:-b]
    return joined[:, :, ::step, ::step].permute(0, 2, 3, 1).contiguous()


def fine_distances(
    maps: Sequence[torch.Tensor],
    scales: torch.Tensor,
    config: FeatureConfig,
    bank: torch.Tensor,
    search: torch.Tensor | None = None,
) -> torch.Tensor:
    """N x G x G: each grid cell's largest fine distance to the nearest ``bank`` row (at
    ``fine_query_stride`` 2, the distance of the cell's first fine cell); the border cells
    take their inner neighbour's value."""
    step = config.fine_query_stride
    queries = fine_descriptors(maps, scales, config, step)
    n, h, w, d = queries.shape
    dist = nearest_distances(queries.reshape(-1, d), bank, search).reshape(n, 1, h, w)
    if step == 1:  # 2 x 2 fine cells per grid cell
        dist = F.max_pool2d(dist, 2)
    b = config.border_cells
    return F.pad(dist, (b, b, b, b), mode="replicate")[:, 0] if b > 0 else dist[:, 0]
