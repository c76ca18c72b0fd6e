"""Reserving primary keys before an insert, so a batch of rows can be inserted without
RETURNING (one executemany) and refer to each other's ids before the flush.

Used by the batched submit (orchestrator/submit.py): it plans the stage rows of many jobs,
runs the DAG step on them (which names each dispatched row's id in its stage message)
and inserts them all at once.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from db.models import StageRun

__all__ = ["reserve_stage_run_ids"]


def reserve_stage_run_ids(session: Session, count: int) -> list[int]:
    """``count`` unused ``stage_runs.id`` values for rows this transaction inserts.

    PostgreSQL: ``nextval`` of the column's sequence (ids are never handed out twice; a
    rolled-back transaction leaves a gap, as with any serial). SQLite: the ids after
    ``MAX(id)``, which is what SQLite itself would assign: every transaction holds the
    database's write lock from its first statement (``BEGIN IMMEDIATE``, db/engine.py), so
    no other writer can take them before this one commits.
    """
    if count <= 0:
        return []
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(
            text(
                "SELECT nextval(pg_get_serial_sequence('stage_runs', 'id')) "
                "FROM generate_series(1, :count)"
            ),
            {"count": count},
        )
        return [int(value) for value in rows.scalars()]
    start = int(session.scalar(select(func.coalesce(func.max(StageRun.id), 0))) or 0)
    return list(range(start + 1, start + 1 + count))
