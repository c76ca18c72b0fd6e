"""The anomaly recipe: everything that decides what a patch feature is and how it is
scored, stored whole in every profile (``meta["config"]``). docs/anomaly.md "Recipe" says
why each default was chosen."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from workers.models.efficientnet_lite0 import BLOCK_STRIDES

__all__ = ["STATS_SCALINGS", "FeatureConfig"]

STATS_SCALINGS = ("norm", "colour", "whiten")


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that decides what a patch feature is; stored in every profile."""

    blocks: tuple[int, ...] = (1, 2)
    resolution: int = 256
    grid_stride: int = 8
    standardize: bool = True
    per_channel: bool = True
    """Standardise each colour channel on its own (removes colour casts)."""
    flatten_px: float = 48.0
    """> 0: divide each channel by its Gaussian blur of this sigma (px at ``resolution``)
    first, which removes light gradients and vignetting; 0: off."""
    knn: int = 1
    """Patch distance = mean distance to this many nearest memory-bank patches."""
    stats_weight: float = 0.5
    """> 0: append each cell's local colour mean and brightness spread (see
    :func:`local_statistics`), weighted by this relative to one backbone block."""
    stats_cells: int = 5
    """Window of the local statistics, in grid cells (odd): 5 = 40 px, more than one
    period of a printed repeat, so a missing motif moves the mean colour."""
    stats_fine_cells: int = 0
    """> 0: the same statistics over this smaller window too (odd, in grid cells): a
    bare patch a little smaller than ``stats_cells`` (missing grains) drops the
    brightness spread there much more."""
    extremes_weight: float = 0.5
    """> 0: append each cell's darkest and brightest pixel relative to the mean of its
    ``extremes_px`` neighbourhood (see :func:`local_extremes`), weighted by this relative
    to one backbone block: a 3-7 px pit or a hairline scratch sets a cell's extreme
    although it hardly moves the cell's averaged features."""
    extremes_px: int = 9
    """Neighbourhood (odd, px at ``resolution``) whose mean a pixel is compared with."""
    stats_scaling: str = "norm"
    """How the statistics are weighted against each other. ``"norm"``: mean colour as R, G,
    B, the block divided by its mean norm on the fit set. ``"colour"``: brightness, two
    colour-opponent channels and brightness spread, each colour channel scaled to the
    brightness's spread on the fit set, then as ``"norm"``: on a grey or single-hue
    material the colour channels barely vary, so a faint tint (a stain) stands out as
    much as a dark blotch would (stains on the grey photographs 0.66-0.85 -> 1.00, but
    granular -0.02: not the default; docs/anomaly.md, runs s-w). ``"whiten"``: every
    statistic centred and divided by its own spread (lost on wood and woven)."""
    stats_floor: float = 0.05
    """A colour channel's spread counts as at least this fraction of the brightness's
    spread, so a channel that never varies on the fit set does not amplify sensor noise
    by more than 1 / ``stats_floor``."""
    colour_map: bool = True
    """Also score each cell's local colour on its own (needs the local statistics): the
    distance of its two colour-opponent means from the fit patches' mean, in fit-set
    spreads (floored at ``stats_floor`` x the brightness spread), as one more map fused
    like the distance scales. A tint on a grey or single-hue material then stands out
    without adding colour noise to the patch search."""
    border_cells: int = 1
    """Grid cells at each edge that take their nearest inner cell's distance: edge patches
    see the network's zero padding and the frame's darkest vignetting, so good images
    reach their largest distances there."""
    region_cells: int = 3
    """> 0 (odd, >= 3): also score each cell's region, the mean and spread of the backbone
    features over this many cells square, against a memory bank of fit regions, as one
    more map in the fusion (see ``workers/anomaly/region.py``); 0: off."""
    region_stride: int = 2
    """Regions are searched at every this many cells (the bank holds every fit region);
    a cell between them takes the distance of the searched region above and left of it.
    At 2 the 3-cell windows still cover every cell, for a quarter of the search (suite:
    equal mean AUROC, 16 against 19 ms/crop; docs/anomaly.md runs rg, rg1)."""
    fine_blocks: tuple[int, ...] = (0, 1)
    """Backbone blocks of the fine map (the default ``(0, 1)``); empty: off. Their raw
    outputs on a grid of half the cell size (4 px), without the 3 x 3 aggregation, searched
    in a memory bank of their own and fused as one more map (``workers/anomaly/fine.py``):
    a 1-2 px scratch or crack on a busy surface moves them far more than the patch
    features. On the suite +0.005 mean AUROC, +0.014 on the held-out families (twill
    +0.03), for about 1.3x the scoring time (docs/anomaly.md, run fn and "Speed")."""
    fine_query_stride: int = 1
    """1: every fine cell is searched and each grid cell takes the largest of its four;
    2: one fine cell per grid cell (its first), a quarter of the search, but it lost most
    of the gain (docs/anomaly.md, run fn-q2)."""
    fine_coreset: float = 0.01
    """Share of the fit images' fine descriptors kept in the fine memory bank: 1 % of the
    144 000 descriptors of 40 bank crops is 1 440 rows (2 % scored alike and searched
    three times slower on a 2-core VM: the bank no longer fits the CPU cache)."""
    projection_dim: int = 0
    """0 keeps the concatenated channels as they are."""
    whiten: float = 0.1
    """> 0 (the default 0.1): the patch features are whitened before the memory bank and
    the search. Each is multiplied by ``W``, ``W W^T = (C + whiten * mean(diag C) * I)^-1``
    for ``C`` the covariance of the bank images' inner patch features (fit.py
    ``whitening_matrix``), so a patch distance counts every direction in units of how much
    good patches vary along it (a regularised Mahalanobis distance). A defect that moves a
    feature combination good patches keep tight then stands out; the ``whiten`` term keeps
    directions with almost no variance from amplifying noise. Stored as the profile's
    ``projection``. 0: off. On the suite: docs/anomaly.md, run wh."""
    smooth_px: int = 3
    """Local aggregation window (patch neighbourhood) on each block's own grid."""
    score_scales: tuple[int, ...] = (1, 3, 5)
    """Windows (in grid cells) the distance map is averaged over before fusion."""

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> FeatureConfig:
        """A config from JSON fields (lists become the tuples the dataclass holds)."""
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()
        }
        return cls(**values)

    @classmethod
    def from_overrides(cls, text: str) -> FeatureConfig:
        """The default config with a JSON object's fields replaced, validated; the
        ValueError names the wrong field or value."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the recipe overrides are not valid JSON ({exc}): {text!r}") from exc
        if not isinstance(fields, dict):
            raise ValueError(
                f'the recipe overrides must be a JSON object such as {{"colour_map": true}}, '
                f"got {text!r}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(
                f"unknown recipe field(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        try:
            config = cls.from_json(fields)
            config.validate()
        except TypeError as exc:
            raise ValueError(f"a recipe field has the wrong type ({exc}): {text!r}") from exc
        return config

    def validate(self) -> None:
        if not self.blocks or any(not 0 <= b < len(BLOCK_STRIDES) for b in self.blocks):
            raise ValueError(f"blocks must be indices 0..{len(BLOCK_STRIDES) - 1}: {self.blocks}")
        if self.resolution % self.grid_stride or self.resolution < 32:
            raise ValueError(
                f"resolution {self.resolution} must be >= 32 and a multiple of "
                f"grid_stride {self.grid_stride}"
            )
        if self.extremes_px < 3 or self.extremes_px % 2 == 0:
            raise ValueError(f"extremes_px must be odd and >= 3: {self.extremes_px}")
        if self.region_cells != 0 and (self.region_cells < 3 or self.region_cells % 2 == 0):
            raise ValueError(f"region_cells must be 0 (off) or odd and >= 3: {self.region_cells}")
        if self.region_stride < 1:
            raise ValueError(f"region_stride must be >= 1: {self.region_stride}")
        if any(not 0 <= b < len(BLOCK_STRIDES) for b in self.fine_blocks):
            raise ValueError(
                f"fine_blocks must be indices 0..{len(BLOCK_STRIDES) - 1}: {self.fine_blocks}"
            )
        if self.fine_blocks and self.grid_stride % 2:
            raise ValueError(f"the fine map needs an even grid_stride: {self.grid_stride}")
        if self.fine_query_stride not in (1, 2):
            raise ValueError(f"fine_query_stride must be 1 or 2: {self.fine_query_stride}")
        if not math.isfinite(self.whiten) or self.whiten < 0:
            raise ValueError(f"whiten must be 0 (off) or a positive number: {self.whiten}")
        if not 0.0 < self.fine_coreset <= 1.0:
            raise ValueError(f"fine_coreset must be in (0, 1]: {self.fine_coreset}")
        if self.colour_map and self.stats_weight <= 0:
            raise ValueError("colour_map needs the local statistics: set stats_weight > 0")
        if self.stats_scaling not in STATS_SCALINGS:
            raise ValueError(
                f"stats_scaling must be one of {STATS_SCALINGS}, not {self.stats_scaling!r}"
            )
        if not self.score_scales or any(k < 1 or k % 2 == 0 for k in self.score_scales):
            raise ValueError(f"score_scales must be odd window sizes >= 1: {self.score_scales}")

    @property
    def grid_size(self) -> int:
        return self.resolution // self.grid_stride
