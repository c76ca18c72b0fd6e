"""Whitened patch features (``FeatureConfig.whiten``): the whitening matrix, its
validation, and its round trip through a profile file as the profile's projection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.profiles import read_profile_arrays
from workers.anomaly import FeatureConfig, fit_profile, load_profile, score_images
from workers.anomaly.fit import whitening_matrix
from workers.anomaly.scoring import backbone_for
from workers.anomaly.suite.dataset import family_split


def _correlated_rows(count: int, seed: int = 0) -> torch.Tensor:
    """``count`` x 6 rows with very unequal, correlated variances (one direction almost flat)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    spreads = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.01], dtype=torch.float64)
    return (torch.randn(count, 6, generator=gen, dtype=torch.float64) * spreads) @ mixing + 3.0


def test_whitening_matrix_gives_the_regularised_mahalanobis_distance() -> None:
    rows = _correlated_rows(5000)
    for regularisation in (1e-6, 0.1):
        w = whitening_matrix(rows, regularisation)
        cov = torch.cov(rows.T)
        ridge = regularisation * cov.diagonal().mean()
        precision = torch.linalg.inv(cov + ridge * torch.eye(6, dtype=torch.float64))
        torch.testing.assert_close(w @ w.T, precision, rtol=1e-6, atol=1e-9)
        x, y = rows[:50], rows[50:100]
        direct = torch.einsum("nd,de,ne->n", x - y, precision, x - y).sqrt()
        torch.testing.assert_close(((x - y) @ w).norm(dim=1), direct, rtol=1e-6, atol=1e-9)
    # nearly unregularised, the whitened rows have unit covariance
    white = rows @ whitening_matrix(rows, 1e-9)
    unit = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(torch.cov(white.T), unit, atol=1e-3, rtol=0)


def test_whitening_makes_a_step_along_a_tight_direction_count() -> None:
    """The same Euclidean step is far along the direction good rows keep tight and near
    along the one where they vary most: what a defect in a rarely varying feature needs."""
    rows = _correlated_rows(5000)
    centred = rows - rows.mean(dim=0)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    loose, tight = vt[0], vt[-1]  # unit directions of the largest and smallest variance
    w = whitening_matrix(rows, 0.01)
    assert (tight @ w).norm() > 10 * (loose @ w).norm()
    assert w.dtype == rows.dtype
    assert whitening_matrix(rows.float(), 0.01).dtype == torch.float32


def test_whiten_is_validated() -> None:
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="whiten"):
            FeatureConfig(whiten=bad).validate()
    with pytest.raises(ValueError, match="whiten"):
        FeatureConfig.from_overrides('{"whiten": -1}')
    assert FeatureConfig.from_overrides('{"whiten": 0.1}').whiten == 0.1


def test_whitened_profile_stores_the_matrix_as_its_projection(tmp_path: Path) -> None:
    split = family_split("woven", seed=2, n_fit=8, n_good=2, n_bad=2, crop_px=128)
    path = tmp_path / "w.npz"
    fit_profile(split.fit, path, name="woven", config=FeatureConfig(whiten=0.1))
    profile = load_profile(path, use_cache=False)
    assert profile.config.whiten == 0.1
    dims = profile.memory_bank.shape[1]
    assert profile.projection is not None and profile.projection.shape == (dims, dims)
    # lower triangular with a positive diagonal: a Cholesky factor of the precision
    assert torch.equal(profile.projection, torch.tril(profile.projection))
    assert bool((profile.projection.diagonal() > 0).all())
    _, meta = read_profile_arrays(path)
    assert meta["config"]["whiten"] == 0.1
    scores = score_images(profile, split.good + split.bad, backbone_for("cpu"))
    assert all(np.isfinite(s.score) and s.heatmap.shape == (32, 32) for s in scores)
    # with the whitening off (and no random projection) there is no projection
    plain = tmp_path / "plain.npz"
    fit_profile(split.fit, plain, name="woven", config=FeatureConfig(whiten=0.0))
    assert load_profile(plain, use_cache=False).projection is None
