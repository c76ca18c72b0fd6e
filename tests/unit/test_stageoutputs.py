"""One schema per stage kind's output (imgpipe/stageoutputs.py): the producers' outputs
match it, and the readers (gate, policy, summary, CLI) read through it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from imgpipe.errors import PermanentError, PipelineSpecError
from imgpipe.face.cli_render import stage_cell
from imgpipe.policy import parse_policy
from imgpipe.stagekinds import STAGE_KINDS
from imgpipe.stageoutputs import (
    HEADLINE_FIELDS,
    SCHEMAS,
    field_problem,
    gate_reason,
    headline,
    read_output,
)
from orchestrator.pipelines import parse_pipeline
from tests.unit.conftest import LoadSample
from workers.models.detection import DetectResult
from workers.stagecontract import DetectionRow, StageInput
from workers.stages import detect, moderate
from workers.stages.classical import run_enhance_batch, run_quality_batch
from workers.stages.noop import run_stage_batch as run_noop_batch


def wire(output: Any) -> dict[str, Any]:
    """What a reader gets back from the database's JSON column."""
    return dict(json.loads(json.dumps(output)))


def test_every_stage_kind_has_a_schema_and_headline_fields() -> None:
    assert set(SCHEMAS) == set(STAGE_KINDS) == set(HEADLINE_FIELDS)


def test_classical_outputs_match_their_schemas(load_sample: LoadSample) -> None:
    image = load_sample("degraded/rocket_lowcontrast")
    (quality,) = run_quality_batch([StageInput(image, image.shape[1::-1], {}, {})])
    assert not isinstance(quality, type(None))
    quality_json = wire(quality.output)  # type: ignore[union-attr]
    read_output("quality", quality_json)
    enhance_input = StageInput(
        image, image.shape[1::-1], {}, {"q": quality_json}, upstream_kinds={"q": "quality"}
    )
    (enhanced,) = run_enhance_batch([enhance_input])
    read_output("enhance", wire(enhanced.output))  # type: ignore[union-attr]
    (noop,) = run_noop_batch([StageInput(image, (4, 4), {}, {"q": {}})])
    read_output("noop", wire(noop.output))  # type: ignore[union-attr]


def test_enhance_finds_its_quality_input_by_kind_not_by_keys() -> None:
    image = np.full((32, 32, 3), 128, np.uint8)
    looks_like_quality = {"score": 1.0, "flags": [], "usable": True}
    item = StageInput(image, (32, 32), {}, {"q": looks_like_quality}, upstream_kinds={"q": "noop"})
    with pytest.raises(PermanentError, match="enhance needs the result of a quality stage"):
        run_enhance_batch([item])


def test_model_stage_outputs_match_their_schemas() -> None:
    image = np.zeros((20, 40, 3), np.uint8)
    found = DetectResult(detections=(DetectionRow("FACE_F", 0.9, 1.0, 2.0, 10.0, 12.0),))
    model = {"name": "m", "version": "1", "sha256": "0" * 64}
    item = StageInput(image, (80, 40), {}, {})
    detected = wire(detect._stage_output(item, found, model).output)
    assert read_output("detect", detected)["count"] == 1
    scores = dict.fromkeys(moderate.CATEGORIES, 0.0)
    thresholds = moderate.DEFAULT_THRESHOLDS
    read_output("moderate", wire(moderate._stage_output(scores, thresholds, model).output))


def test_an_output_out_of_step_with_its_schema_is_named() -> None:
    with pytest.raises(PermanentError, match=r"quality stage's output .* at 'usable'"):
        read_output("quality", {"score": 1.0, "flags": [], "metrics": {}})


def test_gate_reads_the_quality_schema() -> None:
    base = {"score": 5.0, "flags": [], "metrics": {}, "unusable_reason": None}
    assert gate_reason("quality", {**base, "usable": True}) is None
    assert gate_reason("quality", {**base, "usable": False}) == "image unusable"
    tripped = {**base, "usable": False, "unusable_reason": "blank"}
    assert gate_reason("quality", tripped) == "blank"


def test_headline_is_per_kind() -> None:
    output = {"score": 0.7, "anomalous": True, "threshold": 0.5}
    assert headline("anomaly", "anomaly", output) == {
        "anomaly.score": 0.7,
        "anomaly.anomalous": True,
    }
    # the same keys under a kind that does not headline them are not summarised
    assert headline("n", "noop", {"score": 1, "noop": True, "upstream": []}) == {}


def test_policy_fields_are_checked_against_the_schema() -> None:
    assert field_problem("quality", "score") is None
    assert field_problem("moderate", "scores.FACE_F") is None
    assert field_problem("anomaly", "heatmap.max") is None
    problem = field_problem("quality", "scor")
    assert problem is not None and "no field 'scor'" in problem and "score" in problem
    assert field_problem("quality", "score.value") is not None
    rule = {"stage": "q", "field": "scor", "op": "<", "value": 1, "verdict": "fail"}
    with pytest.raises(PipelineSpecError, match=r"policy\.rules\[0\]\.field: quality outputs"):
        parse_policy("t", {"rules": [rule]}, {"q": "quality"})
    assert parse_policy("t", {"rules": [rule]}, {"q": "quality"}, check_fields=False).rules
    with pytest.raises(PipelineSpecError, match=r"rules\[0\]\.field"):
        parse_pipeline(
            {"name": "t", "stages": {"q": {"kind": "quality"}}, "policy": {"rules": [rule]}}
        )


def test_cli_cell_reads_outputs_by_schema() -> None:
    quality = {"score": 42.4, "flags": ["dark"], "metrics": {}, "usable": True}
    cell = stage_cell({"status": "succeeded", "kind": "quality", "output": quality})
    assert cell == "output does not match its schema"  # no unusable_reason
    quality["unusable_reason"] = None
    assert stage_cell({"status": "succeeded", "kind": "quality", "output": quality}) == "42 dark"
