"""The procedural anomaly benchmark: deterministic, every family renders, masks mark defects."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from workers.anomaly.suite.camera import Nuisance, draw_shot, expose, rotate_crop
from workers.anomaly.suite.dataset import (
    ALL_STRUCTURAL,
    ALL_SURFACES,
    DEFECTS,
    FAMILIES,
    HELDOUT_FAMILIES,
    MAX_AREA,
    MIN_AREA,
    PHOTO_FAMILIES,
    family_split,
)
from workers.anomaly.suite.surfaces import SURFACES

pytest.importorskip("skimage", reason="the photographed families need scikit-image (test extra)")


def test_there_are_eight_procedural_families_plus_the_photographs_and_held_out_ones() -> None:
    assert len(SURFACES) >= 8 and len(HELDOUT_FAMILIES) >= 3
    assert not set(SURFACES) & set(HELDOUT_FAMILIES)  # held out: not a tuning family too
    assert set(FAMILIES) == set(ALL_SURFACES) | set(PHOTO_FAMILIES)
    for family, kinds in DEFECTS.items():
        assert len(set(kinds)) >= 5, family
        assert set(ALL_STRUCTURAL.get(family, ())) <= set(kinds)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_split_is_deterministic_and_masks_cover_the_defect(family: str) -> None:
    n_bad = len(DEFECTS[family])
    a = family_split(family, seed=3, n_fit=3, n_good=2, n_bad=n_bad, crop_px=128)
    b = family_split(family, seed=3, n_fit=3, n_good=2, n_bad=n_bad, crop_px=128)
    assert all(np.array_equal(x, y) for x, y in zip(a.fit + a.bad, b.fit + b.bad, strict=True))
    assert a.kinds == list(DEFECTS[family])
    for image, mask, area in zip(a.bad, a.masks, a.areas, strict=True):
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert mask.shape == (128, 128) and mask.dtype == np.bool_
        assert MIN_AREA <= area <= MAX_AREA
    # every crop is its own shot: no two fit crops are equal
    assert not np.array_equal(a.fit[0], a.fit[1])
    other = family_split(family, seed=4, n_fit=1, n_good=0, n_bad=0, crop_px=128)
    assert not np.array_equal(a.fit[0], other.fit[0])


def test_structural_defect_changes_only_its_region() -> None:
    from workers.anomaly.suite.surfaces import Structural

    for family, kinds in ALL_STRUCTURAL.items():
        for kind in kinds:
            good = ALL_SURFACES[family](np.random.default_rng(1), 96, None)
            flaw = Structural(kind, np.random.default_rng(2), (48.0, 48.0))
            bad = ALL_SURFACES[family](np.random.default_rng(1), 96, flaw)
            changed = np.abs(bad - good).max(axis=2) > 0.03
            assert 0 < changed.mean() < 0.5, (family, kind)


def test_camera_nuisance_changes_levels_but_not_the_frame() -> None:
    material = np.full((64, 64, 3), 0.5, np.float32)
    nuisance = Nuisance()
    rng = np.random.default_rng(0)
    frames = [expose(material, draw_shot(rng, nuisance), nuisance) for _ in range(8)]
    means = [float(f.mean()) for f in frames]
    assert max(means) - min(means) > 5  # gain differs from shot to shot
    assert all(f.shape == (64, 64, 3) for f in frames)
    assert max(float(f.std()) for f in frames) > 0.5  # gradient, vignetting, noise
    turned = rotate_crop(np.random.default_rng(0).random((90, 90, 3), dtype=np.float32), 10.0, 64)
    assert turned.shape == (64, 64, 3)


def test_export_writes_what_imgpipe_anomaly_eval_reads_back(tmp_path: Path) -> None:
    """``--export``: the crops and masks as files in the layout the eval command reads,
    each file equal to the crop or mask it was written from."""
    from rich.console import Console

    from imgpipe.face.cli_anomaly import load_image_files, load_masks
    from workers.anomaly.suite.export import eval_commands, export_split

    family = "terrazzo"
    split = family_split(family, seed=1, n_fit=3, n_good=2, n_bad=len(DEFECTS[family]), crop_px=64)
    export_split(split, tmp_path)
    console = Console(file=io.StringIO())
    fit = load_image_files([tmp_path / "train" / "good"], console)
    good = load_image_files([tmp_path / "test" / "good"], console)
    bad = load_image_files([tmp_path / "test" / "bad"], console)
    assert [p for p, _ in fit] == [tmp_path / "train" / "good" / f"{i:03d}.png" for i in range(3)]
    assert all(np.array_equal(a, b) for (_, a), b in zip(fit, split.fit, strict=True))
    assert all(np.array_equal(a, b) for (_, a), b in zip(good, split.good, strict=True))
    masks = load_masks(tmp_path / "ground_truth", tmp_path / "test" / "bad", bad)
    pairs = zip(bad, masks, strict=True)
    by_index = {int(p.stem): (p.parent.name, pixels, m) for (p, pixels), m in pairs}
    assert sorted(by_index) == list(range(len(split.bad)))
    for i, (kind, pixels, mask) in by_index.items():
        assert kind == split.kinds[i]
        assert np.array_equal(pixels, split.bad[i]) and np.array_equal(mask, split.masks[i])
    fit_cmd, eval_cmd = eval_commands(tmp_path, family)
    assert fit_cmd.startswith("imgpipe anomaly fit ") and f"{tmp_path}/train/good" in fit_cmd
    assert f"--masks {tmp_path}/ground_truth" in eval_cmd and eval_cmd.endswith("--json")
