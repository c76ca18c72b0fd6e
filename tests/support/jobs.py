"""Waiting for jobs in tests: the orchestrator's own poll, failing loudly on a timeout."""

from __future__ import annotations

from collections.abc import Sequence

from imgpipe.contracts import JobStatus
from orchestrator.reports import all_terminal, wait_terminal

__all__ = ["wait_jobs"]


def wait_jobs(database_url: str, job_ids: Sequence[str], timeout_s: float) -> dict[str, str]:
    """Statuses of ``job_ids`` once all are terminal; AssertionError after ``timeout_s``."""
    statuses = wait_terminal(database_url, job_ids, timeout_s)
    if not all_terminal(statuses, job_ids):
        unfinished = len(job_ids) - sum(JobStatus(s).terminal for s in statuses.values())
        raise AssertionError(
            f"{unfinished} of {len(job_ids)} jobs unfinished after {timeout_s} s: {statuses}"
        )
    return statuses
