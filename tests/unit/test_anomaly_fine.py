"""The fine map (``FeatureConfig.fine_blocks``): descriptors, distances, and the fine
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
from workers.anomaly.fine import fine_descriptors, fine_distances
from workers.anomaly.patchcore import layer_norms, resample_grid
from workers.anomaly.scoring import backbone_for
from workers.anomaly.suite.dataset import family_split


def _fine(seed: int, spot: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Two 1 x C x 64 x 64 fine block maps of i.i.d. cells (16 and 24 channels, as blocks 0
    and 1); ``spot`` sets one fine cell of both far outside what the others show."""
    gen = torch.Generator().manual_seed(seed)
    maps = [1.0 + 0.2 * torch.randn(1, c, 64, 64, generator=gen) for c in (16, 24)]
    if spot is not None:
        for fmap in maps:
            fmap[:, :, spot[0], spot[1]] = 4.0
    return maps


def test_fine_descriptors_are_the_scaled_inner_cells() -> None:
    config = FeatureConfig(fine_blocks=(0, 1))
    maps = _fine(0)
    scales = torch.tensor([2.0, 4.0])
    every = fine_descriptors(maps, scales, config)
    # a 1-cell (8 px) border is 2 fine cells on each side of the 64 x 64 fine grid
    assert every.shape == (1, 60, 60, 40)
    assert torch.allclose(every[0, 3, 5, :16], maps[0][0, :, 5, 7] / 2.0)
    assert torch.allclose(every[0, 3, 5, 16:], maps[1][0, :, 5, 7] / 4.0)
    assert torch.equal(fine_descriptors(maps, scales, config, step=2), every[:, ::2, ::2])
    norms = layer_norms(maps)
    assert torch.allclose(norms[0], maps[0].norm(dim=1).mean())


def test_fine_map_marks_the_grid_cell_of_an_odd_fine_cell() -> None:
    config = FeatureConfig(fine_blocks=(0, 1), fine_query_stride=1)
    scales = torch.ones(2)
    fit = torch.cat([fine_descriptors(_fine(s), scales, config) for s in range(1, 5)])
    bank = fit.reshape(-1, fit.shape[-1])
    # fine cell (41, 23) lies in grid cell (20, 11); it is the second fine cell of that
    # grid cell in both directions, so only a search of every fine cell finds it
    spotted = _fine(0, (41, 23))
    every = fine_distances(spotted, scales, config, bank)
    assert every.shape == (1, 32, 32)
    assert divmod(int(every[0].argmax()), 32) == (20, 11)
    assert float(every[0, 20, 11]) > 3 * float(fine_distances(_fine(0), scales, config, bank).max())
    # at stride 2 each grid cell takes its first fine cell: a spot there is found...
    halved = replace(config, fine_query_stride=2)
    first = fine_distances(_fine(0, (40, 22)), scales, halved, bank)
    assert divmod(int(first[0].argmax()), 32) == (20, 11)
    # ...and stride 1 (the max of four) is never below it
    assert bool((fine_distances(_fine(0, (40, 22)), scales, config, bank) >= first - 1e-5).all())
    # the border cells repeat their inner neighbours
    assert torch.equal(every[0, 0, 1:-1], every[0, 1, 1:-1])


def test_resample_grid_averages_down_and_interpolates_up() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(resample_grid(x, 2)[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert resample_grid(x, 8).shape == (1, 1, 8, 8)
    assert resample_grid(x, 4) is x


def test_fine_config_is_validated() -> None:
    with pytest.raises(ValueError, match="fine_blocks"):
        FeatureConfig(fine_blocks=(0, 99)).validate()
    with pytest.raises(ValueError, match="even grid_stride"):
        FeatureConfig(fine_blocks=(0, 1), grid_stride=7, resolution=224).validate()
    with pytest.raises(ValueError, match="fine_query_stride"):
        FeatureConfig(fine_query_stride=3).validate()
    with pytest.raises(ValueError, match="fine_coreset"):
        FeatureConfig(fine_coreset=0.0).validate()
    FeatureConfig(fine_blocks=()).validate()


def test_fine_bank_round_trips_through_the_profile_file(tmp_path: Path) -> None:
    split = family_split("woven", seed=2, n_fit=8, n_good=2, n_bad=2, crop_px=128)
    path = tmp_path / "p.npz"
    fit_profile(split.fit, path, name="woven")  # the fine map is on by default
    profile = load_profile(path, use_cache=False)
    assert profile.config.fine_blocks == (0, 1)
    assert profile.fine_bank is not None and profile.fine_scales is not None
    # 5 bank crops (3 of 8 held out) x 60 x 60 inner fine cells, 1 % kept; 16 + 24 channels
    assert profile.fine_bank.shape == (round(5 * 60 * 60 * 0.01), 40)
    assert profile.fine_scales.shape == (2,)
    arrays, meta = read_profile_arrays(path)
    assert meta["fine_bank_size"] == profile.fine_bank.shape[0]
    scores = score_images(profile, split.good + split.bad, backbone_for("cpu"))
    assert all(np.isfinite(s.score) and s.heatmap.shape == (32, 32) for s in scores)
    # off, the fine arrays are empty and there is one map fewer
    off = tmp_path / "off.npz"
    fit_profile(split.fit, off, name="woven", config=FeatureConfig(fine_blocks=()))
    plain = load_profile(off, use_cache=False)
    assert plain.fine_bank is None
    assert plain.score_scales.reference.shape[0] == profile.score_scales.reference.shape[0] - 1
    # a file that asks for the fine map but has no fine bank is refused, not scored
    del arrays["fine_bank"]
    broken = write_profile_arrays(tmp_path / "broken.npz", arrays)
    with pytest.raises(PermanentError, match="fine_bank"):
        load_profile(broken, use_cache=False)
