"""`imgpipe bench` end to end: a real embedded stack, a real canvas worker, one JSON
object with every figure, and nothing left running afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH_TIMEOUT_S = 240


def processes_with_marker(marker: str) -> list[int]:
    """Pids whose environment holds ``marker`` (every process the bench started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def test_bench_noop_reports_every_figure_against_the_canvas_and_leaves_nothing_running() -> None:
    marker = f"IMGPIPE_BENCH_TEST_MARKER_{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    env["BENCH_TEST_MARKER"] = marker
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "imgpipe", "bench", "--stages", "noop", "--images", "10"]
    done = subprocess.run(
        [*command, "--latency-jobs", "5", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=BENCH_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads(done.stdout)

    assert processes_with_marker(marker) == []
    assert report["config"]["pipeline"] == "noop"
    assert report["command"].startswith("imgpipe bench --stages noop")
    assert {"platform", "cpu_count", "python", "torch", "device_name"} <= set(report["machine"])
    ours = report["imgpipe"]
    assert ours["throughput"]["statuses"] == {"succeeded": 10}
    assert positive(ours["throughput"]["images_per_s"])
    for phase in ("latency", "throughput"):
        figures = ours[phase]
        assert all(positive(figures["e2e_ms"][p]) for p in ("p50", "p95", "p99"))
        assert figures["e2e_ms"]["p50"] <= figures["e2e_ms"]["p99"]
        assert positive(figures["overhead_vs_sum_compute_ms"]["p50"])
        assert set(figures["stages"]) == {"quality", "enhance", "detect", "anomaly", "moderate"}
        for stage in figures["stages"].values():
            assert stage["kind"] == "noop"
            for key in ("compute_ms", "bookkeeping_ms"):
                assert positive(stage[key]["p50"]) and positive(stage[key]["p95"]), key
            # a stage its worker continued locally has no hop: 0 is a real value here
            for key in ("queue_wait_ms", "hop_ms"):
                assert stage[key]["p50"] >= 0 and stage[key]["p95"] >= stage[key]["p50"], key
    assert {"orchestrator", "cpu", "redis-server", "canvas worker"} <= set(ours["rss_mib"])
    assert all(positive(v) for v in ours["rss_mib"].values())
    assert ours["gpu"] is None  # device cpu

    baselines = report["baselines"]
    assert positive(baselines["in_process_sequential"]["images_per_s"])
    assert baselines["in_process_batched"] is None  # no model stages in the noop pipeline
    canvas = baselines["celery_canvas"]
    assert canvas["worker_concurrency"] == 2
    assert positive(canvas["throughput"]["dags_per_s"])
    assert positive(canvas["latency"]["e2e_ms"]["p50"])
    ratios = report["ratios"]
    for key in (
        "throughput_vs_in_process_sequential",
        "throughput_vs_celery_canvas",
        "latency_p50_vs_celery_canvas",
    ):
        assert positive(ratios[key]), key
    assert ratios["throughput_vs_in_process_batched_model_stages"] is None
    assert {t["target"] for t in report["targets"]} >= {"noop DAGs/s vs the canvas"}
