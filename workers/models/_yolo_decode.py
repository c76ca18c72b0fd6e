"""Decoding a batch of YOLOv8 outputs into per-image detections, on the outputs' device.

The whole batch is thresholded at once (each request's own ``score_threshold``), boxes
are mapped back through each image's letterbox and clamped to it, and one
``torchvision.ops.batched_nms`` call suppresses per (image, class): ``idxs = image *
num_classes + class``. Requests in one batch may ask for different ``iou_threshold``s:
images are grouped by it, one NMS call per distinct value (normally one). The kept boxes
come back to the host in one copy and are split per image, highest score first, cut at
each request's ``max_detections``.

NMS runs on float64 boxes: ``batched_nms`` separates the groups by shifting each group's
boxes by ``idx * (max_coordinate + 1)``, which with ``B * C`` groups reaches 10^7 and
would cost float32 its sub-pixel precision; float64 keeps the shift exact, so a box's
overlap with its neighbours is the same whichever batch it is in. The box values
themselves are computed in float32 with exactly the per-image arithmetic
(tests/unit/test_gpu_path.py checks equality with a per-image decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision  # type: ignore[import-untyped]

from workers.models._letterbox import Letterbox
from workers.models.detection import DetectRequest, DetectResult, label_of
from workers.stagecontract import DetectionRow

__all__ = ["decode_batch"]


@dataclass(frozen=True)
class _Candidates:
    """Anchors above their image's score threshold, boxes in their image's pixels."""

    boxes: torch.Tensor
    """[N, 4] float32 x1, y1, x2, y2, clamped to the image."""
    scores: torch.Tensor
    classes: torch.Tensor
    image_idx: torch.Tensor
    """Which request each candidate belongs to."""


def decode_batch(
    raw: torch.Tensor,
    letterboxes: Sequence[Letterbox],
    requests: Sequence[DetectRequest],
    labels: Sequence[str],
) -> list[DetectResult]:
    """``raw``: ``[B, 4 + C, A]`` float32 network output (cx, cy, w, h in input pixels,
    then per-class scores) -> one :class:`DetectResult` per request."""
    num_classes = raw.shape[1] - 4
    class_max = raw[:, 4:, :].amax(dim=2)  # [B, C], before any threshold
    found = _candidates(raw, letterboxes, requests)
    order = _nms_order(found, requests, num_classes)
    return _results(found, order, class_max, requests, labels)


def _candidates(
    raw: torch.Tensor, letterboxes: Sequence[Letterbox], requests: Sequence[DetectRequest]
) -> _Candidates:
    device = raw.device
    scores, classes = raw[:, 4:, :].max(dim=1)  # [B, A]
    thresholds = torch.tensor([r.score_threshold for r in requests], device=device)
    image_idx, anchor_idx = (scores >= thresholds[:, None]).nonzero(as_tuple=True)
    cx, cy, w, h = raw[:, :4, :].permute(0, 2, 1)[image_idx, anchor_idx].unbind(1)
    scores, classes = scores[image_idx, anchor_idx], classes[image_idx, anchor_idx]

    per_image = torch.tensor(
        [
            (lb.pad_x, lb.pad_y, lb.scale, r.image.shape[1], r.image.shape[0])
            for lb, r in zip(letterboxes, requests, strict=True)
        ],
        dtype=torch.float32,
        device=device,
    )[image_idx]
    pad_x, pad_y, scale, width, height = per_image.unbind(1)
    half_w, half_h = w / 2, h / 2
    zero = torch.zeros((), device=device)
    boxes = torch.stack(
        (
            torch.clamp((cx - half_w - pad_x) / scale, zero, width),
            torch.clamp((cy - half_h - pad_y) / scale, zero, height),
            torch.clamp((cx + half_w - pad_x) / scale, zero, width),
            torch.clamp((cy + half_h - pad_y) / scale, zero, height),
        ),
        dim=1,
    )
    return _Candidates(boxes, scores, classes, image_idx)


def _nms_order(
    found: _Candidates, requests: Sequence[DetectRequest], num_classes: int
) -> torch.Tensor:
    """Indices of the kept candidates, grouped by image, each image's by descending score."""
    device = found.boxes.device
    by_iou: dict[float, list[int]] = {}
    for i, request in enumerate(requests):
        by_iou.setdefault(request.iou_threshold, []).append(i)
    kept: list[torch.Tensor] = []
    for iou, members in by_iou.items():
        candidates = torch.arange(len(found.image_idx), device=device)
        if len(by_iou) > 1:
            member_ids = torch.tensor(members, device=device)
            candidates = candidates[torch.isin(found.image_idx, member_ids)]
        keep = torchvision.ops.batched_nms(
            found.boxes[candidates].double(),
            found.scores[candidates].double(),
            found.image_idx[candidates] * num_classes + found.classes[candidates],
            iou,
        )
        kept.append(candidates[keep])
    order = torch.cat(kept)
    # stable: inside one image the NMS order (descending score) is kept
    return order[torch.sort(found.image_idx[order], stable=True).indices]


def _results(
    found: _Candidates,
    order: torch.Tensor,
    class_max: torch.Tensor,
    requests: Sequence[DetectRequest],
    labels: Sequence[str],
) -> list[DetectResult]:
    """The kept boxes to the host in one copy, split per image, cut at max_detections."""
    rows = torch.cat(
        (
            found.boxes[order].double(),
            found.scores[order, None].double(),
            found.classes[order, None].double(),
            found.image_idx[order, None].double(),
        ),
        dim=1,
    ).tolist()
    class_max_rows = class_max.tolist()

    detections: list[list[DetectionRow]] = [[] for _ in requests]
    for x1, y1, x2, y2, score, cls, img in rows:
        kept = detections[int(img)]
        if len(kept) < requests[int(img)].max_detections:
            kept.append(DetectionRow(label_of(labels, int(cls)), score, x1, y1, x2, y2))
    return [
        DetectResult(
            detections=tuple(kept),
            class_scores=dict(zip(labels, class_max_rows[i], strict=False)),
            image_size=(int(request.image.shape[1]), int(request.image.shape[0])),
        )
        for i, (kept, request) in enumerate(zip(detections, requests, strict=True))
    ]
