"""Orchestration overhead and throughput of the embedded stack (docs/benchmarks.md).

    python -m benchmarks.orchestration [--pipeline basic] [--latency-jobs 30]
        [--throughput-jobs 200] [--database-url postgresql://postgres@127.0.0.1:5432/bench]

1. Baseline, in this process: decode + the pipeline's stage runners called directly on
   the 1080p sample, one after the other (the work with no Celery, Redis or SQL at all).
2. Latency: one job at a time through the real stack; per job, end-to-end time
   (submit call to job finished_at) minus the stages' own compute_ms = orchestration
   overhead (queue hops, claims, DB writes, blob I/O, advance).
3. Throughput: N jobs submitted at once; images/s from first submit to last finish.
Every job uses force=True so the result cache is not hit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from db.engine import session_scope
from db.models import Job, StageRun
from imgpipe.contracts import JobStatus
from imgpipe.decode import DecodeLimits, decode_image
from imgpipe.settings import Settings
from imgpipe.stack import Stack
from orchestrator.context import OrchestratorContext
from orchestrator.reports import all_terminal, wait_terminal
from orchestrator.submit import SubmitRequest, resolve_spec, submit

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "photo_1080p.jpg"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def baseline_ms(data: bytes, pipeline: str, settings: Settings, repeats: int) -> dict[str, float]:
    """Decode + every stage of ``pipeline`` called in this process, in DAG order: the same
    work as a job with no Celery, Redis, SQL or blob store (models warmed up first)."""
    import importlib

    from imgpipe.stagekinds import STAGE_KINDS
    from orchestrator.pipelines import load_pipeline
    from workers.runtime import StageInput, StageOutput

    spec = resolve_spec(OrchestratorContext(settings), load_pipeline(pipeline), None)

    def run_once() -> None:
        decoded = decode_image(data, DecodeLimits())
        size = (decoded.header.width, decoded.header.height)
        outputs: dict[str, Any] = {}
        images = {"original": decoded.pixels}
        for name, stage in spec["stages"].items():
            kind = STAGE_KINDS[stage["kind"]]
            runner = getattr(importlib.import_module(kind.implementation), kind.entry)
            image = images.get(stage["reads"], decoded.pixels)
            upstream = {n: outputs[n] for n in stage["needs"] if n in outputs}
            result = runner([StageInput(image, size, stage["params"], upstream)])[0]
            if isinstance(result, StageOutput):
                outputs[name] = result.output
                if result.image is not None:
                    images[name] = result.image

    run_once()
    timings = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once()
        timings.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": statistics.median(timings), "min_ms": min(timings)}


def rss_mib_by_child(stack: Stack) -> dict[str, float]:
    """Resident memory of each stack child's whole process group (main + pool children)."""
    page = os.sysconf("SC_PAGE_SIZE")
    totals: dict[str, float] = {}
    for child in stack.children:
        total = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == child.process.pid:  # pgrp
                    total += int((proc / "statm").read_text().split()[1]) * page
            except (OSError, IndexError, ValueError):
                continue
        totals[child.name] = round(total / 2**20, 1)
    return totals


def wait_all(ctx: OrchestratorContext, job_ids: list[str], timeout_s: float = 1800) -> None:
    poll_s = 0.002 if len(job_ids) == 1 else 0.05
    statuses = wait_terminal(ctx.database_url, job_ids, timeout_s, poll_s=poll_s)
    if not all_terminal(statuses, job_ids):
        raise RuntimeError(f"jobs unfinished after {timeout_s} s: {statuses}")


def job_costs(ctx: OrchestratorContext, job_id: str) -> tuple[datetime, datetime, float, str]:
    with session_scope(ctx.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.finished_at is not None
        compute = sum(
            r.compute_ms or 0.0
            for r in session.execute(select(StageRun).where(StageRun.job_id == job_id)).scalars()
        )
        return job.created_at, job.finished_at, compute, job.status


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", default="basic")
    parser.add_argument("--latency-jobs", type=int, default=30)
    parser.add_argument("--throughput-jobs", type=int, default=200)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = SAMPLE.read_bytes()
    data_dir = Path(tempfile.mkdtemp(prefix="ipbench-", dir="/tmp"))
    settings = Settings(data_dir=data_dir, database_url=args.database_url)
    base = baseline_ms(data, args.pipeline, settings, 10)
    needs_gpu = args.pipeline != "basic"
    roles = ("orchestrator", "cpu", "gpu") if needs_gpu else ("orchestrator", "cpu")
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "pipeline": args.pipeline,
        "database": settings.effective_database_url.split(":")[0],
        "baseline_in_process_ms": base,
    }
    with Stack(settings, workers=roles, gpu_device=args.device) as stack:
        stack.wait_ready()
        ctx = OrchestratorContext(settings)
        request = SubmitRequest(data=data, pipeline=args.pipeline, force=True)
        # warm-up: load models, fill caches
        for _ in range(3):
            job_id = submit(ctx, request).job_id
            wait_all(ctx, [job_id])
        e2e, overhead, compute = [], [], []
        for _ in range(args.latency_jobs):
            t0 = time.perf_counter()
            job_id = submit(ctx, request).job_id
            wait_all(ctx, [job_id])
            total_ms = (time.perf_counter() - t0) * 1000
            _, _, compute_ms, status = job_costs(ctx, job_id)
            assert status == JobStatus.SUCCEEDED, status
            e2e.append(total_ms)
            compute.append(compute_ms)
            overhead.append(total_ms - compute_ms)
        result["latency"] = {
            "jobs": args.latency_jobs,
            "e2e_p50_ms": statistics.median(e2e),
            "e2e_p90_ms": percentile(e2e, 0.9),
            "stage_compute_p50_ms": statistics.median(compute),
            "overhead_p50_ms": statistics.median(overhead),
            "overhead_p90_ms": percentile(overhead, 0.9),
        }
        t0 = time.perf_counter()
        job_ids = [
            submit(ctx, SubmitRequest(data=data, pipeline=args.pipeline, force=True)).job_id
            for _ in range(args.throughput_jobs)
        ]
        submit_s = time.perf_counter() - t0
        wait_all(ctx, job_ids)
        wall_s = time.perf_counter() - t0
        result["rss_mib_by_process_group"] = rss_mib_by_child(stack)
        result["throughput"] = {
            "jobs": args.throughput_jobs,
            "submit_s": submit_s,
            "wall_s": wall_s,
            "images_per_s": args.throughput_jobs / wall_s,
            "baseline_in_process_images_per_s": 1000 / base["p50_ms"],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
