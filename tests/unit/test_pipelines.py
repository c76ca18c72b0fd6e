"""Pipeline specs are validated with messages that name the bad field."""

from __future__ import annotations

from typing import Any

import pytest

from imgpipe.errors import PipelineSpecError
from imgpipe.policy import evaluate_policy
from orchestrator.pipelines import load_pipeline, parse_pipeline, pipeline_hash, pipeline_names


def spec(**stages: dict[str, Any]) -> dict[str, Any]:
    return {"name": "t", "stages": stages}


def test_builtins_are_full_moderation_qc_and_basic() -> None:
    assert {"full", "moderation", "qc", "basic"} <= set(pipeline_names())
    full = load_pipeline("full")
    assert [s.name for s in full.stages][:2] == ["quality", "enhance"]
    assert full.stage("detect").reads == "enhance"
    assert full.stage("moderate").reads == "original"
    assert full.stage("quality").gate


def test_unknown_need_names_the_field_and_the_known_stages() -> None:
    with pytest.raises(PipelineSpecError, match=r"stages\.enhance\.needs: unknown stage 'qualty'"):
        parse_pipeline(spec(quality={}, enhance={"needs": ["qualty"]}))


def test_cycle_is_reported_with_its_path() -> None:
    with pytest.raises(PipelineSpecError, match="dependency cycle"):
        parse_pipeline(spec(quality={"needs": ["enhance"]}, enhance={"needs": ["quality"]}))


def test_unknown_stage_key_and_kind_are_refused() -> None:
    with pytest.raises(PipelineSpecError, match=r"stages\.quality\.nedds: unknown key"):
        parse_pipeline(spec(quality={"nedds": []}))
    with pytest.raises(PipelineSpecError, match="unknown stage kind 'sharpen'"):
        parse_pipeline(spec(sharpen={}))


def test_reads_must_be_an_image_producing_ancestor() -> None:
    with pytest.raises(PipelineSpecError, match="must be among this stage's needs"):
        parse_pipeline(spec(quality={}, enhance={}, detect={"reads": "enhance"}))
    with pytest.raises(PipelineSpecError, match="produces no image"):
        parse_pipeline(spec(quality={}, detect={"needs": ["quality"], "reads": "quality"}))


def test_policy_rule_with_bad_verdict_names_the_rule() -> None:
    data = spec(quality={})
    data["policy"] = {
        "vocabulary": "qc",
        "rules": [
            {"stage": "quality", "field": "score", "op": "<", "value": 1, "verdict": "block"}
        ],
    }
    with pytest.raises(PipelineSpecError, match=r"policy\.rules\[0\]\.verdict"):
        parse_pipeline(data)


def test_policy_takes_the_most_severe_verdict_and_explains_it() -> None:
    policy = load_pipeline("basic").policy
    verdict, reasons = evaluate_policy(policy, {"quality": {"score": 20.0}})
    assert verdict == "fail"
    assert any("quality.score=20 < 25 -> fail" in r for r in reasons)
    assert evaluate_policy(policy, {"quality": {"score": 80.0}}) == ("pass", [])
    verdict, reasons = evaluate_policy(policy, {}, gate_tripped="blank image")
    assert verdict == "fail" and reasons[0].startswith("quality_gate")


def test_hash_changes_with_params_and_not_with_key_order() -> None:
    base = load_pipeline("basic").to_json()
    same = {
        "stages": dict(reversed(list(base["stages"].items()))),
        **{k: v for k, v in base.items() if k != "stages"},
    }
    assert pipeline_hash(base) == pipeline_hash(same)
    changed = load_pipeline("basic").to_json()
    changed["stages"]["enhance"]["params"] = {"unsharp_amount": 2.0}
    assert pipeline_hash(base) != pipeline_hash(changed)


def test_noop_pipeline_has_the_shape_of_full_and_always_passes() -> None:
    full, noop = load_pipeline("full"), load_pipeline("noop")
    assert {(s.name, s.needs) for s in noop.stages} == {(s.name, s.needs) for s in full.stages}
    assert {s.kind for s in noop.stages} == {"noop"}
    assert all(s.reads == "original" and not s.gate for s in noop.stages)
    outputs = {s.name: {"noop": True} for s in noop.stages}
    assert evaluate_policy(noop.policy, outputs) == ("pass", [])
    noop.require_installed()


def test_noop_stage_returns_a_small_output_per_input_without_pixels() -> None:
    import numpy as np

    from workers.stagecontract import StageInput, StageOutput
    from workers.stages.noop import run_stage_batch

    image = np.zeros((4, 4, 3), np.uint8)
    inputs = [StageInput(image, (4, 4), {}, {"quality": {"noop": True}}) for _ in range(3)]
    results = run_stage_batch(inputs)
    assert len(results) == 3
    assert all(isinstance(r, StageOutput) and r.image is None and r.blob is None for r in results)
