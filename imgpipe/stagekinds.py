"""The catalogue of stage kinds, known to the orchestrator without importing workers.

A stage kind names its Celery queue, the module that implements it and the Python
distributions it needs. ``is_installed`` checks those with ``importlib.util.find_spec``
(nothing is imported), so the orchestrator can refuse a pipeline whose stages cannot run
here instead of letting a job wait forever.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imgpipe.contracts import CPU_QUEUE, GPU_QUEUE

__all__ = [
    "ANOMALY_INPUT_SIDE_PX",
    "DETECTOR_INPUT_SIDE_PX",
    "STAGE_KINDS",
    "StageKind",
    "missing_requirements",
]


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
    max_input_side_px: int | None = None
    """Longest image side this stage can use: the worker decodes its input at most this
    large (JPEG draft mode) and caches it so. None: full resolution. Chosen per kind by
    tests that compare results with full-resolution input (docs/pixels.md)."""
    reduced_input_models: tuple[str, ...] = ()
    """If set, ``max_input_side_px`` holds only while the stage's ``model`` parameter
    (default: the first entry) is one of these; any other model gets full resolution."""
    file_params: tuple[str, ...] = ()
    """Parameters that name a file the worker opens (weights, profiles): set only in the
    pipeline file by the operator, never by a submitter's overrides."""

    def input_side_px(self, params: Mapping[str, Any]) -> int | None:
        """What ``workers.pixels.PixelCache.get`` should be asked for, given the params."""
        if self.reduced_input_models:
            model = params.get("model", self.reduced_input_models[0])
            if model not in self.reduced_input_models:
                return None
        return self.max_input_side_px


DETECTOR_INPUT_SIDE_PX = 640
"""NudeNet's YOLOv8n sees a 320 px letterbox; twice that keeps its results (boxes within
2 px, scores within 0.02: tests/unit/test_reduced_input.py)."""
ANOMALY_INPUT_SIDE_PX = 640
"""Profiles squash the image to 256x256 (default resolution); 640 keeps the shorter side
above 256 up to an aspect ratio of 2.5 (tests/unit/test_reduced_input.py)."""

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
            # nudenet letterboxes to 320; torchvision detectors resize to 800 themselves
            max_input_side_px=DETECTOR_INPUT_SIDE_PX,
            reduced_input_models=("nudenet-yolov8n",),
            file_params=("weights_path",),
        ),
        StageKind(
            "anomaly",
            GPU_QUEUE,
            "workers.stages.anomaly",
            "1",
            ("torch",),
            "PatchCore-style anomaly score and heat map against a fitted profile",
            max_input_side_px=ANOMALY_INPUT_SIDE_PX,
            file_params=("profile",),
        ),
        StageKind(
            "moderate",
            GPU_QUEUE,
            "workers.stages.moderate",
            "1",
            ("torch", "torchvision", "nudenet"),
            "per-category nudity scores and an allow/review/block verdict",
            max_input_side_px=DETECTOR_INPUT_SIDE_PX,
            file_params=("weights_path",),
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
