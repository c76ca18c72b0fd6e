"""Prometheus metrics recorded where the work happens (stage workers, the reaper).

Only what a process *does* is recorded here, cheaply: a few histogram observations and
counter increments per stage run, after its batch is persisted. Values that are SQL or
Redis state (jobs by status, queue depths, dead letters, ingest lag) are read when
Prometheus scrapes, by the collector of the process that serves ``/metrics``
(imgpipe/face/metrics_server.py), never in the stage path.

Multi-process mode: a process that records for a server in another process (the
children of ``imgpipe up``, the forked consumers of ``imgpipe worker cpu``, the Celery
pool of ``imgpipe orchestrator``) has ``PROMETHEUS_MULTIPROC_DIR`` in its environment
*before* it imports this module (prometheus_client chooses its value store at import);
the server aggregates the files of every process there (imgpipe/face/metrics_dirs.py).
Without the variable the metrics live in the process's memory and cost nothing but that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BATCH_SIZE",
    "GPU_MEMORY_BYTES",
    "REAPER_ACTIONS",
    "STAGE_RUNS",
    "STAGE_SECONDS",
    "observe_batch",
    "record_reaper",
    "record_stage",
]

_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

STAGE_SECONDS = Histogram(
    "imgpipe_stage_duration_seconds",
    "Time of one stage run by phase: queue_wait (dispatch to claim), load (pixels), "
    "compute (its share of the forward pass).",
    ["stage", "phase", "device", "model"],
    buckets=_SECONDS_BUCKETS,
)
STAGE_RUNS = Counter(
    "imgpipe_stage_runs",
    "Stage runs a worker finished, by outcome (stage_succeeded, stage_skipped, failed, "
    "dead, retrying, duplicate, superseded ...).",
    ["stage", "outcome", "device"],
)
BATCH_SIZE = Histogram(
    "imgpipe_batch_size",
    "Stage runs computed in one call of a stage kind (one forward pass for model stages).",
    ["kind", "device"],
    buckets=_BATCH_BUCKETS,
)
REAPER_ACTIONS = Counter(
    "imgpipe_reaper_actions",
    "What the reaper did to overdue stage runs and stalled jobs, by action.",
    ["action"],
)
GPU_MEMORY_BYTES = Gauge(
    "imgpipe_gpu_memory_bytes",
    "CUDA memory of a model worker after its last batch (torch allocator), by kind: "
    "allocated or reserved.",
    ["device", "kind"],
    multiprocess_mode="livemax",
)


_children: dict[tuple[object, ...], Any] = {}
"""Labelled children by their labels: ``labels()`` validates and locks on every call."""


def _child(metric: Any, *labels: str) -> Any:
    key = (id(metric), *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def record_stage(
    stage: str,
    device: str,
    model: str,
    outcome: str,
    *,
    queue_wait_ms: float | None,
    load_ms: float | None,
    compute_ms: float | None,
) -> None:
    """One finished stage run: its outcome and the duration of each phase it went through."""
    _child(STAGE_RUNS, stage, outcome, device).inc()
    for phase, ms in (("queue_wait", queue_wait_ms), ("load", load_ms), ("compute", compute_ms)):
        if ms is not None:
            _child(STAGE_SECONDS, stage, phase, device, model).observe(ms / 1000.0)


def observe_batch(kind: str, device: str, size: int) -> None:
    _child(BATCH_SIZE, kind, device).observe(size)


def record_reaper(counts: Mapping[str, int]) -> None:
    """A reaper pass's counts per action (``ReapReport.as_dict()``); zeros are skipped."""
    for action, count in counts.items():
        if count:
            REAPER_ACTIONS.labels(action).inc(count)
