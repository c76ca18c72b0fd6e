"""The region map (``FeatureConfig.region_cells``): descriptors, distances, and the region
memory bank's round trip through a profile file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from imgpipe.errors import PermanentError
from tests.support.profiles import read_profile_arrays, write_profile_arrays
from workers.anomaly import FeatureConfig, fit_profile, load_profile, score_images
from workers.anomaly.region import region_border, region_descriptors, region_distances
from workers.anomaly.scoring import backbone_for
from workers.anomaly.suite.dataset import family_split


def _pooled(seed: int, flat: tuple[slice, slice] | None = None) -> list[torch.Tensor]:
    """Two 1 x 24 x 32 x 32 block maps of i.i.d. cells; ``flat`` cells all take one value
    per channel, the mean of the others: the cells' level is normal, their variety is not."""
    gen = torch.Generator().manual_seed(seed)
    maps = [1.0 + 0.3 * torch.randn(1, 24, 32, 32, generator=gen) for _ in range(2)]
    if flat is not None:
        for fmap in maps:
            fmap[:, :, flat[0], flat[1]] = 1.0
    return maps


def test_region_descriptors_are_the_mean_and_spread_over_the_window() -> None:
    config = FeatureConfig(region_cells=3)
    pooled = _pooled(0)
    scales = torch.tensor([2.0, 4.0])
    regions = region_descriptors(pooled, scales, config)
    assert region_border(config) == 1
    assert regions.shape == (1, 30, 30, 96)
    # inner cell (5, 7) is grid cell (6, 8): its 3 x 3 window is rows 5..7, columns 7..9
    window = pooled[1][0, :, 5:8, 7:10].reshape(24, -1) / 4.0
    assert torch.allclose(regions[0, 5, 7, 24:48], window.mean(dim=1), atol=1e-5)
    assert torch.allclose(regions[0, 5, 7, 72:], window.std(dim=1, unbiased=False), atol=1e-4)


def test_region_map_peaks_where_the_cells_lost_their_variety() -> None:
    """Every cell of the patch has a normal level, so a memory bank of single cells would
    find a near neighbour for each; the region around them has no spread, which no fit
    region showed."""
    config = FeatureConfig(region_cells=3)
    scales = torch.ones(2)
    fit = torch.cat([region_descriptors(_pooled(s), scales, config) for s in range(1, 9)])
    bank = fit.reshape(-1, fit.shape[-1])
    flat = (slice(12, 18), slice(20, 26))
    dist = region_distances(_pooled(0, flat), scales, config, bank)
    good = region_distances(_pooled(0), scales, config, bank)
    assert dist.shape == (1, 32, 32)
    peak = divmod(int(dist[0].argmax()), 32)
    assert 12 <= peak[0] < 18 and 20 <= peak[1] < 26, peak
    # regions wholly inside the patch lie far beyond any good region
    assert float(dist[0, 13:17, 21:25].min()) > 1.5 * float(good.max())
    # the border cells repeat their inner neighbours
    assert torch.equal(dist[0, 0, 1:-1], dist[0, 1, 1:-1])
    # at stride 2 every other region is searched and the cell after it shares its value;
    # searching every region gives the same distances at the searched ones
    every = region_distances(_pooled(0, flat), scales, replace(config, region_stride=1), bank)
    inner, searched = dist[0, 1:-1, 1:-1], every[0, 1:-1, 1:-1]
    assert torch.allclose(inner[::2, ::2], searched[::2, ::2], atol=1e-5)
    assert torch.equal(inner[::2, ::2], inner[1::2, 1::2])


def test_region_cells_must_be_off_or_an_odd_window() -> None:
    for bad in (1, 2, 4, -3):
        with pytest.raises(ValueError, match="region_cells"):
            FeatureConfig(region_cells=bad).validate()
    FeatureConfig(region_cells=0).validate()
    FeatureConfig(region_cells=5).validate()


def test_region_bank_round_trips_through_the_profile_file(tmp_path: Path) -> None:
    split = family_split("granular", seed=1, n_fit=8, n_good=2, n_bad=2, crop_px=128)
    path = tmp_path / "p.npz"
    info = fit_profile(split.fit, path, name="granular")
    profile = load_profile(path, use_cache=False)
    assert profile.config.region_cells == 3
    assert profile.region_bank is not None
    arrays, meta = read_profile_arrays(path)
    # 5 bank crops (3 of 8 held out) x 30 x 30 inner regions of the 32 x 32 grid, 10 % kept
    assert profile.region_bank.shape == (round(5 * 30 * 30 * 0.1), 96)
    assert meta["region_bank_size"] == profile.region_bank.shape[0]
    # the score reference has one entry per map: 3 distance scales, region, fine, colour
    assert profile.score_scales.reference.shape == (6,)
    scores = score_images(profile, split.good + split.bad, backbone_for("cpu"))
    assert all(np.isfinite(s.score) and s.heatmap.shape == (32, 32) for s in scores)
    assert info.threshold > 0
    # a file that asks for the region map but has no region bank is refused, not scored
    del arrays["region_bank"]
    broken = write_profile_arrays(tmp_path / "broken.npz", arrays)
    with pytest.raises(PermanentError, match="region_bank"):
        load_profile(broken, use_cache=False)
