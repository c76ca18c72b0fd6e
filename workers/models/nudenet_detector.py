"""NudeNet's YOLOv8n (``320n.onnx`` from the ``nudenet`` wheel) run as a native torch module.

Only the weights come from the ONNX file: its initializers are loaded strictly into
:class:`workers.models.yolov8.YOLOv8`; the class names come from the file's metadata.
Pre- and post-processing follow Ultralytics conventions, chosen by measurement
(docs/models.md, "Channel order"):

* **RGB** channel order (nudenet's own ``detect()`` feeds BGR; RGB scored the right face
  class higher and confused it less on real photographs),
* **letterbox**: scale the longer side to 320 (bilinear), centre, pad with grey 114,
* YOLOv8 head decoding (done in the module), per-class NMS with
  ``torchvision.ops.batched_nms``, boxes mapped back to the input image's pixels.

The request/result types every detector shares live in workers/models/detection.py.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

import torch

from imgpipe.errors import PermanentError
from imgpipe.modelcatalog import MODELS, NUDENET_MODEL
from workers.models._letterbox import (
    INPUT_SIZE,
    PAD_VALUE,
    ChannelOrder,
    Letterbox,
    letterbox_batch,
    letterbox_on_device,
    to_network_input,
)
from workers.models._yolo_decode import decode_batch
from workers.models.base import InferenceModel
from workers.models.detection import DetectRequest, DetectResult, check_image
from workers.models.yolov8 import YOLOv8, load_onnx_initializers, read_onnx_weights

__all__ = [
    "CHANNEL_ORDER",
    "INPUT_SIZE",
    "NUDENET_LABELS",
    "PAD_VALUE",
    "ChannelOrder",
    "Letterbox",
    "NudeNetDetector",
    "default_weights_path",
    "labels_from_metadata",
    "letterbox_batch",
    "to_network_input",
]

CHANNEL_ORDER: Final[ChannelOrder] = "RGB"
"""Order of the channels fed to the network; see docs/models.md for the measurement."""

NUDENET_LABELS: Final[tuple[str, ...]] = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
"""Class index -> name, as documented by nudenet 3.4.2 (and stored in 320n.onnx)."""

_INSTALL_HINT = (
    "pip install 'imgpipe[nudenet]' (AGPL-3.0 weights), or configure a torchvision detector "
    "(model = 'fasterrcnn_mobilenet_v3_large_fpn' | 'ssdlite320_mobilenet_v3_large' | "
    "'retinanet_resnet50_fpn_v2')"
)


def default_weights_path() -> Path:
    """``320n.onnx`` inside the installed ``nudenet`` package (found without importing it)."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        raise PermanentError(f"the nudenet package is not installed; {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "320n.onnx"


def labels_from_metadata(metadata: dict[str, str], num_classes: int) -> tuple[str, ...]:
    """Class names from an Ultralytics export's ``names`` metadata (a dict literal)."""
    raw = metadata.get("names")
    if raw is not None:
        try:
            parsed = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, dict) and sorted(parsed) == list(range(num_classes)):
            return tuple(str(parsed[i]) for i in range(num_classes))
    if num_classes == len(NUDENET_LABELS):
        return NUDENET_LABELS
    return tuple(f"class_{i}" for i in range(num_classes))


# -- the model ----------------------------------------------------------------------------


class NudeNetDetector(InferenceModel[DetectRequest, DetectResult]):
    """YOLOv8n trained by the NudeNet project on 18 body-part/face classes."""

    name = NUDENET_MODEL
    version = MODELS[NUDENET_MODEL].version
    license = (
        "AGPL-3.0 (nudenet 3.4.2 LICENSE; ONNX metadata: 'AGPL-3.0 License (ultralytics)'; "
        "the wheel's METADATA field says MIT)"
    )

    channel_order: ClassVar[ChannelOrder] = CHANNEL_ORDER
    labels: tuple[str, ...] = NUDENET_LABELS
    reduced_precisions: ClassVar[tuple[str, ...]] = ("fp16",)
    """fp16 is within tolerance of fp32 on the samples, bf16 is not (a face score moved
    by 0.0203 on a thumbnail): tests/unit/test_gpu_path.py."""
    auto_precision_cuda: ClassVar[str] = "fp16"

    def __init__(
        self, weights_path: Path, *, preprocess_on_device: bool | None = None, **options: Any
    ) -> None:
        super().__init__(weights_path, **options)
        self.preprocess_on_device = (
            self.device.type == "cuda" if preprocess_on_device is None else preprocess_on_device
        )
        """Letterbox with torch on the device (default on CUDA) or with OpenCV on the host
        (default on CPU, where cv2 measured faster: docs/models.md)."""

    def _load(self, weights_path: Path, device: torch.device) -> torch.nn.Module:
        if importlib.util.find_spec("onnx") is None:
            raise PermanentError(
                "reading the nudenet weights needs the onnx package; " + _INSTALL_HINT
            )
        weights = read_onnx_weights(weights_path)
        module = YOLOv8(weights.num_classes)
        load_onnx_initializers(module, weights.tensors)
        self.labels = labels_from_metadata(weights.metadata, weights.num_classes)
        return module.to(device)

    def _predict(
        self, module: torch.nn.Module, batch: Sequence[DetectRequest]
    ) -> list[DetectResult]:
        for request in batch:
            check_image(request.image)
        images = [r.image for r in batch]
        if self.preprocess_on_device:
            x, boxes = letterbox_on_device(
                images, self.device, INPUT_SIZE, PAD_VALUE, self.channel_order
            )
        else:
            pixels, boxes = letterbox_batch(images, INPUT_SIZE, PAD_VALUE)
            x = to_network_input(pixels, self.device, self.channel_order)
        raw = module(self.to_model_input(x)).float()  # [B, 4 + C, A]
        return decode_batch(raw, boxes, batch, self.labels)
