"""The moderate stage: the policy as a pure function, and the stage on real photographs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

from imgpipe.errors import PermanentError
from workers.stagecontract import StageInput, StageOutput
from workers.stages.moderate import (
    DEFAULT_THRESHOLDS,
    CategoryThresholds,
    ModerateParams,
    run_stage_batch,
    verdict_from_scores,
)


def zeros(**scores: float) -> dict[str, float]:
    return {**dict.fromkeys(DEFAULT_THRESHOLDS, 0.0), **scores}


# -- the policy ----------------------------------------------------------------------------


def test_nothing_above_a_threshold_is_allowed_without_reasons() -> None:
    assert verdict_from_scores(zeros(), DEFAULT_THRESHOLDS) == ("allow", [])


def test_faces_and_swimwear_never_trigger_by_default() -> None:
    scores = zeros(FACE_FEMALE=0.99, FACE_MALE=0.99, FEMALE_BREAST_COVERED=0.95, FEET_EXPOSED=0.9)
    assert verdict_from_scores(scores, DEFAULT_THRESHOLDS) == ("allow", [])


def test_exposed_categories_review_then_block_as_the_score_rises() -> None:
    review = verdict_from_scores(zeros(FEMALE_BREAST_EXPOSED=0.40), DEFAULT_THRESHOLDS)
    assert review == ("review", ["FEMALE_BREAST_EXPOSED score 0.40 >= review threshold 0.35"])
    block = verdict_from_scores(zeros(FEMALE_BREAST_EXPOSED=0.81), DEFAULT_THRESHOLDS)
    assert block == ("block", ["FEMALE_BREAST_EXPOSED score 0.81 >= block threshold 0.60"])
    for category in ("FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_EXPOSED"):
        assert verdict_from_scores(zeros(**{category: 0.9}), DEFAULT_THRESHOLDS)[0] == "block"
    assert verdict_from_scores(zeros(BUTTOCKS_EXPOSED=0.74), DEFAULT_THRESHOLDS)[0] == "review"
    assert verdict_from_scores(zeros(ANUS_COVERED=0.99), DEFAULT_THRESHOLDS)[0] == "review"


def test_the_most_severe_level_wins_and_every_trigger_is_a_reason() -> None:
    scores = zeros(FEMALE_GENITALIA_COVERED=0.7, MALE_GENITALIA_EXPOSED=0.55, ANUS_EXPOSED=0.9)
    verdict, reasons = verdict_from_scores(scores, DEFAULT_THRESHOLDS)
    assert verdict == "block"
    assert reasons == [
        "ANUS_EXPOSED score 0.90 >= block threshold 0.50",
        "MALE_GENITALIA_EXPOSED score 0.55 >= block threshold 0.50",
        "FEMALE_GENITALIA_COVERED score 0.70 >= review threshold 0.60",
    ]


def test_a_score_equal_to_the_threshold_triggers() -> None:
    limits = {"FACE_MALE": CategoryThresholds(review=0.5, block=None)}
    assert verdict_from_scores({"FACE_MALE": 0.5}, limits)[0] == "review"
    assert verdict_from_scores({"FACE_MALE": 0.4999}, limits)[0] == "allow"


def test_every_detector_category_has_an_explicit_default() -> None:
    from workers.models.nudenet_detector import NUDENET_LABELS

    assert set(DEFAULT_THRESHOLDS) == set(NUDENET_LABELS)
    for limits in DEFAULT_THRESHOLDS.values():
        if limits.review is not None and limits.block is not None:
            assert limits.review <= limits.block


# -- thresholds from params ----------------------------------------------------------------


def test_thresholds_in_params_are_merged_per_level_over_the_defaults() -> None:
    params = ModerateParams.from_json(
        {
            "thresholds": {
                "FACE_FEMALE": {"review": 0.5},
                "FEMALE_BREAST_EXPOSED": {"block": None},
                "BUTTOCKS_EXPOSED": {"block": 0.7},
            }
        }
    )
    t = params.thresholds
    assert t["FACE_FEMALE"] == CategoryThresholds(review=0.5, block=None)
    assert t["FEMALE_BREAST_EXPOSED"] == CategoryThresholds(review=0.35, block=None)
    assert t["BUTTOCKS_EXPOSED"] == CategoryThresholds(review=0.45, block=0.7)
    assert t["ANUS_EXPOSED"] == DEFAULT_THRESHOLDS["ANUS_EXPOSED"]

    scores = zeros(FACE_FEMALE=0.81, FEMALE_BREAST_EXPOSED=0.9)
    assert verdict_from_scores(scores, DEFAULT_THRESHOLDS)[0] == "block"
    assert verdict_from_scores(scores, t) == (
        "review",
        [
            "FEMALE_BREAST_EXPOSED score 0.90 >= review threshold 0.35",
            "FACE_FEMALE score 0.81 >= review threshold 0.50",
        ],
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"threshold": {}}, "unknown parameter.*'threshold'"),
        ({"thresholds": []}, "thresholds must be an object"),
        ({"thresholds": {"NAKED": {"block": 0.5}}}, "unknown category 'NAKED'"),
        ({"thresholds": {"ANUS_EXPOSED": 0.5}}, r"thresholds.ANUS_EXPOSED must be an object"),
        ({"thresholds": {"ANUS_EXPOSED": {"warn": 0.5}}}, "keys 'review' and/or 'block'"),
        ({"thresholds": {"ANUS_EXPOSED": {"block": 2}}}, r"ANUS_EXPOSED.block must be a number"),
        ({"thresholds": {"ANUS_EXPOSED": {"block": True}}}, r"ANUS_EXPOSED.block must be a number"),
        ({"thresholds": {"ANUS_EXPOSED": {"review": 0.9}}}, "review 0.9 above block 0.5"),
        ({"weights_sha256": "xyz"}, "64 hex digits"),
    ],
)
def test_bad_thresholds_are_permanent_errors_naming_the_field(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(PermanentError, match=message):
        ModerateParams.from_json(params)


def test_importing_the_stage_does_not_import_torch() -> None:
    code = "import sys, workers.stages.moderate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the stage on photographs (needs the nudenet extra) ------------------------------------

_SKIMAGE = importlib.util.find_spec("skimage")


def photo(name: str) -> NDArray[np.uint8]:
    assert _SKIMAGE is not None and _SKIMAGE.submodule_search_locations
    root = Path(next(iter(_SKIMAGE.submodule_search_locations)))
    with Image.open(root / "data" / name) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny inputs: one intra-op thread is faster and immune to an oversubscribed CI."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stage_input(image: NDArray[np.uint8], params: dict[str, Any]) -> StageInput:
    return StageInput(image, (image.shape[1], image.shape[0]), params, {})


def test_the_stage_scores_every_category_and_applies_the_thresholds() -> None:
    astronaut, gradient = photo("astronaut.png"), photo("color.png")
    override = {"thresholds": {"FACE_FEMALE": {"review": 0.5}}}
    outputs = run_stage_batch(
        [stage_input(astronaut, {}), stage_input(gradient, {}), stage_input(astronaut, override)]
    )
    assert all(isinstance(o, StageOutput) for o in outputs)
    plain, colour_wheel, strict = (o.output for o in outputs if isinstance(o, StageOutput))

    for out in (plain, colour_wheel, strict):
        assert set(out["scores"]) == set(DEFAULT_THRESHOLDS)
        assert all(0.0 <= s <= 1.0 for s in out["scores"].values())
        assert set(out["thresholds"]) == set(DEFAULT_THRESHOLDS)
    assert plain["scores"]["FACE_FEMALE"] > 0.7
    assert (plain["verdict"], plain["reasons"]) == ("allow", [])
    # a round colour gradient looks like buttocks to this model: review, not block
    assert colour_wheel["verdict"] == "review"
    assert colour_wheel["reasons"][0].startswith("BUTTOCKS_EXPOSED score 0.7")
    assert strict["verdict"] == "review"
    assert strict["reasons"] == [
        f"FACE_FEMALE score {plain['scores']['FACE_FEMALE']:.2f} >= review threshold 0.50"
    ]
    assert strict["thresholds"]["FACE_FEMALE"] == {"review": 0.5, "block": None}
    assert plain["thresholds"]["ANUS_EXPOSED"] == {"review": 0.3, "block": 0.5}
    model = outputs[0].model if isinstance(outputs[0], StageOutput) else None
    assert model is not None and model["name"] == "nudenet-yolov8n"
    assert "AGPL-3.0" in model["license"]


def test_moderate_and_detect_share_one_model_per_process() -> None:
    from workers.stages.detect import detector_model

    run_stage_batch([stage_input(np.zeros((32, 32, 3), np.uint8), {})])
    shared = detector_model("nudenet-yolov8n", None, None, "cpu")
    assert shared.loaded  # loaded by the moderate run; the detect stage gets this instance
