"""The anomaly stage as a model worker runs it, call after call: JPEG decode, then
``run_stage_batch`` (scoring and the heat-map PNG), ``--calls`` times.

    PYTHONPATH=. .venv/bin/python -m benchmarks.anomaly_stage_loop --batch 8

Fits a profile on 50 crops of a suite family first, in a child process (a worker loads a
profile fitted elsewhere; a fit in the timed process would leave its heap in another
state), then configures the timing process's
models from the settings as ``workers/process.py`` does for a model worker (so
``IMGPIPE_MODEL_RETAIN_HEAP=false`` turns the heap thresholds of
``workers/models/heap.py`` off), then prints the median ms per crop of the stage calls
after ``--warmup`` untimed ones. Unlike ``benchmarks.anomaly_speed`` (the same crops
scored back to back) this keeps a worker's other allocations between calls; compare two
settings with ``farm-bench --vs``, which alternates whole processes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from imgpipe.settings import Settings
from workers.anomaly.fit import fit_profile
from workers.anomaly.suite.dataset import family_split
from workers.models.registry import configure_models_from
from workers.stagecontract import StageInput
from workers.stages.anomaly import run_stage_batch


def _fit(family: str, profile: Path) -> None:
    split = family_split(family, n_fit=50, n_good=0, n_bad=0)
    fit_profile(split.fit, profile, name="loop")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default="woven")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings()
    configure_models_from(settings)
    split = family_split(args.family, n_fit=0, n_good=24, n_bad=0)
    jpegs = [cv2.imencode(".jpg", np.ascontiguousarray(c[..., ::-1]))[1] for c in split.good]
    per_crop_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "loop.npz"
        child = multiprocessing.get_context("spawn").Process(
            target=_fit, args=(args.family, profile)
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"fitting the profile failed (exit code {child.exitcode})")
        for call in range(args.warmup + args.calls):
            images = []
            for j in range(args.batch):
                jpeg = jpegs[(call * args.batch + j) % len(jpegs)]
                bgr = np.asarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), np.uint8)
                images.append(np.ascontiguousarray(bgr[..., ::-1]))
            inputs = [
                StageInput(image=im, original_size=(im.shape[1], im.shape[0]),
                           params={"profile": str(profile)}, upstream={})
                for im in images
            ]  # fmt: skip
            started = time.perf_counter()
            run_stage_batch(inputs)
            if call >= args.warmup:
                per_crop_ms.append((time.perf_counter() - started) * 1000 / args.batch)
    print(
        f"anomaly stage, batch {args.batch}: {statistics.median(per_crop_ms):.2f} ms/crop "
        f"(median of {args.calls} calls; retain_heap={settings.model_retain_heap})"
    )


if __name__ == "__main__":
    main()
