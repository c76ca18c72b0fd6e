"""A native torch definition of the YOLOv8 detection network (Ultralytics layout).

The module tree mirrors Ultralytics' ``model.<i>...`` names, so the parameter names are
exactly the initializer names of an Ultralytics ONNX export (``model.2.m.0.cv1.conv.weight``,
``model.22.dfl.conv.weight`` ...). Exports fold BatchNorm into the convolution, so every
``Conv`` here is ``Conv2d(bias=True)`` + SiLU. Weights are read from the ONNX file's
initializers and loaded strictly (:func:`load_onnx_initializers`): no missing, unexpected
or mis-shaped tensor is tolerated. No ONNX runtime or converter is involved at run time.

The forward pass returns what the export returns: ``[batch, 4 + num_classes, anchors]``,
rows 0-3 the box centre x, centre y, width, height in input pixels and the remaining rows
the per-class sigmoid scores, anchors ordered stride 8, 16, 32 and row-major inside a level.
The output is float32 whatever the parameters' dtype: the head casts its raw maps before
decoding, so a half-precision network does not also round box coordinates to fp16 steps
(0.25 px at 320). Views work on channels_last activations (``reshape``, not ``view``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "YOLOV8N",
    "OnnxWeights",
    "YOLOv8",
    "YOLOv8Scale",
    "load_onnx_initializers",
    "read_onnx_weights",
]

REG_MAX = 16
"""Distribution Focal Loss bins per box side."""
STRIDES = (8, 16, 32)


class YOLOv8Scale:
    """Width/depth multipliers of one YOLOv8 size (n, s, m, l, x)."""

    def __init__(self, width: float, depth: float, max_channels: int) -> None:
        self.width = width
        self.depth = depth
        self.max_channels = max_channels

    def channels(self, base: int) -> int:
        return int(min(base, self.max_channels) * self.width)

    def repeats(self, base: int) -> int:
        return max(round(base * self.depth), 1)


YOLOV8N = YOLOv8Scale(width=0.25, depth=0.33, max_channels=1024)


class Conv(nn.Module):
    """Convolution with BatchNorm folded into its bias, then SiLU (as exported)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=True)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))  # type: ignore[no-any-return]


class Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = Conv(channels, channels, 3)
        self.cv2 = Conv(channels, channels, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convolutions: split, n bottlenecks, concat everything."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool) -> None:
        super().__init__()
        self.c = c_out // 2
        self.cv1 = Conv(c_in, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).split((self.c, self.c), dim=1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))  # type: ignore[no-any-return]


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = Conv(c_in, hidden, 1)
        self.cv2 = Conv(hidden * 4, c_out, 1)
        self.m = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.cv1(x)
        y1 = self.m(y0)
        y2 = self.m(y1)
        return self.cv2(torch.cat((y0, y1, y2, self.m(y2)), dim=1))  # type: ignore[no-any-return]


class DFL(nn.Module):
    """Expected value of the 16-bin distribution of each box side (fixed 1x1 conv).

    Runs in the dtype of its input, with the weight cast to it (the head feeds float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(REG_MAX, 1, 1, bias=False).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        probs = x.reshape(b, 4, REG_MAX, a).transpose(2, 1).softmax(dim=1)
        weight = self.conv.weight.to(dtype=probs.dtype, memory_format=torch.contiguous_format)
        return F.conv2d(probs, weight).reshape(b, 4, a)


class Detect(nn.Module):
    """Decoupled anchor-free head: box distribution branch (cv2) and class branch (cv3)."""

    def __init__(self, num_classes: int, in_channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.num_classes = num_classes
        box_hidden = max(16, in_channels[0] // 4, REG_MAX * 4)
        cls_hidden = max(in_channels[0], min(num_classes, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(
                Conv(c, box_hidden, 3),
                Conv(box_hidden, box_hidden, 3),
                nn.Conv2d(box_hidden, 4 * REG_MAX, 1),
            )
            for c in in_channels
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(
                Conv(c, cls_hidden, 3),
                Conv(cls_hidden, cls_hidden, 3),
                nn.Conv2d(cls_hidden, num_classes, 1),
            )
            for c in in_channels
        )
        self.dfl = DFL()

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        batch = feats[0].shape[0]
        outs = [
            torch.cat((box(f), cls(f)), dim=1).reshape(batch, 4 * REG_MAX + self.num_classes, -1)
            for f, box, cls in zip(feats, self.cv2, self.cv3, strict=True)
        ]
        raw = torch.cat(outs, dim=2).float()
        anchors, strides = _anchors(feats, raw.dtype)  # float32
        dist, logits = torch.split(raw, [4 * REG_MAX, self.num_classes], dim=1)
        lt, rb = self.dfl(dist).chunk(2, dim=1)
        x1y1 = anchors - lt
        x2y2 = anchors + rb
        boxes = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim=1) * strides
        return torch.cat((boxes, logits.sigmoid()), dim=1)


def _anchors(feats: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres ``[1, 2, A]`` in grid units and their strides ``[1, 1, A]``."""
    points: list[torch.Tensor] = []
    strides: list[torch.Tensor] = []
    for f, stride in zip(feats, STRIDES, strict=True):
        h, w = f.shape[2], f.shape[3]
        sx = torch.arange(w, device=f.device, dtype=dtype) + 0.5
        sy = torch.arange(h, device=f.device, dtype=dtype) + 0.5
        gy, gx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((gx, gy), dim=0).view(2, -1))
        strides.append(torch.full((1, h * w), float(stride), device=f.device, dtype=dtype))
    return torch.cat(points, dim=1).unsqueeze(0), torch.cat(strides, dim=1).unsqueeze(0)


class _Concat(nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, dim=1)


class YOLOv8(nn.Module):
    """YOLOv8 detector; ``model`` indices match the Ultralytics yaml (0-9 backbone,
    10-21 neck, 22 head) so state-dict keys match exported initializer names."""

    def __init__(self, num_classes: int, scale: YOLOv8Scale = YOLOV8N) -> None:
        super().__init__()
        c = scale.channels
        n = scale.repeats
        c1, c2, c3, c4, c5 = c(64), c(128), c(256), c(512), c(1024)
        self.num_classes = num_classes
        self.model = nn.ModuleList(
            [
                Conv(3, c1, 3, 2),  # 0  P1/2
                Conv(c1, c2, 3, 2),  # 1  P2/4
                C2f(c2, c2, n(3), shortcut=True),  # 2
                Conv(c2, c3, 3, 2),  # 3  P3/8
                C2f(c3, c3, n(6), shortcut=True),  # 4
                Conv(c3, c4, 3, 2),  # 5  P4/16
                C2f(c4, c4, n(6), shortcut=True),  # 6
                Conv(c4, c5, 3, 2),  # 7  P5/32
                C2f(c5, c5, n(3), shortcut=True),  # 8
                SPPF(c5, c5),  # 9
                nn.Upsample(scale_factor=2.0, mode="nearest"),  # 10
                _Concat(),  # 11 cat P4
                C2f(c5 + c4, c4, n(3), shortcut=False),  # 12
                nn.Upsample(scale_factor=2.0, mode="nearest"),  # 13
                _Concat(),  # 14 cat P3
                C2f(c4 + c3, c3, n(3), shortcut=False),  # 15 (P3/8 out)
                Conv(c3, c3, 3, 2),  # 16
                _Concat(),  # 17 cat head P4
                C2f(c3 + c4, c4, n(3), shortcut=False),  # 18 (P4/16 out)
                Conv(c4, c4, 3, 2),  # 19
                _Concat(),  # 20 cat head P5
                C2f(c4 + c5, c5, n(3), shortcut=False),  # 21 (P5/32 out)
                Detect(num_classes, (c3, c4, c5)),  # 22
            ]
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``[B, 3, H, W]`` float in 0..1, H and W multiples of 32."""
        m = self.model
        x = m[1](m[0](images))
        x = m[2](x)
        p3 = m[4](m[3](x))
        p4 = m[6](m[5](p3))
        p5 = m[9](m[8](m[7](p4)))
        h12 = m[12](m[11]([m[10](p5), p4]))
        out3 = m[15](m[14]([m[13](h12), p3]))
        out4 = m[18](m[17]([m[16](out3), h12]))
        out5 = m[21](m[20]([m[19](out4), p5]))
        return m[22]([out3, out4, out5])  # type: ignore[no-any-return]


class OnnxWeights:
    """The parameter tensors and metadata of an Ultralytics ONNX export."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.tensors = tensors
        self.metadata = metadata

    @property
    def num_classes(self) -> int:
        return int(self.tensors["model.22.cv3.0.2.weight"].shape[0])


def read_onnx_weights(path: Path) -> OnnxWeights:
    """Parameter initializers (names starting ``model.``) and metadata of an ONNX file.

    Needs the ``onnx`` package (protobuf parsing only; no runtime). Graph constants such
    as ``/model.22/Constant_output_0`` or ``onnx::Split_138`` are not parameters and are
    left out.
    """
    import onnx  # the nudenet extra installs it
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    tensors: dict[str, torch.Tensor] = {}
    for init in proto.graph.initializer:
        if init.name.startswith("model."):
            array = np.array(numpy_helper.to_array(init), dtype=np.float32, copy=True)
            tensors[init.name] = torch.from_numpy(array)
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    return OnnxWeights(tensors, metadata)


def load_onnx_initializers(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Assign every parameter of ``module`` from ``tensors``; refuse any gap or surplus."""
    expected: dict[str, Any] = dict(module.state_dict())
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(tensors[k].shape)} != model {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            "ONNX initializers do not match the YOLOv8 definition: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}), wrong shape {wrong_shape[:5]}; the file is not a "
            "YOLOv8 detection export of this size"
        )
    module.load_state_dict(dict(tensors), strict=True)
