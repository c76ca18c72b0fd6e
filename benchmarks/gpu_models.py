"""End-to-end ``predict()`` throughput of the model stages' networks, per batch size.

    PYTHONPATH=. .venv/bin/python -m benchmarks.gpu_models --device cuda:0
    PYTHONPATH=. .venv/bin/python -m benchmarks.gpu_models --device cpu --batch-sizes 1,4,8 \\
        --precision fp16 --json out.json

For each network the model stages run (YOLOv8n 320, the nudenet detector; EfficientNet-
Lite0 blocks of the anomaly profile's default FeatureConfig) and each batch size, times
what a model worker pays per micro-batch: preprocessing (letterbox, upload), the forward
pass and the decode (thresholds + batched NMS for the detector; float32 feature maps for
the backbone), with the device synchronised. Inputs are the photographs in samples/
(cycled; 300x451 to 1920x1080 px), decoded once before timing.

Rows, per device:

* ``detector fp32 host-letterbox`` / ``fp32 device-letterbox``: where the resize runs;
* ``detector <P> <default>`` and ``backbone <P>``: the precision ``--precision`` resolves
  to on this device (``auto``: fp16 on CUDA, fp32 on the CPU), with the default memory
  format and letterbox of that device;
* ``letterbox only host|device``: the preprocessing alone.

Prints a Markdown table (images/s, ms per batch: median of ``--repeat`` timed runs after
``--warmup``) and, with ``--json PATH``, the same rows with the machine, date and command.
Runs unchanged on a CUDA machine and on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from workers.anomaly.patchcore import FeatureConfig, preprocess
from workers.models._letterbox import letterbox_batch, letterbox_on_device, to_network_input
from workers.models.base import InferenceModel
from workers.models.detection import DetectRequest
from workers.models.efficientnet_lite0 import (
    EfficientNetLite0Features,
    FeatureRequest,
)
from workers.models.efficientnet_lite0 import default_weights_path as backbone_weights
from workers.models.nudenet_detector import NudeNetDetector
from workers.models.nudenet_detector import default_weights_path as detector_weights

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
Image8 = NDArray[np.uint8]


@dataclass(frozen=True)
class Row:
    model: str
    config: str
    precision: str
    batch: int
    images_per_s: float
    ms_per_batch: float


def load_images() -> list[Image8]:
    paths = sorted(SAMPLES.glob("*.jpg"))
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths]


def batch_of(images: list[Image8], size: int) -> list[Image8]:
    return [images[i % len(images)] for i in range(size)]


def timed_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    def once() -> float:
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) * 1000.0

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeat))


def row(model: str, config: str, precision: str, batch: int, ms: float) -> Row:
    return Row(model, config, precision, batch, round(batch / ms * 1000.0, 1), round(ms, 2))


def detector(device: torch.device, precision: str, **options: Any) -> NudeNetDetector:
    return NudeNetDetector(detector_weights(), device=str(device), precision=precision, **options)


def host_letterbox(images: list[Image8], device: torch.device) -> torch.Tensor:
    return to_network_input(letterbox_batch(images)[0], device)


def bench_detector(
    images: list[Image8], device: torch.device, precision: str, sizes: list[int], args: Any
) -> list[Row]:
    rows: list[Row] = []
    variants = [
        (f"{where}-letterbox", detector(device, "fp32", preprocess_on_device=where == "device"))
        for where in ("host", "device")
    ]
    chosen = detector(device, precision)
    if chosen.precision != "fp32":
        where = "device-letterbox" if chosen.preprocess_on_device else "host-letterbox"
        layout = "channels_last" if chosen.memory_format == torch.channels_last else "contiguous"
        variants.append((f"{where} {layout}", chosen))
    for size in sizes:
        requests = [DetectRequest(img) for img in batch_of(images, size)]
        for config, model in variants:
            ms = timed_ms(partial(model.predict, requests), device, args.warmup, args.repeat)
            rows.append(row("yolov8n-320 detector", config, model.precision, size, ms))
        pixels = batch_of(images, size)
        host = timed_ms(partial(host_letterbox, pixels, device), device, args.warmup, args.repeat)
        on_device = timed_ms(
            partial(letterbox_on_device, pixels, device), device, args.warmup, args.repeat
        )
        rows.append(row("letterbox only", "host (cv2)", "-", size, host))
        rows.append(row("letterbox only", "device (torch)", "-", size, on_device))
    return rows


def backbone_features(
    model: InferenceModel[FeatureRequest, list[torch.Tensor]],
    images: list[Image8],
    config: FeatureConfig,
) -> list[list[torch.Tensor]]:
    x = preprocess(images, config, model.device)
    return model.predict([FeatureRequest(img, config.blocks) for img in x])


def bench_backbone(
    images: list[Image8], device: torch.device, precision: str, sizes: list[int], args: Any
) -> list[Row]:
    config = FeatureConfig()
    models: list[InferenceModel[FeatureRequest, list[torch.Tensor]]] = [
        EfficientNetLite0Features(backbone_weights(), device=str(device), precision="fp32")
    ]
    chosen = EfficientNetLite0Features(backbone_weights(), device=str(device), precision=precision)
    if chosen.precision != "fp32":
        models.append(chosen)
    rows: list[Row] = []
    for size in sizes:
        pixels = batch_of(images, size)
        for model in models:
            run = partial(backbone_features, model, pixels, config)
            layout = "channels_last" if model.memory_format == torch.channels_last else "contiguous"
            ms = timed_ms(run, device, args.warmup, args.repeat)
            name = f"efficientnet-lite0 {config.resolution} blocks {config.blocks}"
            rows.append(row(name, layout, model.precision, size, ms))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    default_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--batch-sizes", default="1,8,32,64,128")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--models", default="detector,backbone")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    images = load_images()
    wanted = set(args.models.split(","))
    rows: list[Row] = []
    with torch.inference_mode():
        if "detector" in wanted:
            rows += bench_detector(images, device, args.precision, sizes, args)
        if "backbone" in wanted:
            rows += bench_backbone(images, device, args.precision, sizes, args)

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(f"<!-- {datetime.date.today()} {json.dumps(machine)} -->")
    command = ["python", "-m", "benchmarks.gpu_models", *(sys.argv[1:] if argv is None else argv)]
    print(f"command: {' '.join(command)}")
    print("| model | config | precision | batch | images/s | ms/batch |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        cells = (r.model, r.config, r.precision, r.batch, f"{r.images_per_s:,.1f}")
        print(f"| {' | '.join(map(str, cells))} | {r.ms_per_batch:.2f} |")
    if args.json is not None:
        report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": [
                "python",
                "-m",
                "benchmarks.gpu_models",
                *(sys.argv[1:] if argv is None else argv),
            ],
            "machine": machine,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
