"""What metrics and log fields cost one stage run, in the worker's own process.

    .venv/bin/python -m benchmarks.metrics_cost [--runs 20000]

Times, per stage run, what the executor adds to the stage path (workers/execute.py):
``record_stage`` (one counter, three histogram observations) plus ``observe_batch``
(one observation per compute call, counted here once per run: batch size 1, the worst
case), and entering/leaving ``bound_stages`` (the log fields of one stage). Each in a
fresh child process, since prometheus_client picks its value store at import: once with
``PROMETHEUS_MULTIPROC_DIR`` set (mmap files, as under ``imgpipe up``) and once without
(in memory). Prints one JSON object; microseconds per stage run, best of 5 repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
from imgpipe.logs import bound_stages
from imgpipe.metrics import observe_batch, record_stage

runs = int(sys.argv[1])
stages = ["quality", "enhance", "detect", "anomaly", "moderate"]

def metrics():
    for i in range(runs):
        stage = stages[i % 5]
        record_stage(stage, "cpu", "none", "stage_succeeded",
                     queue_wait_ms=3.0, load_ms=0.2, compute_ms=0.1)
        observe_batch("noop", "cpu", 1)

def fields():
    for i in range(runs):
        with bound_stages([("job", stages[i % 5], 1, i)]):
            pass

out = {}
for name, fn in (("metrics_us", metrics), ("log_fields_us", fields)):
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    out[name] = round(best / runs * 1e6, 2)
print(json.dumps(out))
"""


def measure(runs: int, multiproc_dir: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if multiproc_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(runs)], env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    figures: dict[str, float] = json.loads(result.stdout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ipm-") as directory:
        report = {
            "command": f"python -m benchmarks.metrics_cost --runs {args.runs}",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "multiprocess_files": measure(args.runs, directory),
            "in_memory": measure(args.runs, None),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
