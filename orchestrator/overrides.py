"""Which per-submission overrides a pipeline accepts (docs/pipelines.md).

A submitter may set only the parameters its pipeline file lists under a stage's
``overridable`` (dotted paths: ``thresholds`` allows every moderation threshold,
``thresholds.FACE_FEMALE`` only that category's). Parameters that name a file the worker
opens (``StageKind.file_params``: weights, anomaly profiles) are never overridable.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from imgpipe.errors import OverrideNotAllowedError, PermanentError
from imgpipe.stagekinds import STAGE_KINDS
from orchestrator.pipelines import PipelineSpec, StageSpec

__all__ = ["check_overrides", "overridable_paths"]


def _leaf_paths(value: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of the values an override sets (an empty object sets nothing)."""
    for key, item in value.items():
        path = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            yield from _leaf_paths(item, f"{path}.")
        else:
            yield path


def _allowed(path: str, stage: StageSpec) -> bool:
    return any(path == p or path.startswith(f"{p}.") for p in stage.overridable)


def overridable_paths(spec: PipelineSpec) -> list[str]:
    """``stage.param`` for every override the pipeline accepts (for messages and docs)."""
    return [f"{s.name}.{p}" for s in spec.stages for p in s.overridable]


def check_overrides(spec: PipelineSpec, overrides: Mapping[str, Any] | None) -> None:
    """Raise ``OverrideNotAllowedError`` naming the first override ``spec`` does not allow."""
    for stage_name, params in (overrides or {}).items():
        try:
            stage = spec.stage(stage_name)
        except KeyError:
            raise PermanentError(
                f"overrides name stage {stage_name!r}, which pipeline {spec.name!r} does not "
                f"have (stages: {', '.join(s.name for s in spec.stages)})"
            ) from None
        if not isinstance(params, Mapping):
            raise PermanentError(f"overrides.{stage_name} must be an object of parameters")
        file_params = STAGE_KINDS[stage.kind].file_params
        allowed = ", ".join(overridable_paths(spec)) or "nothing"
        for path in _leaf_paths(params):
            if path.split(".", 1)[0] in file_params:
                raise OverrideNotAllowedError(
                    f"overrides.{stage_name}.{path} names a file the worker opens; submitters "
                    f"may not set file paths (the operator sets them in the pipeline file). "
                    f"Pipeline {spec.name!r} lets submissions override: {allowed}"
                )
            if not _allowed(path, stage):
                raise OverrideNotAllowedError(
                    f"overrides.{stage_name}.{path} is not overridable in pipeline "
                    f"{spec.name!r}; it lets submissions override: {allowed} (the pipeline "
                    "file's `overridable` list per stage)"
                )
