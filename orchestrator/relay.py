"""The outbox relay on the orchestrator: answers committed but never delivered are re-sent.

Runs at the start of every reaper pass (orchestrator/reaper.py) and once when the
orchestrator worker starts (orchestrator/tasks.py). The mechanics live in db/outbox.py;
here they get the orchestrator's Redis, Celery sender and settings, and an outage of the
database or Redis only postpones the relay to the next pass.
"""

from __future__ import annotations

import logging

import redis

from db.outbox import relay
from imgpipe.errors import TransientError
from orchestrator.context import OrchestratorContext

__all__ = ["relay_outbox"]

log = logging.getLogger(__name__)


def relay_outbox(ctx: OrchestratorContext) -> int:
    """Re-send outbox rows older than IMGPIPE_OUTBOX_RELAY_AFTER_S; how many were sent."""
    try:
        return relay(ctx.database_url, ctx.events, ctx, ctx.settings.outbox_relay_after_s)
    except (TransientError, redis.RedisError, OSError) as exc:
        log.warning("outbox relay postponed to the next reaper pass: %s", exc)
        return 0
