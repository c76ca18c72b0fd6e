"""``imgpipe anomaly eval --json [--masks DIR]``: one JSON object on stdout, pixel AUROC
against defect masks matched by file stem, and ``metrics.pixel_auroc`` itself.

The CLI runs for real (typer's CliRunner on the ``imgpipe`` app) on PNG files of
synthetic brick crops: defects drawn with ``add_defect``, masks from the pixels it changed.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import skimage.data as skimage_data
from numpy.typing import NDArray
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner, Result

from imgpipe.face.cli import app
from imgpipe.face.cli_anomaly import load_image_files, load_masks
from workers.anomaly import ProfileInfo, fit_profile
from workers.anomaly.metrics import pixel_auroc
from workers.anomaly.synthetic import DEFECT_KINDS, add_defect, texture_split

JSON_KEYS = {
    "profile", "auroc", "pixel_auroc", "threshold", "tp", "fp", "tn", "fn", "n_good", "n_bad",
    "precision", "recall", "false_positive_rate", "score_ms_per_image", "good_scores",
    "bad_scores", "per_kind",
}  # fmt: skip
N_GOOD = 4
N_BAD = 4
BROKEN = "bad_01x"  # sorts between bad_01 and bad_02: the masks after it must stay aligned


@dataclass(frozen=True)
class EvalDirs:
    profile: Path
    info: ProfileInfo
    good: Path
    bad: Path
    masks: Path
    drawn: list[NDArray[np.bool_]]
    """The defect of each bad image, in file order."""


def _save(pixels: NDArray[np.uint8], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> EvalDirs:
    root = tmp_path_factory.mktemp("anomaly-eval")
    brick = skimage_data.brick()  # type: ignore[no-untyped-call]  # skimage.data is untyped
    split = texture_split(brick, n_fit=8, n_holdout=3, n_good=N_GOOD + N_BAD, kinds=(), seed=3)
    info = fit_profile(split.fit, root / "brick.npz", name="brick", holdout_images=split.holdout)
    rng = np.random.default_rng(7)
    drawn: list[NDArray[np.bool_]] = []
    for i, crop in enumerate(split.good[:N_GOOD]):
        _save(crop, root / "good" / f"good_{i:02d}.png")
    for i, crop in enumerate(split.good[N_GOOD:]):
        defective = add_defect(crop, DEFECT_KINDS[i % len(DEFECT_KINDS)], rng)
        changed = np.abs(defective.astype(np.int16) - crop.astype(np.int16)).max(axis=2) > 8
        assert changed.any()
        drawn.append(changed)
        _save(defective, root / "bad" / f"bad_{i:02d}.png")
        mask = changed.astype(np.uint8) * 255
        if i == 0:  # a mask at another size is resized (nearest) to its image
            mask = np.kron(mask, np.ones((2, 2), np.uint8))
        _save(mask, root / "masks" / f"bad_{i:02d}.png")
    (root / "bad" / f"{BROKEN}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    _save(np.full((128, 128), 255, np.uint8), root / "masks" / f"{BROKEN}.png")
    return EvalDirs(root / "brick.npz", info, root / "good", root / "bad", root / "masks", drawn)


def _eval(dirs: EvalDirs, *extra: str, masks: Path | None = None) -> Result:
    args = ["anomaly", "eval", str(dirs.profile), "--good", str(dirs.good), "--bad", str(dirs.bad)]
    if masks is not None:
        args += ["--masks", str(masks)]
    return CliRunner().invoke(app, [*args, *extra], env={"COLUMNS": "200"})


def _flat(text: str) -> str:
    """``text`` without whitespace: rich wraps long paths at the console width."""
    return "".join(text.split())


def test_eval_json_with_masks_is_one_object_with_pixel_auroc(dirs: EvalDirs) -> None:
    result = _eval(dirs, "--json", masks=dirs.masks)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # nothing but the one object on stdout
    assert isinstance(report, dict) and set(report) >= JSON_KEYS
    assert report["profile"] == {
        "name": "brick", "version": dirs.info.version, "sha256": dirs.info.sha256
    }  # fmt: skip
    assert 0.0 <= report["auroc"] <= 1.0
    assert report["n_good"] == N_GOOD and report["n_bad"] == N_BAD  # the broken file skipped
    assert report["tp"] + report["fn"] == report["n_bad"]
    assert report["tn"] + report["fp"] == report["n_good"]
    assert len(report["good_scores"]) == N_GOOD and len(report["bad_scores"]) == N_BAD
    assert isinstance(report["pixel_auroc"], float) and 0.0 <= report["pixel_auroc"] <= 1.0
    # the heat maps point at the drawn defects (misaligned masks would not)
    assert report["pixel_auroc"] > 0.75, report["pixel_auroc"]
    assert BROKEN in _flat(result.stderr) and "skipped" in result.stderr


def test_eval_json_without_masks_has_null_pixel_auroc(dirs: EvalDirs) -> None:
    result = _eval(dirs, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= JSON_KEYS and report["pixel_auroc"] is None
    assert report["per_kind"] == {}  # every bad image directly in --bad: no kinds
    assert 0.0 <= report["auroc"] <= 1.0 and report["tp"] + report["fn"] == N_BAD


def test_eval_table_has_a_pixel_auroc_column(dirs: EvalDirs) -> None:
    result = _eval(dirs)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "AUROC" in line)
    (row,) = (line for line in result.stdout.splitlines() if "│" in line)
    assert [cell.strip() for cell in header.strip("┃ ").split("┃")][:2] == ["AUROC", "pixel AUROC"]
    assert [cell.strip() for cell in row.strip("│ ").split("│")][1] == "-", result.stdout


def test_bad_image_without_mask_fails_naming_it(dirs: EvalDirs, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    shutil.copytree(dirs.masks, masks)
    (masks / "bad_02.png").unlink()
    result = _eval(dirs, "--json", masks=masks)
    assert result.exit_code != 0 and result.stdout == ""
    message = _flat(result.stderr)
    assert _flat(str(dirs.bad / "bad_02.png")) in message and "nodefectmask" in message


def test_mask_without_bad_image_fails_naming_it(dirs: EvalDirs, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    shutil.copytree(dirs.masks, masks)
    _save(np.zeros((128, 128), np.uint8), masks / "stray.png")
    result = _eval(dirs, "--json", masks=masks)
    assert result.exit_code != 0 and result.stdout == ""
    message = _flat(result.stderr)
    assert _flat(str(masks / "stray.png")) in message and "nobadimage" in message


def test_masks_follow_the_bad_images_that_decoded(dirs: EvalDirs) -> None:
    quiet = Console(file=io.StringIO())
    kept = load_image_files([dirs.bad], quiet)
    assert [path.stem for path, _ in kept] == [f"bad_{i:02d}" for i in range(N_BAD)]
    masks = load_masks(dirs.masks, dirs.bad, kept)
    assert len(masks) == N_BAD
    for mask, drawn in zip(masks, dirs.drawn, strict=True):
        assert mask.dtype == np.bool_ and np.array_equal(mask, drawn)


# -- metrics.pixel_auroc ----------------------------------------------------------------------
def test_pixel_auroc_of_perfect_and_inverted_localisation() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    heat = mask.astype(np.float32)
    clean = np.zeros((4, 4), bool)
    assert pixel_auroc([heat, np.zeros((4, 4), np.float32)], [mask, clean]) == 1.0
    assert pixel_auroc([1.0 - heat, np.ones((4, 4), np.float32)], [mask, clean]) == 0.0
    # subsampled negatives (a fixed stride) keep the answer and are deterministic
    assert pixel_auroc([heat, heat * 0], [mask, clean], max_negatives=5) == 1.0


def test_pixel_auroc_enlarges_grid_heatmaps_bilinearly() -> None:
    grid = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)  # hot top-left cell
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # bilinear values there: 1, 0.75, 0.75, 0.5625; elsewhere <= 0.25
    assert pixel_auroc([grid], [mask]) == 1.0
    shifted = np.zeros((4, 4), bool)
    shifted[2:, 2:] = True
    assert pixel_auroc([grid], [shifted]) < 0.25


def test_pixel_auroc_needs_defect_and_clean_pixels() -> None:
    heat = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="defect pixel"):
        pixel_auroc([heat], [np.zeros((2, 2), bool)])
    with pytest.raises(ValueError, match="outside"):
        pixel_auroc([heat], [np.ones((2, 2), bool)])
    with pytest.raises(ValueError, match="masks"):
        pixel_auroc([heat], [])


def _fit(tmp_path: Path, good: Path, *extra: str) -> Result:
    """``imgpipe anomaly fit`` on the good images and their mirror images (8 in all)."""
    images = tmp_path / "fit"
    for path in sorted(good.glob("*.png")):
        pixels = np.asarray(Image.open(path))
        _save(pixels, images / path.name)
        _save(np.ascontiguousarray(pixels[:, ::-1]), images / f"mirror_{path.name}")
    env = {"COLUMNS": "200", "IMGPIPE_DATA_DIR": str(tmp_path / "data")}
    args = ["anomaly", "fit", str(tmp_path / "p.npz"), str(images), *extra]
    return CliRunner().invoke(app, args, env=env)


def test_fit_config_overrides_the_recipe_and_the_profile_records_it(
    dirs: EvalDirs, tmp_path: Path
) -> None:
    result = _fit(tmp_path, dirs.good, "--config", '{"colour_map": true, "stats_cells": 3}')
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "p.npz") as data:
        meta = json.loads(data["meta"].tobytes().decode())
    assert meta["config"]["colour_map"] is True and meta["config"]["stats_cells"] == 3
    assert meta["config"]["knn"] == 1  # the fields not named keep the default recipe


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ('{"colour_maps": true}', "unknown recipe field(s) colour_maps"),
        ('{"stats_scaling": "loud"}', "stats_scaling must be one of"),
        ('{"colour_map": true, "stats_weight": 0}', "colour_map needs the local statistics"),
        ("[1, 2]", "must be a JSON object"),
        ("{colour_map: true}", "not valid JSON"),
    ],
)
def test_fit_refuses_a_bad_config_naming_what_is_wrong(
    dirs: EvalDirs, tmp_path: Path, overrides: str, named: str
) -> None:
    result = _fit(tmp_path, dirs.good, "--config", overrides)
    assert result.exit_code == 2, result.output
    assert named in _flat(result.output) or named in result.output, result.output
    assert not (tmp_path / "p.npz").exists()


def test_fit_coreset_sets_the_memory_bank_share(dirs: EvalDirs, tmp_path: Path) -> None:
    result = _fit(tmp_path, dirs.good, "--coreset", "0.05")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "p.npz") as data:
        meta = json.loads(data["meta"].tobytes().decode())
        bank_rows = data["memory_bank"].shape[0]
    assert meta["coreset_fraction"] == 0.05 and bank_rows == meta["memory_bank_size"]
    default = _fit(tmp_path / "default", dirs.good)
    assert default.exit_code == 0, default.output
    with np.load(tmp_path / "default" / "p.npz") as data:
        assert data["memory_bank"].shape[0] == pytest.approx(2 * bank_rows, abs=1)


@pytest.mark.parametrize("share", ["0", "1.5"])
def test_fit_refuses_a_coreset_share_outside_0_1(
    dirs: EvalDirs, tmp_path: Path, share: str
) -> None:
    result = _fit(tmp_path, dirs.good, "--coreset", share)
    assert result.exit_code == 2, result.output
    assert _flat("--coreset must be a fraction in (0, 1]") in _flat(result.output), result.output
    assert not (tmp_path / "p.npz").exists()
