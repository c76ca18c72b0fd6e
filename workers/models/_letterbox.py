"""Letterboxing for square-input detectors, on the host (OpenCV) or on the device (torch).

Both paths share the geometry (:func:`letterbox_geometry`): scale the longer side to
``size``, round the other, centre on a square of grey ``pad_value``. They differ only in
where the pixels are resized:

* :func:`letterbox_batch` resizes each image with ``cv2.INTER_LINEAR`` on the host and
  uploads one ``[B, S, S, 3]`` uint8 batch (:func:`to_network_input`);
* :func:`letterbox_on_device` uploads each image as uint8 (from pinned memory,
  ``non_blocking``, on CUDA), resizes it there with ``interpolate(mode="bilinear",
  align_corners=False, antialias=False)`` and rounds to whole grey levels. That is
  cv2's ``INTER_LINEAR``: the same half-pixel centres (``src = (dst + 0.5) * in/out -
  0.5``, clamped at the border) and no low-pass filter when shrinking; cv2 interpolates
  uint8 in 11-bit fixed point, so single pixels may differ by one grey level
  (tests/unit/test_gpu_path.py).

Which one a model uses is a per-device choice measured in docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

__all__ = [
    "INPUT_SIZE",
    "PAD_VALUE",
    "ChannelOrder",
    "Letterbox",
    "letterbox_batch",
    "letterbox_geometry",
    "letterbox_on_device",
    "to_network_input",
    "upload_uint8",
]

ChannelOrder = Literal["RGB", "BGR"]
INPUT_SIZE: Final = 320
"""Side of the square network input (the ``imgsz`` the nudenet weights were exported with)."""
PAD_VALUE: Final = 114
"""Grey used for letterbox padding (Ultralytics' training and inference value)."""


@dataclass(frozen=True)
class Letterbox:
    """Mapping between an image and its letterboxed square: ``net = img * scale + pad``."""

    scale: float
    pad_x: int
    pad_y: int


def letterbox_geometry(height: int, width: int, size: int) -> tuple[int, int, Letterbox]:
    """``(new_w, new_h, mapping)`` of an image ``height`` x ``width`` in a ``size`` square."""
    scale = size / max(height, width)
    new_w = min(size, max(1, round(width * scale)))
    new_h = min(size, max(1, round(height * scale)))
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    return new_w, new_h, Letterbox(scale=scale, pad_x=pad_x, pad_y=pad_y)


def letterbox_batch(
    images: Sequence[NDArray[np.uint8]], size: int = INPUT_SIZE, pad_value: int = PAD_VALUE
) -> tuple[NDArray[np.uint8], list[Letterbox]]:
    """Resize each image so its longer side is ``size``, centre it on a grey square.

    Returns ``[B, size, size, 3]`` uint8 (channels as given) and the per-image mapping.
    One OpenCV resize per image; no per-pixel Python work.
    """
    batch = np.full((len(images), size, size, 3), pad_value, dtype=np.uint8)
    boxes: list[Letterbox] = []
    for i, image in enumerate(images):
        new_w, new_h, box = letterbox_geometry(image.shape[0], image.shape[1], size)
        resized = cv2.resize(
            np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_LINEAR
        )
        batch[i, box.pad_y : box.pad_y + new_h, box.pad_x : box.pad_x + new_w] = resized
        boxes.append(box)
    return batch, boxes


def to_network_input(
    batch: NDArray[np.uint8], device: torch.device, channel_order: ChannelOrder = "RGB"
) -> torch.Tensor:
    """``[B, S, S, 3]`` RGB uint8 -> ``[B, 3, S, S]`` float 0..1 on ``device``, channels
    in ``channel_order`` (``BGR`` reverses them, as nudenet's own ``detect()`` does)."""
    tensor = upload_uint8(batch, device)
    if channel_order == "BGR":
        tensor = tensor.flip(-1)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def upload_uint8(array: NDArray[np.uint8], device: torch.device) -> torch.Tensor:
    """``array`` as a uint8 tensor on ``device``; to CUDA through pinned memory, async.

    Decoded working copies are read-only: they are copied (once, into the pinned buffer on
    CUDA), never wrapped, so torch never holds a writable view of them."""
    if device.type == "cuda":
        # The caching host allocator keeps the pinned buffer until the transfer is done.
        pinned = torch.empty(array.shape, dtype=torch.uint8, pin_memory=True)
        pinned.numpy()[...] = array
        return pinned.to(device, non_blocking=True)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


def letterbox_on_device(
    images: Sequence[NDArray[np.uint8]],
    device: torch.device,
    size: int = INPUT_SIZE,
    pad_value: int = PAD_VALUE,
    channel_order: ChannelOrder = "RGB",
) -> tuple[torch.Tensor, list[Letterbox]]:
    """HxWx3 uint8 images -> ``[B, 3, size, size]`` float32 0..1 on ``device`` plus the
    per-image mapping; the same pixels as :func:`letterbox_batch` +
    :func:`to_network_input` up to one grey level."""
    batch = torch.full((len(images), 3, size, size), float(pad_value), device=device)
    boxes: list[Letterbox] = []
    for i, image in enumerate(images):
        new_w, new_h, box = letterbox_geometry(image.shape[0], image.shape[1], size)
        pixels = upload_uint8(image, device).permute(2, 0, 1).unsqueeze(0).float()
        if (new_h, new_w) != tuple(pixels.shape[2:]):
            pixels = F.interpolate(
                pixels, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False
            ).round_()
        batch[i, :, box.pad_y : box.pad_y + new_h, box.pad_x : box.pad_x + new_w] = pixels[0]
        boxes.append(box)
    if channel_order == "BGR":
        batch = batch.flip(1)
    return batch.div_(255.0), boxes
