"""torchvision COCO detectors through the detect stage, with randomly initialised weights.

No checkpoint is downloaded: each test builds the network with ``weights=None``, saves its
state dict under ``tmp_path`` and points the stage (or the hub cache) at it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.models import detection

from imgpipe.errors import PermanentError, WeightsMismatchError
from workers.models.base import sha256_file
from workers.models.torchvision_detectors import (
    TORCHVISION_DETECTORS,
    hub_checkpoint_path,
)
from workers.stagecontract import StageInput, StageOutput
from workers.stages import detect

BUILDERS = {
    "fasterrcnn_mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
    "ssdlite320_mobilenet_v3_large": detection.ssdlite320_mobilenet_v3_large,
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """These inputs are tiny: one intra-op thread is faster than two and does not collapse
    when the CI machine is oversubscribed (OpenMP spin-waits); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_state_dict(model: str, path: Path, *, drop_batch_counters: bool = False) -> Path:
    torch.manual_seed(0)
    network = BUILDERS[model](weights=None, weights_backbone=None, num_classes=91)
    state = network.state_dict()
    if drop_batch_counters:  # the layout of torchvision's published (FrozenBatchNorm) files
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path


def images() -> list[np.ndarray[Any, np.dtype[np.uint8]]]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        rng.integers(0, 256, (64, 40, 3), dtype=np.uint8),
    ]


def shrink(params: dict[str, Any]) -> None:
    """Let Faster R-CNN resize to 128 px instead of 800 and keep 50 proposals instead of
    1000 (random weights score every class ~1/91, so all would reach NMS): the wiring is
    what is under test, not the network."""
    model = detect.detector_model(params["model"], params.get("weights_path"), None, "cpu")
    module = model.ensure_loaded()
    if isinstance(module, detection.FasterRCNN):
        module.transform.min_size, module.transform.max_size = (128,), 224
        module.rpn._pre_nms_top_n["testing"] = module.rpn._post_nms_top_n["testing"] = 50


def run(params: dict[str, Any]) -> list[StageOutput]:
    inputs = [StageInput(img, (img.shape[1] * 2, img.shape[0] * 2), params, {}) for img in images()]
    outputs = detect.run_stage_batch(inputs)
    assert all(isinstance(o, StageOutput) for o in outputs)
    return [o for o in outputs if isinstance(o, StageOutput)]


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_a_user_supplied_state_dict_loads_with_its_sha_and_detects(
    model: str, tmp_path: Path
) -> None:
    weights = random_state_dict(model, tmp_path / f"{model}.pt")
    params = {
        "model": model,
        "weights_path": str(weights),
        "weights_sha256": sha256_file(weights),
        "score_threshold": 0.0,
        "max_detections": 5,
    }
    shrink({**params, "weights_sha256": None})
    outputs = run(params)
    categories = set(TORCHVISION_DETECTORS[model].categories())
    for out, img in zip(outputs, images(), strict=True):
        width, height = img.shape[1] * 2, img.shape[0] * 2
        assert out.output["image_size"] == [width, height]
        assert out.output["count"] == len(out.output["detections"]) == len(out.detections) <= 5
        for det in out.output["detections"]:
            assert det["label"] in categories
            assert 0.0 <= det["score"] <= 1.0
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert out.model is not None
        assert out.model["name"] == model
        assert out.model["weights_sha256"] == params["weights_sha256"]
        assert "user-supplied" in out.model["license"]
        assert "BSD-3-Clause" in out.model["license"]


def test_a_wrong_sha_pin_is_a_weights_mismatch(tmp_path: Path) -> None:
    model = "ssdlite320_mobilenet_v3_large"
    weights = random_state_dict(model, tmp_path / "ssd.pt")
    with pytest.raises(WeightsMismatchError, match="replace the file or update the pinned"):
        run({"model": model, "weights_path": str(weights), "weights_sha256": "f" * 64})


def test_a_missing_weights_file_names_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(PermanentError, match=rf"{missing}.*not found; set weights_path"):
        run({"model": "fasterrcnn_mobilenet_v3_large_fpn", "weights_path": str(missing)})


def test_without_weights_path_the_hub_cache_is_used_or_its_path_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = "ssdlite320_mobilenet_v3_large"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = (
        tmp_path
        / "torch"
        / "hub"
        / "checkpoints"
        / "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"
    )
    assert hub_checkpoint_path(model) == expected
    with pytest.raises(PermanentError, match=rf"not in the hub cache at {expected}"):
        run({"model": model})
    expected.parent.mkdir(parents=True)
    random_state_dict(model, expected)
    (out, _) = run({"model": model})
    assert out.model is not None and out.model["source"] == str(expected)


def test_a_checkpoint_without_batchnorm_counters_loads(tmp_path: Path) -> None:
    model = "fasterrcnn_mobilenet_v3_large_fpn"
    weights = random_state_dict(model, tmp_path / "frozen_bn.pt", drop_batch_counters=True)
    loaded = detect.detector_model(model, str(weights), None, "cpu").ensure_loaded()
    assert all(int(v) == 0 for k, v in loaded.state_dict().items() if k.endswith("_tracked"))


def test_weights_for_another_network_are_a_clear_permanent_error(tmp_path: Path) -> None:
    weights = random_state_dict("ssdlite320_mobilenet_v3_large", tmp_path / "ssd.pt")
    with pytest.raises(PermanentError, match="does not fit 'fasterrcnn_mobilenet_v3_large_fpn'"):
        run({"model": "fasterrcnn_mobilenet_v3_large_fpn", "weights_path": str(weights)})
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(PermanentError, match="is not a state dict"):
        run({"model": "ssdlite320_mobilenet_v3_large", "weights_path": str(junk)})


def test_coco_category_names_and_checkpoint_names_come_from_torchvision() -> None:
    for name, cls in TORCHVISION_DETECTORS.items():
        categories = cls.categories()
        assert len(categories) == 91 and categories[1] == "person"
        assert cls.checkpoint_name().endswith(".pth")
        assert cls.name == name
    assert set(TORCHVISION_DETECTORS) == set(detect.DETECTOR_MODELS) - {detect.NUDENET_MODEL}
