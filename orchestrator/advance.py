"""Advancing a job's DAG: the one place that decides what runs next.

``advance_job`` runs on the control queue (task ``imgpipe.advance``) after every stage
finishes, and from the reaper. Under a row lock on the job it:
1. skips pending stages behind a failed, dead or skipped stage, or behind a gate that
   tripped (reason ``quality_gate``);
2. marks every pending stage whose needs all succeeded as ``dispatched`` (with a
   deadline) — each exactly once, because the lock serialises concurrent advances;
3. when every stage is terminal, finalises the job: status, verdict by policy, reasons.
Celery messages and events go out only after the transaction commits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from db.engine import session_scope
from db.models import Job, StageRun, utcnow
from db.repo import lock_job
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.events import EventType
from orchestrator.context import OrchestratorContext
from orchestrator.pipelines import parse_pipeline
from orchestrator.policy import evaluate_policy
from orchestrator.webhooks import dispatch_webhook

__all__ = ["AdvanceOutcome", "Dispatch", "advance_job", "send_dispatches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatch:
    task_name: str
    stage_run_id: int
    queue: str
    time_limit_s: int


@dataclass
class AdvanceOutcome:
    dispatches: list[Dispatch] = field(default_factory=list)
    completed: dict[str, Any] | None = None
    job_status: str | None = None


MAX_DISPATCH_BACKOFF_EXPONENT = 6


def mark_dispatched(row: StageRun, now: datetime, dispatch_timeout_s: int) -> Dispatch:
    """Mark ``row`` dispatched. Its deadline is when the reaper will look again if no worker
    has claimed it: ``dispatch_timeout_s``, doubled for each earlier dispatch."""
    row.status = StageStatus.DISPATCHED
    row.dispatched_at = now
    row.dispatch_count += 1
    backoff = 2 ** min(row.dispatch_count - 1, MAX_DISPATCH_BACKOFF_EXPONENT)
    row.deadline_at = now + timedelta(seconds=dispatch_timeout_s * backoff)
    return Dispatch(row.task_name, row.id, row.queue, row.time_limit_s)


def _skip(row: StageRun, reason: str, now: datetime) -> None:
    row.status = StageStatus.SKIPPED
    row.skip_reason = reason
    row.finished_at = now


def _gate_reason(row: StageRun) -> str | None:
    """Why a succeeded gate stage stops the pipeline, or None if it passes."""
    if not row.gate or row.status != StageStatus.SUCCEEDED or row.output is None:
        return None
    if row.output.get("usable", True):
        return None
    return str(row.output.get("unusable_reason") or "image unusable")


def step(
    job: Job, rows: Sequence[StageRun], now: datetime, dispatch_timeout_s: int
) -> AdvanceOutcome:
    """Pure DAG step over loaded rows (mutates them); see the module docstring."""
    outcome = AdvanceOutcome()
    by_name = {r.stage: r for r in rows}
    changed = True
    while changed:
        changed = False
        for row in rows:
            if row.status != StageStatus.PENDING:
                continue
            needs = [by_name[n] for n in row.needs]
            skip_reason: str | None = None
            for need in needs:
                if _gate_reason(need) is not None:
                    skip_reason = "quality_gate"
                elif need.status == StageStatus.SKIPPED:
                    skip_reason = need.skip_reason or f"upstream_skipped:{need.stage}"
                elif need.status in (StageStatus.FAILED, StageStatus.DEAD):
                    skip_reason = f"upstream_failed:{need.stage}"
                if skip_reason:
                    break
            if skip_reason is not None:
                _skip(row, skip_reason, now)
                changed = True
            elif all(n.status == StageStatus.SUCCEEDED for n in needs):
                outcome.dispatches.append(mark_dispatched(row, now, dispatch_timeout_s))
                changed = True
    if outcome.dispatches and job.status == JobStatus.QUEUED:
        job.status = JobStatus.RUNNING
        job.started_at = now
    if all(StageStatus(r.status).terminal for r in rows):
        outcome.completed = finalise(job, rows, now)
    outcome.job_status = job.status
    return outcome


def finalise(job: Job, rows: Sequence[StageRun], now: datetime) -> dict[str, Any]:
    spec = parse_pipeline(job.pipeline_spec)
    failed = [r for r in rows if r.status in (StageStatus.FAILED, StageStatus.DEAD)]
    gate = next((g for r in rows if (g := _gate_reason(r)) is not None), None)
    if failed:
        job.status = JobStatus.FAILED
        job.verdict = None
        job.error = "; ".join(f"{r.stage}: {r.error or r.status}" for r in failed)
        job.reasons = [f"stage {r.stage} {r.status}: {r.error}" for r in failed]
    else:
        verdict, reasons = evaluate_policy(spec.policy, succeeded_outputs(rows), gate_tripped=gate)
        job.status = JobStatus.SUCCEEDED
        job.verdict = verdict
        job.reasons = reasons
    job.finished_at = now
    return completed_payload(job, rows)


def succeeded_outputs(rows: Sequence[StageRun]) -> dict[str, Mapping[str, Any]]:
    return {r.stage: r.output for r in rows if r.status == StageStatus.SUCCEEDED and r.output}


def completed_payload(job: Job, rows: Sequence[StageRun]) -> dict[str, Any]:
    """The fields of a job's ``completed`` event (and webhook body)."""
    return {
        "status": job.status,
        "verdict": job.verdict,
        "reasons": job.reasons,
        "error": job.error,
        "stages": {r.stage: r.status for r in rows},
        "scores": summary_scores(succeeded_outputs(rows)),
        "cache_hit_of": job.cache_hit_of,
    }


def publish_completed(
    ctx: OrchestratorContext,
    job_id: str,
    payload: dict[str, Any],
    idempotency_key: str | None,
    reply_to: str | None,
) -> None:
    """The ``completed`` event on the events stream (and ``reply_to``), then the webhook."""
    ctx.events.publish(
        EventType.COMPLETED, job_id, idempotency_key=idempotency_key, reply_to=reply_to, **payload
    )
    if ctx.settings.webhook_url:
        dispatch_webhook(ctx, job_id, idempotency_key, payload)


def summary_scores(outputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The headline numbers of each stage for events and the CLI."""
    scores: dict[str, Any] = {}
    for stage, output in outputs.items():
        for key in ("score", "verdict", "count", "anomalous", "flags", "scores", "applied"):
            if key in output:
                scores[f"{stage}.{key}"] = output[key]
    return scores


def send_dispatches(ctx: OrchestratorContext, dispatches: Sequence[Dispatch]) -> None:
    for d in dispatches:
        ctx.send(
            d.task_name,
            [d.stage_run_id],
            d.queue,
            time_limit=d.time_limit_s + 10,
            soft_time_limit=d.time_limit_s,
        )


def advance_job(ctx: OrchestratorContext, job_id: str) -> AdvanceOutcome:
    """Advance one job; safe to call any number of times, concurrently."""
    now = utcnow()
    with session_scope(ctx.database_url) as session:
        job = lock_job(session, job_id)
        if job is None:
            log.warning("advance: job %s not found", job_id)
            return AdvanceOutcome()
        if JobStatus(job.status).terminal:
            return AdvanceOutcome(job_status=job.status)
        outcome = step(job, job.stage_runs, now, ctx.settings.dispatch_timeout_s)
        idempotency_key, reply_to = job.idempotency_key, job.reply_to
    send_dispatches(ctx, outcome.dispatches)
    if outcome.completed is not None:
        publish_completed(ctx, job_id, outcome.completed, idempotency_key, reply_to)
    return outcome
