"""Latency of the HTTP API on a running stack: uploads, and review take + decide.

    # a stack whose IMGPIPE_PIPELINES_DIR holds a pipeline sending every job to review:
    #   name = "rv"; [stages.quality]; policy rule quality.score >= 0 -> review
    IMGPIPE_PIPELINES_DIR=DIR IMGPIPE_API_PORT=18781 imgpipe up --no-flower &
    PYTHONPATH=. .venv/bin/python -m benchmarks.web_api --url http://127.0.0.1:18781

Creates a key (all scopes), POSTs ``--jobs`` 48 px PNGs (multipart) one after the other,
waits until they wait for review, then takes and decides each (POST /v1/review/next, POST
.../decision) until the queue is empty; prints p50 and p95 of each. docs/api.md quotes it.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time

import numpy as np
import requests
from PIL import Image


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _quantile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8780")
    parser.add_argument("--pipeline", default="rv")
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()
    token = subprocess.run(
        [sys.executable, "-m", "imgpipe", "apikey", "create", "--name", "bench",
         "--scope", "submit", "--scope", "read", "--scope", "review"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    uploads: list[float] = []
    for i in range(args.jobs):
        started = time.perf_counter()
        response = requests.post(
            f"{args.url}/v1/jobs", headers=headers, files={"image": ("a.png", _png(i))},
            data={"pipeline": args.pipeline, "force": "1"}, timeout=60,
        )  # fmt: skip
        uploads.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    queue = f"{args.url}/v1/review/queue?pipeline={args.pipeline}"
    while requests.get(queue, headers=headers, timeout=60).json()["waiting"] < args.jobs:
        time.sleep(0.2)
    reviews: list[float] = []
    while True:
        started = time.perf_counter()
        taken = requests.post(
            f"{args.url}/v1/review/next", headers=headers, json={"pipeline": args.pipeline},
            timeout=60,
        )  # fmt: skip
        if taken.status_code == 204:
            break
        decided = requests.post(
            f"{args.url}/v1/review/items/{taken.json()['job_id']}/decision",
            headers=headers, json={"decision": "allow"}, timeout=60,
        )  # fmt: skip
        decided.raise_for_status()
        reviews.append((time.perf_counter() - started) * 1000)
    for name, values in (("POST /v1/jobs", uploads), ("review next + decision", reviews)):
        print(
            f"{name} x{len(values)}: p50 {_quantile(values, 0.5):.1f} ms, "
            f"p95 {_quantile(values, 0.95):.1f} ms"
        )


if __name__ == "__main__":
    main()
