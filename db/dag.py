"""The DAG step: the one place that decides what runs next for a job.

It runs under the job's row lock in whichever transaction changed the job's stages:
- in a stage worker, in the transaction that records the stage's result (no second
  Celery hop: DESIGN.md "Flow of one image");
- on the control queue (``imgpipe.advance``) for submit, the reaper and re-advances.
Both sides import this module (it sits below orchestrator/ and workers/); neither holds
a copy. What the step decides to send goes into an ``AfterCommit`` that the caller
delivers once the transaction has committed.

``step``:
1. skips pending stages behind a failed, dead or skipped stage, or behind a gate that
   tripped (reason ``quality_gate``);
2. marks every pending stage whose needs all succeeded as ``dispatched`` (with a
   deadline) — each exactly once, because the job lock serialises concurrent steps;
3. when every stage is terminal, finalises the job: status, verdict by policy, reasons.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from db.models import Job, StageRun
from db.outbox import write_outbox
from db.repo import lock_job
from imgpipe.aftercommit import AfterCommit, Dispatch
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.policy import Policy, evaluate_policy, parse_policy
from imgpipe.retry import RetryPolicy
from imgpipe.stageoutputs import gate_reason, headline

__all__ = [
    "AdvanceOutcome",
    "advance_locked",
    "completed_payload",
    "dispatch_of",
    "finalise",
    "mark_dispatched",
    "step",
    "summary_scores",
]

MAX_DISPATCH_BACKOFF_EXPONENT = 6


@dataclass
class AdvanceOutcome:
    dispatches: list[Dispatch] = field(default_factory=list)
    completed: dict[str, Any] | None = None
    job_status: str | None = None


def mark_dispatched(row: StageRun, now: datetime, dispatch_timeout_s: int) -> Dispatch:
    """Mark ``row`` dispatched. Its deadline is when the reaper will look again if no worker
    has claimed it: ``dispatch_timeout_s``, doubled for each earlier dispatch."""
    row.status = StageStatus.DISPATCHED
    row.dispatched_at = now
    row.dispatch_count += 1
    row.deadline_at = now + timedelta(
        seconds=_dispatch_deadlines(dispatch_timeout_s).ceiling_s(row.dispatch_count)
    )
    return dispatch_of(row)


def dispatch_of(row: StageRun) -> Dispatch:
    """The message that runs ``row`` (sent after the commit, imgpipe/aftercommit.py)."""
    return Dispatch(row.task_name, row.id, row.queue, row.time_limit_s)


@functools.cache
def _dispatch_deadlines(dispatch_timeout_s: int) -> RetryPolicy:
    """The reaper's look-again delays: the timeout, doubled per dispatch up to 64x (no
    jitter: a deadline, not a retry; ``max_attempts`` is the reaper's, unused here)."""
    cap_s = dispatch_timeout_s * 2**MAX_DISPATCH_BACKOFF_EXPONENT
    return RetryPolicy(base_s=dispatch_timeout_s, cap_s=cap_s, max_attempts=1)


def _skip(row: StageRun, reason: str, now: datetime) -> None:
    row.status = StageStatus.SKIPPED
    row.skip_reason = reason
    row.finished_at = now


def _gate_reason(row: StageRun) -> str | None:
    """Why a succeeded gate stage stops the pipeline, or None if it passes."""
    if not row.gate or row.status != StageStatus.SUCCEEDED or row.output is None:
        return None
    return gate_reason(row.kind, row.output)


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


@functools.lru_cache(maxsize=256)
def _policy(pipeline: str, policy_json: str, stage_kinds: tuple[tuple[str, str], ...]) -> Policy:
    # Rule fields were checked against the output schemas when the job was submitted; a
    # job queued before a schema change must still finish, so they are not checked again.
    return parse_policy(pipeline, json.loads(policy_json), dict(stage_kinds), check_fields=False)


def job_policy(job: Job, rows: Sequence[StageRun]) -> Policy:
    """The verdict policy stored with the job's resolved spec (parsed once per process)."""
    raw = (job.pipeline_spec or {}).get("policy", {})
    kinds = tuple(sorted((r.stage, r.kind) for r in rows))
    return _policy(job.pipeline, json.dumps(raw, sort_keys=True), kinds)


def finalise(job: Job, rows: Sequence[StageRun], now: datetime) -> dict[str, Any]:
    failed = [r for r in rows if r.status in (StageStatus.FAILED, StageStatus.DEAD)]
    gate = next((g for r in rows if (g := _gate_reason(r)) is not None), None)
    if failed:
        job.status = JobStatus.FAILED
        job.verdict = None
        job.error = "; ".join(f"{r.stage}: {r.error or r.status}" for r in failed)
        job.reasons = [f"stage {r.stage} {r.status}: {r.error}" for r in failed]
    else:
        verdict, reasons = evaluate_policy(
            job_policy(job, rows), succeeded_outputs(rows), gate_tripped=gate
        )
        job.status = JobStatus.SUCCEEDED
        job.verdict = verdict
        job.reasons = reasons
    job.finished_at = now
    return completed_payload(job, rows)


def succeeded_outputs(rows: Sequence[StageRun]) -> dict[str, Mapping[str, Any]]:
    return {r.stage: r.output for r in rows if r.status == StageStatus.SUCCEEDED and r.output}


def completed_payload(job: Job, rows: Sequence[StageRun]) -> dict[str, Any]:
    """The fields of a job's ``completed`` event (and webhook body, and its replay to a
    duplicate submission): the one place they are built."""
    return {
        "status": job.status,
        "verdict": job.verdict,
        "reasons": job.reasons,
        "error": job.error,
        "stages": {r.stage: r.status for r in rows},
        "scores": summary_scores(rows),
        "cache_hit_of": job.cache_hit_of,
    }


def summary_scores(rows: Sequence[StageRun]) -> dict[str, Any]:
    """The headline fields of each succeeded stage (imgpipe/stageoutputs.py
    HEADLINE_FIELDS), keyed ``<stage>.<field>``, for events and the CLI."""
    scores: dict[str, Any] = {}
    for row in rows:
        if row.status == StageStatus.SUCCEEDED and row.output:
            scores.update(headline(row.stage, row.kind, row.output))
    return scores


def advance_locked(
    job: Job, now: datetime, dispatch_timeout_s: int, *, webhook: bool
) -> AfterCommit:
    """Step a job whose row the caller holds locked; returns what to send after commit."""
    after = AfterCommit()
    if JobStatus(job.status).terminal:
        return after
    outcome = step(job, job.stage_runs, now, dispatch_timeout_s)
    after.dispatches.extend(outcome.dispatches)
    if outcome.completed is not None:
        after.completed(
            job.id, outcome.completed, job.idempotency_key, job.reply_to, webhook=webhook
        )
    return after


def advance_in_session(
    session: Session, job_id: str, now: datetime, dispatch_timeout_s: int, *, webhook: bool
) -> AfterCommit:
    """Lock the job and step it inside the caller's transaction (its answers written to
    the outbox in that transaction)."""
    job = lock_job(session, job_id)
    if job is None:
        return AfterCommit()
    after = advance_locked(job, now, dispatch_timeout_s, webhook=webhook)
    write_outbox(session, after)
    return after
