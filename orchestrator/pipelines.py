"""Pipeline specs: data (TOML file or dict) validated into frozen dataclasses.

Every validation error names the pipeline and the offending field, e.g.
``pipeline 'qc': stages.detect.needs: unknown stage 'enhanc' (known: quality, enhance)``.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from imgpipe.errors import PipelineSpecError, StageNotInstalledError, UnknownPipelineError
from imgpipe.policy import Policy, parse_policy
from imgpipe.stagekinds import STAGE_KINDS, missing_requirements

__all__ = [
    "PipelineSpec",
    "StageSpec",
    "load_pipeline",
    "parse_pipeline",
    "pipeline_hash",
    "pipeline_names",
]

IMAGE_PRODUCING_KINDS = frozenset({"enhance"})
_TOP_KEYS = {"name", "description", "stages", "policy"}
_STAGE_KEYS = {"kind", "needs", "reads", "gate", "params", "overridable"}


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    needs: tuple[str, ...] = ()
    reads: str = "original"
    gate: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)
    overridable: tuple[str, ...] = ()
    """Parameters (dotted paths, e.g. ``thresholds.FACE_FEMALE``) a submission's
    ``overrides`` may set; nothing else. Not part of ``to_json`` (nor the pipeline hash):
    it says what a submitter may change, not what the stage computes."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "needs": list(self.needs),
            "reads": self.reads,
            "gate": self.gate,
            "params": dict(self.params),
        }


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    description: str
    stages: tuple[StageSpec, ...]
    """In a topological order: every stage comes after the stages it needs."""
    policy: Policy

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "stages": {s.name: s.to_json() for s in self.stages},
            "policy": self.policy.to_json(),
        }

    def require_installed(self) -> None:
        """Raise StageNotInstalledError if a stage's implementation is missing here."""
        for stage in self.stages:
            missing = missing_requirements(STAGE_KINDS[stage.kind])
            if missing:
                raise StageNotInstalledError(
                    f"pipeline {self.name!r}: stage {stage.name!r} (kind {stage.kind!r}) is not "
                    f"installed: missing module(s) {', '.join(missing)}. Install the extra that "
                    "provides it (see README) or choose a pipeline without this stage "
                    "(`imgpipe pipelines`)."
                )


def _err(pipeline: str, where: str, message: str) -> PipelineSpecError:
    return PipelineSpecError(f"pipeline {pipeline!r}: {where}: {message}")


def _parse_stage(pipeline: str, name: str, raw: object) -> StageSpec:
    where = f"stages.{name}"
    if not isinstance(raw, Mapping):
        raise _err(pipeline, where, "must be a table of stage settings")
    unknown = set(raw) - _STAGE_KEYS
    if unknown:
        raise _err(
            pipeline,
            f"{where}.{sorted(unknown)[0]}",
            f"unknown key (allowed: {', '.join(sorted(_STAGE_KEYS))})",
        )
    kind = raw.get("kind", name)
    if not isinstance(kind, str) or kind not in STAGE_KINDS:
        raise _err(
            pipeline,
            f"{where}.kind",
            f"unknown stage kind {kind!r} (known: {', '.join(STAGE_KINDS)})",
        )
    needs = raw.get("needs", [])
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        raise _err(pipeline, f"{where}.needs", "must be a list of stage names")
    reads = raw.get("reads", "original")
    if not isinstance(reads, str):
        raise _err(pipeline, f"{where}.reads", "must be 'original' or the name of a stage")
    gate = raw.get("gate", False)
    if not isinstance(gate, bool):
        raise _err(pipeline, f"{where}.gate", "must be true or false")
    params = raw.get("params", {})
    if not isinstance(params, Mapping):
        raise _err(pipeline, f"{where}.params", "must be a table")
    overridable = _parse_overridable(pipeline, where, kind, raw.get("overridable", []))
    return StageSpec(name, kind, tuple(needs), reads, gate, dict(params), overridable)


def _parse_overridable(pipeline: str, where: str, kind: str, raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        raise _err(
            pipeline,
            f"{where}.overridable",
            'must be a list of parameter names, e.g. ["threshold"]',
        )
    for path in raw:
        top = path.split(".", 1)[0]
        if top in STAGE_KINDS[kind].file_params:
            raise _err(
                pipeline,
                f"{where}.overridable",
                f"{top!r} names a file the worker opens; submitters may never set file paths "
                "(set it under params instead)",
            )
    return tuple(raw)


def _toposort(pipeline: str, stages: dict[str, StageSpec]) -> tuple[StageSpec, ...]:
    ordered: list[StageSpec] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join((*path, name))
            raise _err(pipeline, f"stages.{name}.needs", f"dependency cycle {cycle}")
        state[name] = 1
        for need in stages[name].needs:
            visit(need, (*path, name))
        state[name] = 2
        ordered.append(stages[name])

    for name in stages:
        visit(name, ())
    return tuple(ordered)


def _ancestors(stages: Mapping[str, StageSpec], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(stages[name].needs)
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(stages[current].needs)
    return seen


def parse_pipeline(data: Mapping[str, Any], *, default_name: str | None = None) -> PipelineSpec:
    """Validate a pipeline given as a dict (e.g. parsed TOML)."""
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise PipelineSpecError("pipeline: name: missing or not a string")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _err(
            name, sorted(unknown)[0], f"unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})"
        )
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, Mapping) or not raw_stages:
        raise _err(name, "stages", "must be a non-empty table of stages")
    stages = {sname: _parse_stage(name, sname, raw) for sname, raw in raw_stages.items()}
    for stage in stages.values():
        for need in stage.needs:
            if need not in stages:
                raise _err(
                    name,
                    f"stages.{stage.name}.needs",
                    f"unknown stage {need!r} (known: {', '.join(stages)})",
                )
    ordered = _toposort(name, stages)
    for stage in ordered:
        if stage.reads == "original":
            continue
        if stage.reads not in stages:
            raise _err(name, f"stages.{stage.name}.reads", f"unknown stage {stage.reads!r}")
        if stage.reads not in _ancestors(stages, stage.name):
            raise _err(
                name,
                f"stages.{stage.name}.reads",
                f"stage {stage.reads!r} must be among this stage's needs "
                "(directly or transitively)",
            )
        if stages[stage.reads].kind not in IMAGE_PRODUCING_KINDS:
            raise _err(
                name,
                f"stages.{stage.name}.reads",
                f"stage {stage.reads!r} (kind {stages[stage.reads].kind!r}) produces no image",
            )
    for stage in ordered:
        if stage.gate and stage.kind != "quality":
            raise _err(name, f"stages.{stage.name}.gate", "only quality stages can be gates")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _err(name, "description", "must be a string")
    policy = parse_policy(name, data.get("policy", {}), set(stages))
    return PipelineSpec(name, description, ordered, policy)


def _builtin_dir() -> Path:
    return Path(str(resources.files("orchestrator") / "builtin_pipelines"))


def _pipeline_files(extra_dir: Path | None) -> dict[str, Path]:
    files = {p.stem: p for p in sorted(_builtin_dir().glob("*.toml"))}
    if extra_dir is not None and extra_dir.is_dir():
        files.update({p.stem: p for p in sorted(extra_dir.glob("*.toml"))})
    return files


def pipeline_names(extra_dir: Path | None = None) -> list[str]:
    return sorted(_pipeline_files(extra_dir))


def load_pipeline_file(path: Path) -> PipelineSpec:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PipelineSpecError(f"pipeline file {path}: invalid TOML: {exc}") from exc
    return parse_pipeline(data, default_name=path.stem)


def load_pipeline(name_or_path: str, extra_dir: Path | None = None) -> PipelineSpec:
    """A built-in or registered pipeline by name, or a TOML file by path.

    Files are read on every call, so an edited pipeline applies to the next submission
    without restarting anything.
    """
    if name_or_path.endswith(".toml"):
        return load_pipeline_file(Path(name_or_path))
    files = _pipeline_files(extra_dir)
    if name_or_path not in files:
        raise UnknownPipelineError(
            f"unknown pipeline {name_or_path!r}; known: {', '.join(sorted(files))} "
            "(or give the path of a .toml file, or add one to IMGPIPE_PIPELINES_DIR)"
        )
    return load_pipeline_file(files[name_or_path])


def pipeline_hash(spec_json: Mapping[str, Any]) -> str:
    """sha256 of the resolved spec (params after overrides) and every stage kind's version."""
    versions = {s["kind"]: STAGE_KINDS[s["kind"]].version for s in spec_json["stages"].values()}
    canonical = json.dumps(
        {"spec": spec_json, "kind_versions": versions}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
