"""The in-process baselines of ``imgpipe bench``: the pipeline's own stage functions
called in this process, with no Celery, Redis, SQL or blob store.

- sequential: decode + every stage in DAG order, one image at a time (batch 1): what a
  for-loop over the same functions does;
- batched: each model stage's ``run_stage_batch`` on batches of the same inputs: the
  physical limit of the model stages on this device.
"""

from __future__ import annotations

import importlib
import itertools
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from imgpipe.decode import DecodeLimits, decode_image
from imgpipe.stagekinds import GPU_STAGE_KINDS, STAGE_KINDS
from workers.stagecontract import BatchRunner, StageInput, StageOutput, StageSkip

__all__ = ["batched_baseline", "model_stages", "release_device_memory", "sequential_baseline"]

StageInputs = dict[str, list[StageInput]]
"""Per stage name, the StageInput of every image of a sequential pass."""


def _runner(kind: str) -> BatchRunner:
    spec = STAGE_KINDS[kind]
    runner: BatchRunner = getattr(importlib.import_module(spec.implementation), spec.entry)
    return runner


def model_stages(spec: Mapping[str, Any]) -> list[str]:
    """Names of the stages of a resolved spec that run on the model (GPU) queue."""
    return [name for name, s in spec["stages"].items() if s["kind"] in GPU_STAGE_KINDS]


def _run_image(data: bytes, spec: Mapping[str, Any], device: str, inputs: StageInputs) -> None:
    decoded = decode_image(data, DecodeLimits())
    size = (decoded.header.width, decoded.header.height)
    outputs: dict[str, Any] = {}
    images = {"original": decoded.pixels}
    for name, stage in spec["stages"].items():
        image = images.get(stage["reads"], decoded.pixels)
        upstream = {n: outputs[n] for n in stage["needs"] if n in outputs}
        kinds = {n: spec["stages"][n]["kind"] for n in upstream}
        item = StageInput(image, size, stage["params"], upstream, device, kinds)
        inputs.setdefault(name, []).append(item)
        result = _runner(stage["kind"])([item])[0]
        if isinstance(result, StageOutput):
            outputs[name] = result.output
            if result.image is not None:
                images[name] = result.image


def sequential_baseline(
    images: Sequence[bytes], spec: Mapping[str, Any], device: str, runs: int
) -> tuple[dict[str, Any], StageInputs]:
    """Decode + all stages, image after image, ``runs`` images (``images`` cycled) after
    one warm-up pass over ``images``. Returns the figures and the warm-up's stage inputs."""
    inputs: StageInputs = {}
    for data in images:  # warm-up: loads models, fills caches
        _run_image(data, spec, device, inputs)
    timings: list[float] = []
    for data in itertools.islice(itertools.cycle(images), runs):
        t0 = time.perf_counter()
        _run_image(data, spec, device, {})
        timings.append((time.perf_counter() - t0) * 1000)
    figures = {
        "images": len(timings),
        "p50_ms": round(statistics.median(timings), 3),
        "min_ms": round(min(timings), 3),
        "images_per_s": round(1000 * len(timings) / sum(timings), 3),
    }
    return figures, inputs


def batched_baseline(
    inputs: StageInputs, stages: Sequence[str], kinds: Mapping[str, str], batch_sizes: Sequence[int]
) -> dict[str, Any] | None:
    """Images/s of each model stage's runner per batch size (one warm-up call per size,
    then two timed calls), and what the model stages together could sustain in one
    process at each stage's best batch size. None when the pipeline has no model stage;
    a stage that skips (anomaly without a profile) is listed and left out of the limit."""
    if not stages:
        return None
    per_stage: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    for name in stages:
        runner = _runner(kinds[name])
        per_size: dict[str, float] = {}
        probe = runner(inputs[name][:1])[0]
        if isinstance(probe, StageSkip):  # e.g. anomaly without a profile
            skipped[name] = probe.reason
            continue
        for size in batch_sizes:
            batch = list(itertools.islice(itertools.cycle(inputs[name]), size))
            runner(batch)
            t0 = time.perf_counter()
            for _ in range(2):
                runner(batch)
            per_size[f"batch_{size}"] = round(2 * size / (time.perf_counter() - t0), 3)
        per_stage[name] = per_size
    seconds_per_image = sum(1 / max(rates.values()) for rates in per_stage.values())
    return {
        "batch_sizes": list(batch_sizes),
        "images_per_s_by_stage": per_stage,
        "skipped_stages": skipped,
        "model_stages_images_per_s": round(1 / seconds_per_image, 3) if per_stage else None,
    }


def release_device_memory(device: str) -> None:
    """Hand the baselines' cached CUDA memory back before the stack's model worker starts."""
    torch = sys.modules.get("torch")
    if torch is not None and device.startswith("cuda"):
        torch.cuda.empty_cache()
