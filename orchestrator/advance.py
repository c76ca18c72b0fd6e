"""Advancing a job on the control queue (task ``imgpipe.advance``).

Stage workers advance their jobs themselves, in the transaction that records a stage's
result; the control queue advances a job after submit, when the reaper re-dispatches or
gives up on a stage, and on request. The step itself lives in db/dag.py (one copy, both
sides import it); this module only wraps it in a transaction and delivers what it decided
after the commit.
"""

from __future__ import annotations

import logging

from db.dag import advance_in_session
from db.engine import session_scope
from db.models import utcnow
from imgpipe.aftercommit import AfterCommit, deliver
from orchestrator.context import OrchestratorContext

__all__ = ["advance_job", "deliver_after_commit"]

log = logging.getLogger(__name__)


def deliver_after_commit(ctx: OrchestratorContext, after: AfterCommit) -> None:
    deliver(ctx, ctx.events, after, ctx.acks)


def advance_job(ctx: OrchestratorContext, job_id: str) -> AfterCommit:
    """Advance one job; safe to call any number of times, concurrently. Its answers are
    written to the outbox in the same transaction (db/dag.py ``advance_in_session``)."""
    with session_scope(ctx.database_url) as session:
        after = advance_in_session(
            session,
            job_id,
            utcnow(),
            ctx.settings.dispatch_timeout_s,
            webhook=bool(ctx.settings.webhook_url),
        )
    deliver_after_commit(ctx, after)
    return after
