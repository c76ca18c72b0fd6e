"""The detect stage: boxes, labels and scores from a torch detector.

``run_stage_batch`` runs one forward pass for every input of the micro-batch that uses
the same model (normally all of them) and reports boxes in the coordinates of the
ORIGINAL upload, even when the stage read a resized or enhanced copy.

Parameters (``StageInput.params``)::

    model            "nudenet-yolov8n" (default) | "fasterrcnn_mobilenet_v3_large_fpn"
                     | "ssdlite320_mobilenet_v3_large" | "retinanet_resnet50_fpn_v2"
    weights_path     weights file; default: 320n.onnx inside the nudenet package, or the
                     torchvision checkpoint in the torch hub cache
    weights_sha256   pin: a file with another digest fails with WeightsMismatchError
    score_threshold  0..1, default 0.25
    iou_threshold    0..1, default 0.45 (per-class NMS)
    max_detections   1..1000, default 100

Models are imported lazily, so importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from imgpipe.errors import PermanentError
from imgpipe.modelcatalog import NUDENET_MODEL, TORCHVISION_DETECTORS
from imgpipe.stageoutputs import DetectOutput
from workers.stagecontract import DetectionRow, StageInput, StageOutput, StageSkip

if TYPE_CHECKING:
    from workers.models.base import InferenceModel
    from workers.models.detection import DetectRequest, DetectResult

__all__ = [
    "DETECTOR_MODELS",
    "NUDENET_MODEL",
    "DetectParams",
    "detector_model",
    "run_stage_batch",
]

DETECTOR_MODELS: Final = (NUDENET_MODEL, *TORCHVISION_DETECTORS)
MAX_DETECTIONS_LIMIT: Final = 1000


@dataclass(frozen=True)
class DetectParams:
    model: str = NUDENET_MODEL
    weights_path: str | None = None
    weights_sha256: str | None = None
    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_detections: int = 100

    @classmethod
    def from_json(cls, params: Mapping[str, Any]) -> DetectParams:
        check_keys("detect", params, cls.__dataclass_fields__)
        model = params.get("model", NUDENET_MODEL)
        if model not in DETECTOR_MODELS:
            raise PermanentError(
                f"detect: unknown model {model!r}; choose one of {', '.join(DETECTOR_MODELS)}"
            )
        return cls(
            model=model,
            weights_path=optional_str("detect", params, "weights_path"),
            weights_sha256=optional_sha256("detect", params, "weights_sha256"),
            score_threshold=unit_float("detect", params, "score_threshold", cls.score_threshold),
            iou_threshold=unit_float("detect", params, "iou_threshold", cls.iou_threshold),
            max_detections=_int_param(params, "max_detections", cls.max_detections),
        )


# -- parameter checks shared with the moderate stage --------------------------------------


def check_keys(stage: str, params: Mapping[str, Any], allowed: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise PermanentError(
            f"{stage}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def optional_str(stage: str, params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None or (isinstance(value, str) and value):
        return value
    raise PermanentError(f"{stage}: {key} must be a non-empty string, got {value!r}")


def optional_sha256(stage: str, params: Mapping[str, Any], key: str) -> str | None:
    value = optional_str(stage, params, key)
    if value is not None and (
        len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())
    ):
        raise PermanentError(f"{stage}: {key} must be 64 hex digits (a sha256), got {value!r}")
    return value.lower() if value else None


def unit_float(stage: str, params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise PermanentError(f"{stage}: {key} must be a number in [0, 1], got {value!r}")
    return float(value)


def _int_param(params: Mapping[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= MAX_DETECTIONS_LIMIT
    ):
        raise PermanentError(
            f"detect: {key} must be an integer in [1, {MAX_DETECTIONS_LIMIT}], got {value!r}"
        )
    return value


# -- models ---------------------------------------------------------------------------------


def detector_model(
    model: str, weights_path: str | None, weights_sha256: str | None, device: str
) -> InferenceModel[DetectRequest, DetectResult]:
    """The per-process model for these settings (built on first use, loaded lazily)."""
    from workers.models.registry import cached_model, model_precision

    precision = model_precision()
    if model == NUDENET_MODEL:
        from workers.models.nudenet_detector import NudeNetDetector, default_weights_path

        path = default_weights_path() if weights_path is None else _existing(model, weights_path)
        key = f"{model}:{path}:{device}:{weights_sha256 or '-'}:{precision}"
        return cached_model(
            key,
            lambda: NudeNetDetector(
                path, device=device, expected_sha256=weights_sha256, precision=precision
            ),
        )
    from workers.models.torchvision_detectors import TORCHVISION_DETECTORS, resolve_weights_path

    path = resolve_weights_path(model, weights_path)
    cls = TORCHVISION_DETECTORS[model]
    key = f"{model}:{path}:{device}:{weights_sha256 or '-'}:{precision}"
    return cached_model(
        key,
        lambda: cls(path, device=device, expected_sha256=weights_sha256, precision=precision),
    )


def _existing(model: str, weights_path: str) -> Path:
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise PermanentError(
            f"weights file {path} for model {model!r} not found; fix weights_path or leave it "
            "unset to use the file shipped in the nudenet package"
        )
    return path


# -- the stage ------------------------------------------------------------------------------


def run_stage_batch(inputs: Sequence[StageInput]) -> list[StageOutput | StageSkip]:
    from workers.models.detection import DetectRequest

    params = [DetectParams.from_json(item.params) for item in inputs]
    groups: dict[int, list[int]] = {}
    models: dict[int, InferenceModel[DetectRequest, DetectResult]] = {}
    for i, (item, p) in enumerate(zip(inputs, params, strict=True)):
        model = detector_model(p.model, p.weights_path, p.weights_sha256, item.device)
        models[id(model)] = model
        groups.setdefault(id(model), []).append(i)

    results: list[StageOutput | StageSkip | None] = [None] * len(inputs)
    for model_id, members in groups.items():
        model = models[model_id]
        requests = [
            DetectRequest(
                image=inputs[i].image,
                score_threshold=params[i].score_threshold,
                iou_threshold=params[i].iou_threshold,
                max_detections=params[i].max_detections,
            )
            for i in members
        ]
        predictions = model.predict(requests)  # one forward pass for the group
        info = model.info().to_json()
        for i, prediction in zip(members, predictions, strict=True):
            results[i] = _stage_output(inputs[i], prediction, info)
    return [r for r in results if r is not None]


def _stage_output(item: StageInput, result: DetectResult, model: Mapping[str, str]) -> StageOutput:
    rows = to_original(result.detections, item.image_size, item.original_size)
    output: DetectOutput = {
        "detections": [
            {"label": r.label, "score": r.score, "box": [r.x1, r.y1, r.x2, r.y2]} for r in rows
        ],
        "count": len(rows),
        "image_size": list(item.original_size),
    }
    return StageOutput(
        output=output,
        model=model,
        detections=rows,
    )


def to_original(
    detections: Sequence[DetectionRow], read_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[DetectionRow, ...]:
    """Boxes from the image the stage read (``read_size`` w, h) to the original upload."""
    sx = original_size[0] / read_size[0]
    sy = original_size[1] / read_size[1]
    w, h = original_size
    return tuple(
        DetectionRow(
            label=d.label,
            score=round(d.score, 4),
            x1=round(min(max(d.x1 * sx, 0.0), w), 2),
            y1=round(min(max(d.y1 * sy, 0.0), h), 2),
            x2=round(min(max(d.x2 * sx, 0.0), w), 2),
            y2=round(min(max(d.y2 * sy, 0.0), h), 2),
        )
        for d in detections
    )
