"""The contract between the stage executor and a stage implementation.

The executor (workers/execute.py) does all I/O: it claims the stage row, loads the pixels the
stage reads and the outputs of the stages it needs, then calls the kind's
``run_stage_batch`` with ``StageInput`` values and persists the ``StageOutput`` values.
Stage modules stay pure: arrays and JSON in, arrays/bytes and JSON out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["BatchRunner", "DetectionRow", "StageInput", "StageOutput", "StageSkip"]


@dataclass(frozen=True)
class StageInput:
    image: NDArray[np.uint8]
    """HxWx3 RGB uint8: the image this stage reads (the original or another stage's output)."""
    original_size: tuple[int, int]
    """(width, height) of the original upload; boxes are always reported in these coordinates."""
    params: Mapping[str, Any]
    """Stage parameters from the pipeline spec, merged with per-submission overrides."""
    upstream: Mapping[str, Mapping[str, Any]]
    """Output JSON of every stage listed in this stage's ``needs``, by stage name."""
    device: str = "cpu"
    """torch device string the worker is pinned to (``cpu``, ``cuda:0`` ...)."""
    upstream_kinds: Mapping[str, str] = field(default_factory=dict)
    """Stage kind of each entry of ``upstream``: which schema of imgpipe/stageoutputs.py
    its output follows."""

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass(frozen=True)
class DetectionRow:
    """One box for the ``detections`` table, in original-upload pixel coordinates."""

    label: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class StageOutput:
    output: Mapping[str, Any]
    """JSON-serialisable result stored on the stage row: the kind's schema in
    imgpipe/stageoutputs.py."""
    blob: bytes | None = None
    """Optional artifact (a heat map) the executor writes to the blob store."""
    blob_media_type: str | None = None
    image: NDArray[np.uint8] | None = None
    """For image-producing stages (enhance): the output pixels, HxWx3 RGB uint8. The
    executor stores them as one JPEG blob (``encode_working_copy``): the viewable artifact
    (``output_blob_key``) and the working copy downstream stages read
    (``output.working_blob_key``)."""
    passthrough: bool = False
    """For image-producing stages that changed nothing: downstream stages read the input
    image itself, and no new blob is written."""
    model: Mapping[str, str] | None = None
    """``ModelInfo.to_json()`` of the model that produced the result, if any."""
    detections: Sequence[DetectionRow] = field(default_factory=tuple)


@dataclass(frozen=True)
class StageSkip:
    """A stage that decided not to run (e.g. anomaly without a profile): ends ``skipped``."""

    reason: str
    detail: str = ""


BatchRunner = Callable[[Sequence[StageInput]], list[StageOutput | StageSkip]]
"""Signature of each stage kind's batch function (``StageKind.entry``, by default
``run_stage_batch``, in the module ``StageKind.implementation``: imgpipe/stagekinds.py).

May raise ``imgpipe.errors.PermanentError`` (the whole batch fails for good; the executor
fails each row with the message) or ``TransientError`` (retried)."""
