"""``imgpipe anomaly fit|eval`` on an MVTec AD-style tree: images in nested folders, the
same file names in different defect folders, masks named ``000_mask.png``, and ``--bad``
given as the folder that also holds ``good/``.

Real CLI (typer's CliRunner on the ``imgpipe`` app), real fitting and scoring on PNG files
of synthetic brick crops with drawn defects.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data as skimage_data
from numpy.typing import NDArray
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner, Result

from imgpipe.face.cli import app
from imgpipe.face.cli_anomaly import image_files, load_image_files, load_masks
from workers.anomaly.metrics import auroc
from workers.anomaly.synthetic import DefectKind, add_defect, texture_split

KINDS: tuple[DefectKind, ...] = ("scratch", "stain")
PER_KIND = 2


def _save(pixels: NDArray[np.uint8], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/train/good, root/test/{good,scratch,stain}, root/ground_truth/{scratch,stain}
    with ``NNN_mask.png``; every defect mask is the pixels its defect changed."""
    root = tmp_path_factory.mktemp("mvtec")
    brick = skimage_data.brick()  # type: ignore[no-untyped-call]  # skimage.data is untyped
    split = texture_split(brick, n_fit=10, n_holdout=0, n_good=3 + 4, kinds=(), seed=5)
    for i, crop in enumerate(split.fit):
        _save(crop, root / "train" / "good" / f"{i:03d}.png")
    for i, crop in enumerate(split.good[:3]):
        _save(crop, root / "test" / "good" / f"{i:03d}.png")
    rng = np.random.default_rng(11)
    for k, kind in enumerate(KINDS):
        for i in range(PER_KIND):
            crop = split.good[3 + k * PER_KIND + i]
            defective = add_defect(crop, kind, rng)
            changed = np.abs(defective.astype(np.int16) - crop.astype(np.int16)).max(axis=2) > 8
            _save(defective, root / "test" / kind / f"{i:03d}.png")
            _save(
                changed.astype(np.uint8) * 255, root / "ground_truth" / kind / f"{i:03d}_mask.png"
            )
    (root / "test" / ".DS_Store").write_bytes(b"not an image")
    return root


def _cli(root: Path, *args: str) -> Result:
    env = {"COLUMNS": "200", "IMGPIPE_DATA_DIR": str(root / "data")}
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture(scope="module")
def profile(tree: Path) -> Path:
    """``imgpipe anomaly fit`` given the top folder, ``train/``."""
    path = tree / "brick.npz"
    fitted = _cli(tree, "anomaly", "fit", str(path), str(tree / "train"))
    assert fitted.exit_code == 0, fitted.output
    return path


def test_fit_and_eval_on_an_mvtec_tree(tree: Path, profile: Path) -> None:
    with np.load(profile) as data:
        meta = json.loads(data["meta"].tobytes().decode())
    assert meta["fit_images"] == 10  # found under train/good/
    result = _cli(
        tree, "anomaly", "eval", str(profile), "--good", str(tree / "test" / "good"),
        "--bad", str(tree / "test"), "--masks", str(tree / "ground_truth"), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # test/good is the good set, not bad; scratch/000 and stain/000 are two images
    assert report["n_good"] == 3 and report["n_bad"] == len(KINDS) * PER_KIND
    assert report["pixel_auroc"] is not None and report["pixel_auroc"] > 0.5
    # per defect kind, from the folder below --bad: every bad image counted once
    kinds = report["per_kind"]
    assert set(kinds) == set(KINDS) and all(row["n"] == PER_KIND for row in kinds.values())
    assert sum(row["flagged"] for row in kinds.values()) == report["tp"]
    for row in kinds.values():
        assert 0.0 <= row["auroc"] <= 1.0 and 0 <= row["flagged"] <= row["n"]
    names = [f"{kind}/{i:03d}.png" for kind in KINDS for i in range(PER_KIND)]
    order = [name.split("/")[0] for name in names]  # bad_scores are in file order
    for kind in KINDS:
        scores = [s for s, k in zip(report["bad_scores"], order, strict=True) if k == kind]
        flagged = sum(1 for s in scores if s > report["threshold"])
        assert kinds[kind]["flagged"] == flagged
        assert kinds[kind]["auroc"] == auroc(report["good_scores"], scores)


def test_eval_table_lists_each_defect_kind(tree: Path, profile: Path) -> None:
    result = _cli(
        tree, "anomaly", "eval", str(profile), "--good", str(tree / "test" / "good"),
        "--bad", str(tree / "test"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "│" in line]
    assert len(rows) == 1 + len(KINDS), result.stdout  # the totals, then one row per kind
    for kind, row in zip(KINDS, rows[1:], strict=True):
        cells = [cell.strip() for cell in row.strip("│ ").split("│")]
        assert cells[0] == kind and cells[1] == str(PER_KIND), result.stdout


def test_nested_masks_pair_with_their_own_images(tree: Path) -> None:
    quiet = Console(file=io.StringIO())
    kept = load_image_files([tree / "test"], quiet, None, [tree / "test" / "good"])
    assert [p.relative_to(tree / "test").as_posix() for p, _ in kept] == [
        f"{kind}/{i:03d}.png" for kind in KINDS for i in range(PER_KIND)
    ]
    masks = load_masks(tree / "ground_truth", tree / "test", kept)
    for (path, _), mask in zip(kept, masks, strict=True):
        kind, name = path.parent.name, path.stem
        expected = np.asarray(Image.open(tree / "ground_truth" / kind / f"{name}_mask.png")) > 0
        assert np.array_equal(mask, expected), path


def test_a_missing_nested_mask_names_both_accepted_names(
    tree: Path, profile: Path, tmp_path: Path
) -> None:
    masks = tmp_path / "gt"
    for path in image_files([tree / "ground_truth"]):
        if path.name != "001_mask.png" or path.parent.name != "stain":
            target = masks / path.relative_to(tree / "ground_truth")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    result = _cli(
        tree, "anomaly", "eval", str(profile), "--good", str(tree / "test" / "good"),
        "--bad", str(tree / "test"), "--masks", str(masks), "--json",
    )  # fmt: skip
    assert result.exit_code != 0 and result.stdout == ""
    message = "".join(result.stderr.split())
    assert "".join(str(tree / "test" / "stain" / "001.png").split()) in message, message
    assert "".join(str(masks / "stain" / "001_mask.png").split()) in message, message


def test_hidden_files_and_excluded_folders_are_not_images(tree: Path) -> None:
    found = image_files([tree / "test"], [tree / "test" / "good"])
    assert all(p.parent.name in KINDS for p in found)
    assert len(found) == len(KINDS) * PER_KIND
