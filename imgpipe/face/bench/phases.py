"""Submitting benchmark jobs to a running stack and waiting for them."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from imgpipe.contracts import JobStatus
from imgpipe.face.bench.figures import Submitted, job_figures
from imgpipe.face.stack import Stack
from orchestrator.context import OrchestratorContext
from orchestrator.reports import all_terminal, wait_terminal
from orchestrator.submit import SubmitRequest, submit

__all__ = ["JobsDone", "run_jobs"]

ONE_JOB_POLL_S = 0.002
MANY_JOBS_POLL_S = 0.05


def _submit(ctx: OrchestratorContext, pipeline: str, data: bytes) -> Submitted:
    at = datetime.now(UTC)
    t0 = time.perf_counter()
    request = SubmitRequest(data=data, pipeline=pipeline, source="bench", force=True)
    job_id = submit(ctx, request).job_id
    return Submitted(job_id, at, (time.perf_counter() - t0) * 1000)


JobsDone = Callable[[int, int], None]
"""Told ``(jobs finished, jobs in the phase)`` as a phase goes (the CLI's progress bar)."""


def _no_progress(_done: int, _total: int) -> None:
    return None


def _wait(
    ctx: OrchestratorContext,
    stack: Stack,
    job_ids: list[str],
    timeout_s: float,
    jobs_done: JobsDone = _no_progress,
) -> None:
    dead: list[str] = []

    def keep_waiting(statuses: dict[str, str]) -> bool:
        # counted from the statuses the wait polls anyway: the bar costs no query
        jobs_done(sum(JobStatus(s).terminal for s in statuses.values()), len(job_ids))
        dead.extend(stack.check_alive())
        return not dead

    poll_s = ONE_JOB_POLL_S if len(job_ids) == 1 else MANY_JOBS_POLL_S
    statuses = wait_terminal(
        ctx.database_url, job_ids, timeout_s, poll_s=poll_s, keep_waiting=keep_waiting
    )
    if dead:
        raise RuntimeError(f"a worker process exited: {', '.join(dead)}")
    if not all_terminal(statuses, job_ids):
        waiting = sum(1 for j in job_ids if statuses.get(j) in (None, "queued", "running"))
        raise RuntimeError(
            f"{waiting} of {len(job_ids)} jobs unfinished after {timeout_s:.0f} s; "
            f"see the logs in {stack.log_dir}"
        )


def run_jobs(
    ctx: OrchestratorContext,
    stack: Stack,
    pipeline: str,
    images: Sequence[bytes],
    count: int,
    at_once: bool,
    timeout_s: float,
    jobs_done: JobsDone = _no_progress,
) -> tuple[dict[str, Any], float]:
    """Submit ``count`` jobs over ``images`` (repeated, ``force=True`` so that no cached
    result answers) either all at once or each after the previous one finished. Returns
    their figures and the wall time from the first submit to the last ``finished_at``."""
    inputs = list(itertools.islice(itertools.cycle(images), count))
    submitted: list[Submitted] = []
    for data in inputs:
        submitted.append(_submit(ctx, pipeline, data))
        if not at_once:
            _wait(ctx, stack, [submitted[-1].job_id], timeout_s)
            jobs_done(len(submitted), count)
    _wait(
        ctx, stack, [s.job_id for s in submitted], timeout_s, jobs_done if at_once else _no_progress
    )
    figures, last = job_figures(ctx.database_url, submitted)
    wall_s = (last - submitted[0].submit_started).total_seconds() if last and submitted else 0.0
    return figures, wall_s
