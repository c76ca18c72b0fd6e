"""Figures of finished jobs, read from the ``jobs`` and ``stage_runs`` rows only (the
public record every worker writes), so they mean the same whatever the stage path is.

Definitions (docs/benchmarks.md, "imgpipe bench: what each figure means"):
- ``e2e_ms``: job ``created_at`` -> ``finished_at``.
- ``e2e_from_submit_call_ms``: the wall clock just before ``submit()`` -> ``finished_at``
  (adds validation, decode and blob writes at submit; compared with the canvas).
- ``overhead_vs_sum_compute_ms``: ``e2e_ms`` minus the sum of the stages' ``compute_ms``.
- ``overhead_vs_critical_path_ms``: ``e2e_ms`` minus the largest sum of ``compute_ms``
  along a path of the DAG (what infinitely many workers could not avoid).
- per stage: ``compute_ms``, ``load_ms``, ``queue_wait_ms`` (dispatched -> started),
  ``total_ms`` as the worker records them; ``bookkeeping_ms = total_ms - compute_ms``;
  ``hop_ms``: the latest ``finished_at`` of the stages it needs (the job's ``created_at``
  for a root stage) -> its ``started_at``; ``bookkeeping_plus_hop_ms``: their sum, the
  per-stage cost the issue's 3 ms target is about.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from db.engine import session_scope
from db.models import Job, StageRun
from imgpipe.face.bench.stats import summary

__all__ = ["STAGE_QUANTILES", "Submitted", "job_figures"]

STAGE_QUANTILES = (0.5, 0.95)
_CHUNK = 500


@dataclass(frozen=True)
class Submitted:
    job_id: str
    submit_started: datetime
    """Wall clock (UTC) just before the ``submit()`` call."""
    submit_ms: float
    """How long ``submit()`` took."""


def _ms(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds() * 1000


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _critical_path_ms(runs: Sequence[StageRun]) -> float:
    by_name = {r.stage: r for r in runs}
    longest: dict[str, float] = {}

    def path(name: str) -> float:
        if name not in longest:
            run = by_name[name]
            before = max((path(n) for n in run.needs if n in by_name), default=0.0)
            longest[name] = before + (run.compute_ms or 0.0)
        return longest[name]

    return max((path(r.stage) for r in runs), default=0.0)


def _load(database_url: str, job_ids: list[str]) -> tuple[list[Job], dict[str, list[StageRun]]]:
    jobs: list[Job] = []
    runs: dict[str, list[StageRun]] = {}
    with session_scope(database_url) as session:
        for i in range(0, len(job_ids), _CHUNK):
            chunk = job_ids[i : i + _CHUNK]
            jobs.extend(session.execute(select(Job).where(Job.id.in_(chunk))).scalars())
            for run in session.execute(
                select(StageRun).where(StageRun.job_id.in_(chunk)).order_by(StageRun.position)
            ).scalars():
                runs.setdefault(run.job_id, []).append(run)
        session.expunge_all()
    return jobs, runs


def job_figures(
    database_url: str, submitted: Sequence[Submitted]
) -> tuple[dict[str, Any], datetime | None]:
    """The figures of ``submitted`` jobs, and the last ``finished_at`` among them."""
    calls = {s.job_id: s for s in submitted}
    jobs, runs = _load(database_url, list(calls))
    e2e, from_call, over_sum, over_path = [], [], [], []
    stages: dict[str, dict[str, list[float | None]]] = {}
    kinds: dict[str, str] = {}
    for job in jobs:
        job_runs = runs.get(job.id, [])
        total = _ms(job.finished_at, job.created_at)
        e2e.append(total)
        from_call.append(_ms(job.finished_at, calls[job.id].submit_started))
        over_sum.append(_minus(total, sum(r.compute_ms or 0.0 for r in job_runs)))
        over_path.append(_minus(total, _critical_path_ms(job_runs)))
        finished = {r.stage: r.finished_at for r in job_runs}
        for run in job_runs:
            kinds[run.stage] = run.kind
            before = [t for n in run.needs if (t := finished.get(n)) is not None]
            hop = _ms(run.started_at, max(before) if before else job.created_at)
            bookkeeping = _minus(run.total_ms, run.compute_ms)
            values = {
                "compute_ms": run.compute_ms,
                "load_ms": run.load_ms,
                "queue_wait_ms": run.queue_wait_ms,
                "total_ms": run.total_ms,
                "bookkeeping_ms": bookkeeping,
                "hop_ms": hop,
                "bookkeeping_plus_hop_ms": None if hop is None else _minus(bookkeeping, -hop),
            }
            for key, value in values.items():
                stages.setdefault(run.stage, {}).setdefault(key, []).append(value)
    last = max((j.finished_at for j in jobs if j.finished_at is not None), default=None)
    figures = {
        "jobs": len(submitted),
        "statuses": dict(Counter(j.status for j in jobs)),
        "e2e_ms": summary(e2e),
        "e2e_from_submit_call_ms": summary(from_call),
        "submit_call_ms": summary(s.submit_ms for s in submitted),
        "overhead_vs_sum_compute_ms": summary(over_sum),
        "overhead_vs_critical_path_ms": summary(over_path),
        "stages": {
            name: {"kind": kinds[name]}
            | {key: summary(vals, STAGE_QUANTILES) for key, vals in values.items()}
            for name, values in stages.items()
        },
    }
    return figures, last
