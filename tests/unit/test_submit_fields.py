"""One parser for every entry point: the stream entry, the Celery task's fields and the
Python API reject the same bad field with the same reason and the same message; overrides
are accepted only where the pipeline file allows them, and never name a file."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from imgpipe.errors import ImgpipeError, OverrideNotAllowedError, PipelineSpecError
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.ingest_entry import parse_entry
from orchestrator.overrides import check_overrides
from orchestrator.pipelines import load_pipeline, parse_pipeline
from orchestrator.submit_fields import SubmitFields, build_request, rejection_code
from orchestrator.submit_task import parse_task_fields

IMAGE = b"\x89PNG not decoded by the parser"


@pytest.fixture
def ctx(tmp_path: Path) -> OrchestratorContext:
    return OrchestratorContext(Settings(data_dir=tmp_path, metadata_max_bytes=1024))


def _text(value: Any) -> bytes:
    """A stream field's bytes: objects as compact JSON text, anything else as text."""
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":")).encode()
    return str(value).encode()


def _stream(ctx: OrchestratorContext, fields: dict[str, Any]) -> tuple[str, str]:
    raw = {k.encode(): _text(v) for k, v in fields.items()}
    raw[b"image"] = IMAGE
    return _outcome(lambda: parse_entry(ctx, "1-1", raw))


def _celery(ctx: OrchestratorContext, fields: dict[str, Any]) -> tuple[str, str]:
    kwargs = {**fields, "image_b64": base64.b64encode(IMAGE).decode()}
    return _outcome(lambda: parse_task_fields(ctx, "task-1", kwargs))


def _api(ctx: OrchestratorContext, fields: dict[str, Any]) -> tuple[str, str]:
    submitted = SubmitFields(data=IMAGE, **fields)
    return _outcome(lambda: build_request(ctx, submitted, source="api"))


def _outcome(parse: Any) -> tuple[str, str]:
    try:
        parse()
    except ImgpipeError as exc:
        return rejection_code(exc), str(exc)
    return "accepted", ""


BAD = [
    ({"idempotency_key": "k" * 201}, "bad_field", "1 to 200 characters"),
    ({"idempotency_key": "stream:1-1"}, "bad_field", "may not start with 'stream:'"),
    ({"idempotency_key": "celery:abc"}, "bad_field", "may not start with 'celery:'"),
    ({"reply_to": "imgpipe.cpu.bulk"}, "bad_field", "must be a stream name under"),
    ({"reply_to": "imgpipe:reply:" + "r" * 200}, "bad_field", "at most 200 characters"),
    ({"priority": "urgent"}, "bad_field", "'interactive' or 'bulk'"),
    ({"pipeline": "/etc/evil.toml"}, "unknown_pipeline", "file paths are not accepted"),
    ({"pipeline": "nope"}, "unknown_pipeline", "known: basic"),
    ({"metadata": {"a": "x" * 2000}}, "metadata_too_large", "IMGPIPE_METADATA_MAX_BYTES"),
    ({"overrides": {"q": "x" * 2000}}, "overrides_too_large", "IMGPIPE_METADATA_MAX_BYTES"),
    ({"overrides": {"quality": 3}}, "bad_field", "must be an object of parameters"),
]


@pytest.mark.parametrize(("fields", "code", "hint"), BAD)
def test_every_entry_point_rejects_a_bad_field_with_the_same_reason_and_message(
    ctx: OrchestratorContext, fields: dict[str, Any], code: str, hint: str
) -> None:
    outcomes = {"stream": _stream(ctx, fields), "celery": _celery(ctx, fields),
                "api": _api(ctx, fields)}  # fmt: skip
    assert len(set(outcomes.values())) == 1, outcomes
    got_code, message = outcomes["api"]
    assert got_code == code and hint in message, message


def test_valid_fields_give_the_same_request_on_every_entry_point(ctx: OrchestratorContext) -> None:
    fields: dict[str, Any] = {
        "pipeline": "basic", "idempotency_key": "k-1", "priority": "bulk",
        "reply_to": "imgpipe:reply:svc", "metadata": {"order": 7},
        "overrides": {"quality": {"min_side_px": 64}},
    }  # fmt: skip
    raw = {k.encode(): _text(v) for k, v in fields.items()}
    stream = parse_entry(ctx, "9-0", {**raw, b"image": IMAGE})
    celery = parse_task_fields(
        ctx, "t-9", {**fields, "image_b64": base64.b64encode(IMAGE).decode()}
    )
    api = build_request(ctx, SubmitFields(data=IMAGE, **fields), source="api")
    for request in (stream, celery, api):
        assert (request.data, request.pipeline, request.idempotency_key) == (IMAGE, "basic", "k-1")
        assert (request.priority, request.reply_to) == ("bulk", "imgpipe:reply:svc")
        assert request.overrides == {"quality": {"min_side_px": 64}}
        assert request.metadata is not None and request.metadata["order"] == 7


def test_submissions_without_a_key_get_one_redelivery_finds(ctx: OrchestratorContext) -> None:
    assert parse_entry(ctx, "5-1", {b"image": IMAGE}).idempotency_key == "stream:5-1"
    image_b64 = base64.b64encode(IMAGE).decode()
    assert parse_task_fields(ctx, "t-5", {"image_b64": image_b64}).idempotency_key == "celery:t-5"


def test_celery_fields_are_checked_for_type_and_name(ctx: OrchestratorContext) -> None:
    image_b64 = base64.b64encode(IMAGE).decode()
    cases = [
        ({"image_b64": image_b64, "colour": "red"}, "unknown_field"),
        ({"pipeline": "basic"}, "missing_image"),
        ({"image_b64": "%%%"}, "bad_field"),
        ({"image_b64": image_b64, "pipeline": 3}, "bad_field"),
        ({"image_b64": image_b64, "force": "maybe"}, "bad_field"),
        ({"image_b64": image_b64, "metadata": [1, 2]}, "bad_json"),
    ]
    for kwargs, code in cases:
        assert _outcome(lambda k=kwargs: parse_task_fields(ctx, "t", k))[0] == code, kwargs


# -- overrides ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pipeline", "overrides", "needle"),
    [
        ("full", {"anomaly": {"profile": "/etc/shadow"}}, "names a file the worker opens"),
        ("full", {"detect": {"weights_path": "/tmp/evil.pt"}}, "names a file the worker opens"),
        ("moderation", {"moderate": {"weights_path": "/x.onnx"}}, "may not set file paths"),
        ("full", {"detect": {"model": "retinanet_resnet50_fpn_v2"}}, "not overridable"),
        ("basic", {"enhance": {"max_gain": 9}}, "is not overridable"),
        ("basic", {"quality": {"analysis_max_side_px": 64}}, "is not overridable"),
    ],
)
def test_overrides_outside_the_pipelines_allow_list_are_refused(
    pipeline: str, overrides: dict[str, Any], needle: str
) -> None:
    spec = load_pipeline(pipeline)
    with pytest.raises(OverrideNotAllowedError, match="override") as info:
        check_overrides(spec, overrides)
    assert needle in str(info.value)
    assert "lets submissions override" in str(info.value)


def test_allowed_overrides_pass_including_nested_thresholds() -> None:
    check_overrides(
        load_pipeline("full"),
        {
            "moderate": {"thresholds": {"FEMALE_BREAST_EXPOSED": {"block": 0.7}}},
            "detect": {"score_threshold": 0.4},
            "anomaly": {"threshold": 2.5},
            "quality": {"min_side_px": 16},
        },
    )


def test_a_dotted_allow_list_entry_allows_only_that_subtree() -> None:
    spec = parse_pipeline(
        {"name": "t", "stages": {"moderate": {"overridable": ["thresholds.FACE_FEMALE"]}}}
    )
    check_overrides(spec, {"moderate": {"thresholds": {"FACE_FEMALE": {"review": 0.2}}}})
    with pytest.raises(OverrideNotAllowedError, match=r"thresholds\.ANUS_EXPOSED\.block"):
        check_overrides(spec, {"moderate": {"thresholds": {"ANUS_EXPOSED": {"block": 0.9}}}})


def test_a_pipeline_file_cannot_make_a_file_path_overridable() -> None:
    with pytest.raises(PipelineSpecError, match=r"stages\.anomaly\.overridable: 'profile'"):
        parse_pipeline({"name": "t", "stages": {"anomaly": {"overridable": ["profile"]}}})
    with pytest.raises(PipelineSpecError, match="must be a list of parameter names"):
        parse_pipeline({"name": "t", "stages": {"quality": {"overridable": "min_side_px"}}})


def test_a_pipeline_without_an_allow_list_accepts_no_overrides() -> None:
    spec = parse_pipeline({"name": "t", "stages": {"quality": {}}})
    with pytest.raises(OverrideNotAllowedError, match="it lets submissions override: nothing"):
        check_overrides(spec, {"quality": {"min_side_px": 10}})
