"""The anomaly backbone (EfficientNet-Lite0) in reduced precision and channels_last,
against fp32, on the CPU (and on cuda:0 in the ``gpu`` variant).

Tolerance: the feature maps within 2 % (relative L2) of fp32, and every anomaly score
of a profile fitted in fp32 within 2 % of the profile's threshold, with the same
``anomalous`` verdict.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data as skimage_data
import torch
from numpy.typing import NDArray

from workers.anomaly import ProfileInfo, fit_profile, load_profile, score_images
from workers.anomaly.patchcore import FeatureConfig, preprocess
from workers.anomaly.synthetic import TextureSplit, texture_split
from workers.models.efficientnet_lite0 import (
    EfficientNetLite0Features,
    FeatureRequest,
    default_weights_path,
)

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "samples").glob("*.jpg"))
FEATURE_REL_TOL = 0.02
SCORE_TOL_OF_THRESHOLD = 0.02
CUDA = pytest.param(
    "cuda:0",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


def _backbone(device: str = "cpu", **options: object) -> EfficientNetLite0Features:
    return EfficientNetLite0Features(default_weights_path(), device=device, **options)  # type: ignore[arg-type]


def _features(backbone: EfficientNetLite0Features) -> list[list[torch.Tensor]]:
    config = FeatureConfig()
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in SAMPLES]
    x = preprocess(images, config, backbone.device)
    return backbone.predict([FeatureRequest(img, config.blocks) for img in x])


def _max_relative_error(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> float:
    return max(
        ((g.cpu() - w.cpu()).norm() / w.cpu().norm()).item()
        for gs, ws in zip(got, want, strict=True)
        for g, w in zip(gs, ws, strict=True)
    )


@pytest.fixture(scope="module")
def fp32_features() -> list[list[torch.Tensor]]:
    return _features(_backbone(channels_last=False))


@pytest.fixture(scope="module")
def brick() -> TextureSplit:
    return texture_split(
        skimage_data.brick(), n_fit=16, n_holdout=4, n_good=8, n_bad_per_kind=3, seed=1
    )


@pytest.fixture(scope="module")
def fitted(brick: TextureSplit, tmp_path_factory: pytest.TempPathFactory) -> ProfileInfo:
    path = tmp_path_factory.mktemp("anomaly") / "brick.npz"
    return fit_profile(brick.fit, path, name="brick", holdout_images=brick.holdout, seed=0)


def _scores(
    fitted: ProfileInfo, images: list[NDArray[np.uint8]], backbone: EfficientNetLite0Features
) -> list[float]:
    return [s.score for s in score_images(load_profile(fitted.path), images, backbone)]


def test_backbone_features_fp32_channels_last_equal_contiguous(
    fp32_features: list[list[torch.Tensor]],
) -> None:
    backbone = _backbone()  # channels_last is the CPU default for this model
    assert backbone.memory_format == torch.channels_last
    got = _features(backbone)
    # float32, left in the network's layout (each map is one image of an NHWC batch):
    # the anomaly stage stacks them channels_last without a second copy
    assert all(f.dtype == torch.float32 and f.stride()[0] == 1 for fs in got for f in fs)
    assert _max_relative_error(got, fp32_features) < 1e-5


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_backbone_in_fp16_is_within_tolerance_of_fp32(
    fp32_features: list[list[torch.Tensor]],
    fitted: ProfileInfo,
    brick: TextureSplit,
    device: str,
) -> None:
    precision = "fp16"
    backbone = _backbone(device, precision=precision)
    assert backbone.precision == precision
    if device.startswith("cuda"):
        assert backbone.memory_format == torch.channels_last
    got = _features(backbone)
    assert all(f.dtype == torch.float32 for fs in got for f in fs)
    assert _max_relative_error(got, fp32_features) <= FEATURE_REL_TOL

    images = brick.good + brick.bad
    want = _scores(fitted, images, _backbone())
    scores = _scores(fitted, images, backbone)
    threshold = load_profile(fitted.path).threshold
    worst = max(abs(a - b) for a, b in zip(scores, want, strict=True)) / threshold
    assert worst <= SCORE_TOL_OF_THRESHOLD, f"{precision}: {worst:.4f} of the threshold"
    assert [s > threshold for s in scores] == [s > threshold for s in want]


def test_backbone_in_bf16_is_not_within_tolerance_so_it_runs_fp32(
    fp32_features: list[list[torch.Tensor]],
) -> None:
    """bf16's 8-bit mantissa: block features 5.4 % off fp32 on the samples (fp16: 0.7 %)."""
    assert "bf16" not in EfficientNetLite0Features.reduced_precisions
    assert _backbone(precision="bf16").precision == "fp32"
    forced = _backbone()
    forced.dtype = torch.bfloat16
    forced.ensure_loaded().to(torch.bfloat16)
    assert _max_relative_error(_features(forced), fp32_features) > FEATURE_REL_TOL
