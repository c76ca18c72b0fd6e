"""The catalogue of stage kinds, known to the orchestrator without importing workers.

A stage kind names its Celery queue, the module that implements it and the Python
distributions it needs. ``is_installed`` checks those with ``importlib.util.find_spec``
(nothing is imported), so the orchestrator can refuse a pipeline whose stages cannot run
here instead of letting a job wait forever.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from imgpipe.contracts import CPU_QUEUE, GPU_QUEUE

__all__ = ["STAGE_KINDS", "StageKind", "missing_requirements"]


@dataclass(frozen=True)
class StageKind:
    name: str
    queue: str
    implementation: str
    """Module holding the Celery task body for this kind."""
    version: str
    """Bumped whenever the stage's computation changes; part of the pipeline hash."""
    requires: tuple[str, ...] = ()
    """Importable top-level modules the implementation needs."""
    description: str = ""
    entry: str = "run_stage_batch"
    """Name of the ``workers.runtime.BatchRunner`` function in ``implementation``."""


STAGE_KINDS: dict[str, StageKind] = {
    k.name: k
    for k in (
        StageKind(
            "quality",
            CPU_QUEUE,
            "workers.stages.classical",
            "1",
            ("cv2", "numpy"),
            "sharpness, exposure, contrast, noise, resolution, blockiness -> score + flags",
            entry="run_quality_batch",
        ),
        StageKind(
            "enhance",
            CPU_QUEUE,
            "workers.stages.classical",
            "1",
            ("cv2", "numpy"),
            "gamma/CLAHE, denoise, unsharp chosen from the quality flags",
            entry="run_enhance_batch",
        ),
        StageKind(
            "detect",
            GPU_QUEUE,
            "workers.stages.detect",
            "1",
            ("torch", "torchvision"),
            "boxes, labels, scores from a torch detector",
        ),
        StageKind(
            "anomaly",
            GPU_QUEUE,
            "workers.stages.anomaly",
            "1",
            ("torch",),
            "PatchCore-style anomaly score and heat map against a fitted profile",
        ),
        StageKind(
            "moderate",
            GPU_QUEUE,
            "workers.stages.moderate",
            "1",
            ("torch", "torchvision", "nudenet"),
            "per-category nudity scores and an allow/review/block verdict",
        ),
        StageKind(
            "noop",
            CPU_QUEUE,
            "workers.stages.noop",
            "1",
            (),
            "returns a tiny output without reading the pixels (measures the DAG's own cost)",
        ),
    )
}


def missing_requirements(kind: StageKind) -> list[str]:
    """Modules ``kind`` needs that are not importable here (empty: installed)."""
    missing = [m for m in kind.requires if importlib.util.find_spec(m) is None]
    try:
        found = importlib.util.find_spec(kind.implementation) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        missing.append(kind.implementation)
    return missing
