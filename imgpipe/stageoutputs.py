"""The output of each stage kind: one schema per kind, shared by producer and readers.

A stage's output is the JSON stored on its ``stage_runs`` row. The stage functions in
workers/stages build these dicts (typed, so mypy checks the producer); the DAG step's
quality gate and the summary in db/dag.py, the verdict policy (imgpipe/policy.py, which
checks each rule's field against its stage's schema when a pipeline is loaded), the CLI's
table (imgpipe/face/cli_render.py) and the ``completed`` event read them through
``read_output``, which validates a stored output against its kind's schema. Renaming a
field here breaks mypy at the producer and pipeline validation at the rules, not verdicts
in silence.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Any, NotRequired, cast, get_args, get_origin

import pydantic

# typing_extensions' TypedDict: pydantic validates typing.TypedDict only from Python 3.12.
from typing_extensions import (
    TypedDict,
    get_type_hints,
    is_typeddict,
)

from imgpipe.errors import PermanentError

__all__ = [
    "HEADLINE_FIELDS",
    "SCHEMAS",
    "AnomalyOutput",
    "AppliedOpOutput",
    "DetectOutput",
    "DetectionOutput",
    "EnhanceOutput",
    "HeatmapOutput",
    "ModerateOutput",
    "ModerationThresholds",
    "NoopOutput",
    "QualityOutput",
    "field_problem",
    "gate_reason",
    "headline",
    "read_output",
]


class QualityOutput(TypedDict):
    score: float
    """0..100, higher is better."""
    flags: list[str]
    """Subset of blurry, dark, overexposed, low_contrast, noisy, low_res."""
    metrics: dict[str, float]
    """Raw metrics and the per-term sub-scores (``score_<term>``, 0..1)."""
    usable: bool
    """False: the quality gate trips (blank/uniform image, too tiny to process)."""
    unusable_reason: str | None


class AppliedOpOutput(TypedDict):
    op: str
    """``denoise``, ``gamma``, ``stretch``, ``clahe`` or ``unsharp``."""
    reason: str
    params: dict[str, float]


class EnhanceOutput(TypedDict):
    applied: list[AppliedOpOutput]
    """In the order applied; empty if nothing needed doing."""
    duration_ms: float
    width_px: int
    height_px: int
    width: int
    """Width of the image the stage read (the same as ``width_px``)."""
    height: int
    working_blob_key: NotRequired[str]
    """Added by the executor: the blob downstream stages read."""
    unchanged: NotRequired[bool]
    """Added by the executor when nothing was applied: downstream stages read the input."""


class DetectionOutput(TypedDict):
    label: str
    score: float
    box: list[float]
    """x1, y1, x2, y2 in the original upload's pixels."""


class DetectOutput(TypedDict):
    detections: list[DetectionOutput]
    count: int
    image_size: list[int]
    """(width, height) of the original upload."""


class ModerationThresholds(TypedDict):
    review: float | None
    block: float | None


class ModerateOutput(TypedDict):
    scores: dict[str, float]
    """Raw score per category, always stored."""
    verdict: str
    """``allow``, ``review`` or ``block``."""
    reasons: list[str]
    thresholds: dict[str, ModerationThresholds]


class HeatmapOutput(TypedDict):
    width: int
    height: int
    max: float
    media_type: str
    pixel_rule: str


class AnomalyOutput(TypedDict):
    score: float
    threshold: float
    anomalous: bool
    profile: dict[str, str]
    """Name, version and sha256 of the fitted profile."""
    heatmap: HeatmapOutput


class NoopOutput(TypedDict):
    noop: bool
    upstream: list[str]


SCHEMAS: dict[str, type[Any]] = {
    "quality": QualityOutput,
    "enhance": EnhanceOutput,
    "detect": DetectOutput,
    "moderate": ModerateOutput,
    "anomaly": AnomalyOutput,
    "noop": NoopOutput,
}
"""Stage kind -> the schema of its output (keys of imgpipe.stagekinds.STAGE_KINDS)."""

HEADLINE_FIELDS: dict[str, tuple[str, ...]] = {
    "quality": ("score", "flags"),
    "enhance": ("applied",),
    "detect": ("count",),
    "moderate": ("verdict", "scores"),
    "anomaly": ("score", "anomalous"),
    "noop": (),
}
"""The fields of each kind that events and the CLI show as ``<stage>.<field>``."""


@functools.cache
def _adapter(kind: str) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(SCHEMAS[kind])


def read_output(kind: str, output: Mapping[str, Any]) -> Mapping[str, Any]:
    """``output`` checked against ``kind``'s schema (fields it does not declare are kept).

    Raises PermanentError naming the field when the output does not match: a stage that
    wrote it is out of step with this module. Callers cast the result to the kind's
    TypedDict (``read_quality`` ...) or read it as a mapping.
    """
    if kind not in SCHEMAS:
        raise PermanentError(
            f"stage kind {kind!r} has no output schema; add one to imgpipe/stageoutputs.py"
        )
    try:
        _adapter(kind).validate_python(output)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PermanentError(
            f"a {kind} stage's output does not match imgpipe/stageoutputs.py at {where!r}: "
            f"{first['msg']}; the stage and the schema must change together"
        ) from exc
    return output


def read_quality(output: Mapping[str, Any]) -> QualityOutput:
    return cast(QualityOutput, read_output("quality", output))


def gate_reason(kind: str, output: Mapping[str, Any]) -> str | None:
    """Why a gate stage's output stops the pipeline, or None if it passes (only quality
    stages can be gates: orchestrator/pipelines.py)."""
    if kind != "quality":
        return None
    quality = read_quality(output)
    if quality["usable"]:
        return None
    return quality["unusable_reason"] or "image unusable"


def headline(stage: str, kind: str, output: Mapping[str, Any]) -> dict[str, Any]:
    """The headline fields of one stage's output, keyed ``<stage>.<field>``."""
    return {f"{stage}.{f}": output[f] for f in HEADLINE_FIELDS.get(kind, ()) if f in output}


def _field_type(schema: Any, parts: list[str]) -> tuple[bool, str]:
    """Whether the dotted path exists in ``schema``; on failure, what is allowed there."""
    if not parts:
        return True, ""
    if is_typeddict(schema):
        hints = get_type_hints(schema)
        if parts[0] not in hints:
            return False, ", ".join(hints)
        return _field_type(_strip(hints[parts[0]]), parts[1:])
    if get_origin(schema) is dict:
        return _field_type(_strip(get_args(schema)[1]), parts[1:])
    return False, "nothing (a leaf value)"


def _strip(annotation: Any) -> Any:
    """``NotRequired[X]`` and ``X | None`` -> ``X``."""
    if get_origin(annotation) is NotRequired:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    return annotation


def field_problem(kind: str, dotted: str) -> str | None:
    """Why the dotted ``field`` of a policy rule cannot exist in a ``kind`` output, or None."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        return f"stage kind {kind!r} has no output schema in imgpipe/stageoutputs.py"
    parts = dotted.split(".")
    for depth in range(1, len(parts) + 1):
        found, allowed = _field_type(schema, parts[:depth])
        if not found:
            where = ".".join(parts[:depth])
            return f"{kind} outputs have no field {where!r} (allowed there: {allowed})"
    return None
