"""What every detector in workers/models shares: the request and result types, the input
check, and box selection (threshold, per-class NMS, top-k, clipping).

Used by the NudeNet detector (nudenet_detector.py) and the torchvision COCO detectors
(torchvision_detectors.py), and by the detect and moderate stages that call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision  # type: ignore[import-untyped]
from numpy.typing import NDArray

from imgpipe.errors import PermanentError
from workers.stagecontract import DetectionRow

__all__ = ["DetectRequest", "DetectResult", "check_image", "label_of", "select_detections"]


@dataclass(frozen=True, eq=False)
class DetectRequest:
    """One image to detect on, with the thresholds its stage run asked for."""

    image: NDArray[np.uint8]
    """HxWx3 RGB uint8."""
    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100


@dataclass(frozen=True)
class DetectResult:
    detections: tuple[DetectionRow, ...]
    """Boxes in the request image's pixel coordinates, highest score first."""
    class_scores: dict[str, float] = field(default_factory=dict)
    """Per class, the highest score the model gave anywhere in the image (before any
    threshold or NMS); classes the model cannot score are absent."""
    image_size: tuple[int, int] = (0, 0)
    """(width, height) of the request image."""


def check_image(image: NDArray[np.uint8]) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PermanentError(
            f"detector input must be an HxWx3 uint8 RGB array, got shape {image.shape} "
            f"dtype {image.dtype}; the stage wrapper should decode images to RGB"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise PermanentError(f"detector input is empty (shape {image.shape})")


def select_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    labels: Sequence[str],
    request: DetectRequest,
) -> tuple[DetectionRow, ...]:
    """Threshold, per-class NMS, top-k and clipping of candidate boxes (xyxy, image px)."""
    height, width = request.image.shape[:2]
    keep = scores >= request.score_threshold
    boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
    boxes = torch.stack(
        (
            boxes[:, 0].clamp(0, width),
            boxes[:, 1].clamp(0, height),
            boxes[:, 2].clamp(0, width),
            boxes[:, 3].clamp(0, height),
        ),
        dim=1,
    )
    order = torchvision.ops.batched_nms(
        boxes.float(), scores.float(), classes, request.iou_threshold
    )
    order = order[: request.max_detections]
    rows_boxes = boxes[order].float().cpu().tolist()
    rows_scores = scores[order].float().cpu().tolist()
    rows_classes = classes[order].cpu().tolist()
    return tuple(
        DetectionRow(label_of(labels, c), float(s), b[0], b[1], b[2], b[3])
        for b, s, c in zip(rows_boxes, rows_scores, rows_classes, strict=True)
    )


def label_of(labels: Sequence[str], index: int) -> str:
    """The name of class ``index``, or ``class_<index>`` when the model has no name for it."""
    return labels[index] if 0 <= index < len(labels) else f"class_{index}"
