"""Serving ``/metrics``: the recorded metrics of every process, plus state read at scrape.

- ``imgpipe up`` serves the whole stack on ``IMGPIPE_METRICS_PORT`` (default 9808): what
  its children recorded (multi-process files under ``data_dir/metrics/stack``, emptied at
  start) and the stack's SQL/Redis state (``StateCollector``).
- ``imgpipe worker ...`` and ``imgpipe orchestrator`` serve their own when
  ``IMGPIPE_METRICS_PORT`` is set: the processes they fork record into
  ``data_dir/metrics/<role>-<pid>``; the orchestrator adds the state collector (it is the
  control plane; a deployment scrapes the state once, from it).

Recording is in imgpipe/metrics.py; the state comes from imgpipe/face/livestate.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from imgpipe.errors import ConfigError
from imgpipe.face.livestate import read_live_state
from imgpipe.face.metrics_dirs import MULTIPROC_ENV
from imgpipe.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "MetricsServer",
    "StateCollector",
    "mark_dead",
    "serve_metrics",
    "serve_stack_metrics",
]


class StateCollector(Collector):
    """Gauges computed at scrape time from SQL and Redis (never in the stage path)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        state = read_live_state(self.settings)
        up = GaugeMetricFamily(
            "imgpipe_state_source_up",
            "1 when this scrape could read the source (database, broker), else 0.",
            labels=["source"],
        )
        up.add_metric(["broker"], 0 if any("broker" in e for e in state.errors) else 1)
        up.add_metric(["database"], 0 if any("database" in e for e in state.errors) else 1)
        yield up
        depth = GaugeMetricFamily(
            "imgpipe_queue_depth", "Messages waiting in each broker queue.", labels=["queue"]
        )
        for queue, count in state.queue_depths.items():
            depth.add_metric([queue], count)
        yield depth
        jobs = GaugeMetricFamily(
            "imgpipe_jobs",
            "Jobs by status and pipeline: every queued or running job, and the jobs created "
            "in the last hour that reached another status.",
            labels=["status", "pipeline"],
        )
        for status, by_pipeline in state.jobs.items():
            for pipeline, count in by_pipeline.items():
                jobs.add_metric([status, pipeline], count)
        yield jobs
        yield GaugeMetricFamily(
            "imgpipe_stuck_stage_runs",
            "Stage runs dispatched or running well past their deadline (the reaper should "
            "have acted).",
            value=state.stuck_count,
        )
        yield GaugeMetricFamily(
            "imgpipe_dead_stage_runs_last_hour",
            "Stage runs that ended dead (attempts or dispatches used up) in the last hour.",
            value=state.dead_stage_runs_last_hour,
        )
        if state.submit_dead_letters is not None:
            yield GaugeMetricFamily(
                "imgpipe_submit_dead_letters",
                "Entries in the submit stream's dead-letter stream (imgpipe:submit:dead).",
                value=state.submit_dead_letters,
            )
        if state.submit_trimmed_unread is not None:
            yield GaugeMetricFamily(
                "imgpipe_submit_trimmed_unread",
                "Submit stream entries trimmed (MAXLEN) before any consumer read them: lost "
                "submissions (counter kept in Redis, imgpipe:submit:trimmed_unread).",
                value=state.submit_trimmed_unread,
            )
        yield GaugeMetricFamily(
            "imgpipe_outbox_pending",
            "Answers (events, webhooks) committed and not yet known to be delivered.",
            value=state.outbox_pending,
        )
        yield GaugeMetricFamily(
            "imgpipe_outbox_oldest_age_seconds",
            "Age of the oldest undelivered outbox row (0: none).",
            value=state.outbox_oldest_age_s or 0.0,
        )
        if state.ingest is not None and state.ingest.lag_entries is not None:
            yield GaugeMetricFamily(
                "imgpipe_ingest_lag_entries",
                "Submit stream entries not yet delivered to the ingest consumers (Redis 7+).",
                value=state.ingest.lag_entries,
            )
        if state.ingest is not None:
            yield GaugeMetricFamily(
                "imgpipe_ingest_pending_entries",
                "Submit stream entries delivered but not yet acked.",
                value=state.ingest.pending_entries,
            )
            yield GaugeMetricFamily(
                "imgpipe_ingest_lag_seconds",
                "Age of the oldest submit stream entry not yet delivered (0: none waits).",
                value=state.ingest.oldest_undelivered_age_s or 0.0,
            )


@dataclass
class MetricsServer:
    server: Any
    thread: Any
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(
    settings: Settings, port: int, multiproc_dir: Path | None, *, with_state: bool
) -> MetricsServer:
    """Serve ``/metrics`` on ``settings.metrics_address:port`` from a daemon thread."""
    registry = CollectorRegistry()
    if multiproc_dir is not None:
        MultiProcessCollector(registry, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
    if with_state:
        registry.register(StateCollector(settings))
    try:
        server, thread = start_http_server(port, settings.metrics_address, registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {settings.metrics_address}:{port}: {exc.strerror}; set "
            "IMGPIPE_METRICS_PORT to a free port, or to 0 to turn metrics off"
        ) from exc
    return MetricsServer(server, thread, int(server.server_port))


def serve_stack_metrics(
    settings: Settings, port: int, multiproc_dir: Path, *, required: bool
) -> MetricsServer | None:
    """``imgpipe up``'s endpoint: every child's recordings and the state. A port in use
    fails the start when ``required`` (set explicitly), else it is logged and the stack
    runs without metrics (None)."""
    try:
        return serve_metrics(settings, port, multiproc_dir, with_state=True)
    except ConfigError as exc:
        if required:
            raise
        log.warning("%s", exc)
        return None


def mark_dead(pid: int, multiproc_dir: Path | None = None) -> None:
    """A recording process exited: drop its live gauges (counters and histograms stay)."""
    path = multiproc_dir or os.environ.get(MULTIPROC_ENV)
    if path:
        with contextlib.suppress(OSError):
            mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
