"""torchvision's COCO detectors, built without downloading anything.

Each network is built with ``weights=None, weights_backbone=None`` (no network access,
no surprise download in a worker) and its weights are read from a state-dict file: the
path the pipeline configures (``weights_path``), else torchvision's own checkpoint file if
it is already in the torch hub cache (``$TORCH_HOME/hub/checkpoints/<name>-<hash>.pth``).
Files are read with ``torch.load(weights_only=True)``: tensors only, never pickled code.

The code is BSD-3-Clause (torchvision); the weights' terms are whatever the file's
provider set, so the model records ``user-supplied`` rather than guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final

import numpy as np
import torch
from torchvision.models import detection  # type: ignore[import-untyped]

from imgpipe.errors import PermanentError
from imgpipe.modelcatalog import torchvision_model_version
from workers.models.base import InferenceModel
from workers.models.detection import DetectRequest, DetectResult, check_image, select_detections

__all__ = [
    "TORCHVISION_DETECTORS",
    "FasterRCNNMobileNetV3LargeFPN",
    "RetinaNetResNet50FPNv2",
    "SSDLite320MobileNetV3Large",
    "TorchvisionDetector",
    "hub_checkpoint_path",
    "resolve_weights_path",
]

INTERNAL_SCORE_FLOOR: Final = 0.01
"""Score below which the networks drop boxes themselves; requests threshold above it."""
INTERNAL_MAX_DETECTIONS: Final = 300
_PLAIN_THRESHOLD_KWARGS: Final[Mapping[str, float]] = MappingProxyType(
    {"score_thresh": INTERNAL_SCORE_FLOOR, "detections_per_img": INTERNAL_MAX_DETECTIONS}
)
"""SSD and RetinaNet name these builder arguments without the ``box_`` prefix."""


class TorchvisionDetector(InferenceModel[DetectRequest, DetectResult]):
    """A torchvision COCO detector whose weights come from a local state-dict file."""

    license = "BSD-3-Clause (torchvision code); weights: user-supplied"
    version = torchvision_model_version()

    builder: ClassVar[Callable[..., torch.nn.Module]]
    threshold_kwargs: ClassVar[Mapping[str, float]] = MappingProxyType(
        {
            "box_score_thresh": INTERNAL_SCORE_FLOOR,
            "box_detections_per_img": INTERNAL_MAX_DETECTIONS,
        }
    )
    """Builder keyword arguments for the network's own score floor and box cap."""
    weights_enum: ClassVar[Any]
    """The torchvision ``*_Weights`` enum: its COCO_V1 entry names the checkpoint file and
    the categories; nothing is downloaded from it."""

    @classmethod
    def categories(cls) -> tuple[str, ...]:
        return tuple(cls.weights_enum.COCO_V1.meta["categories"])

    @classmethod
    def checkpoint_name(cls) -> str:
        return str(cls.weights_enum.COCO_V1.url).rsplit("/", 1)[-1]

    def _build(self) -> torch.nn.Module:
        module: torch.nn.Module = self.builder(
            weights=None,
            weights_backbone=None,
            num_classes=len(self.categories()),
            **self.threshold_kwargs,
        )
        return module

    def _load(self, weights_path: Path, device: torch.device) -> torch.nn.Module:
        module = self._build()
        loaded = torch.load(weights_path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()
        ):
            raise PermanentError(
                f"{weights_path} is not a state dict (a mapping of names to tensors) for "
                f"{self.name!r}; save one with torch.save(model.state_dict(), path)"
            )
        state = _with_batch_counters(module, dict(loaded))
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise PermanentError(
                f"{weights_path} does not fit {self.name!r} (COCO, {len(self.categories())} "
                f"classes): {str(exc)[:500]}"
            ) from exc
        return module.to(device)

    def _predict(
        self, module: torch.nn.Module, batch: Sequence[DetectRequest]
    ) -> list[DetectResult]:
        for request in batch:
            check_image(request.image)
        tensors = [
            torch.from_numpy(np.ascontiguousarray(r.image))
            .to(self.device)
            .permute(2, 0, 1)
            .float()
            .div_(255.0)
            for r in batch
        ]
        outputs: list[dict[str, torch.Tensor]] = module(tensors)
        labels = self.categories()
        results: list[DetectResult] = []
        for request, out in zip(batch, outputs, strict=True):
            detections = select_detections(
                out["boxes"], out["scores"], out["labels"], labels, request
            )
            class_scores: dict[str, float] = {}
            for label_index, score in zip(
                out["labels"].cpu().tolist(), out["scores"].float().cpu().tolist(), strict=True
            ):
                name = labels[label_index] if label_index < len(labels) else f"class_{label_index}"
                class_scores[name] = max(score, class_scores.get(name, 0.0))
            height, width = request.image.shape[:2]
            results.append(DetectResult(detections, class_scores, (int(width), int(height))))
        return results


def _with_batch_counters(
    module: torch.nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Add the BatchNorm ``num_batches_tracked`` counters a checkpoint may lack.

    torchvision's published checkpoints come from models built with FrozenBatchNorm2d,
    which has no such counter; built with ``weights=None`` the same network has
    BatchNorm2d. The counter only matters for training, so 0 is exact for inference.
    """
    for key, value in module.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    return state


class FasterRCNNMobileNetV3LargeFPN(TorchvisionDetector):
    name = "fasterrcnn_mobilenet_v3_large_fpn"
    builder = staticmethod(detection.fasterrcnn_mobilenet_v3_large_fpn)
    weights_enum = detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights


class SSDLite320MobileNetV3Large(TorchvisionDetector):
    name = "ssdlite320_mobilenet_v3_large"
    builder = staticmethod(detection.ssdlite320_mobilenet_v3_large)
    weights_enum = detection.SSDLite320_MobileNet_V3_Large_Weights

    threshold_kwargs = _PLAIN_THRESHOLD_KWARGS


class RetinaNetResNet50FPNv2(TorchvisionDetector):
    name = "retinanet_resnet50_fpn_v2"
    builder = staticmethod(detection.retinanet_resnet50_fpn_v2)
    weights_enum = detection.RetinaNet_ResNet50_FPN_V2_Weights

    threshold_kwargs = _PLAIN_THRESHOLD_KWARGS


TORCHVISION_DETECTORS: Final[dict[str, type[TorchvisionDetector]]] = {
    cls.name: cls
    for cls in (FasterRCNNMobileNetV3LargeFPN, SSDLite320MobileNetV3Large, RetinaNetResNet50FPNv2)
}


def hub_checkpoint_path(model_name: str) -> Path:
    """Where torchvision would have cached this model's COCO checkpoint."""
    cls = TORCHVISION_DETECTORS[model_name]
    return Path(torch.hub.get_dir()) / "checkpoints" / cls.checkpoint_name()


def resolve_weights_path(model_name: str, weights_path: str | None) -> Path:
    """The configured state-dict file, else the hub-cache checkpoint; it must exist."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise PermanentError(
                f"weights file {path} for detector {model_name!r} not found; set weights_path "
                "to an existing state-dict file (torch.save(model.state_dict(), path))"
            )
        return path
    path = hub_checkpoint_path(model_name)
    if not path.is_file():
        raise PermanentError(
            f"no weights for detector {model_name!r}: weights_path is not set and torchvision's "
            f"checkpoint is not in the hub cache at {path}; copy the COCO checkpoint "
            f"({TORCHVISION_DETECTORS[model_name].checkpoint_name()}) there or set "
            "weights_path to a state-dict file"
        )
    return path
