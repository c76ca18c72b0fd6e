"""Repository functions: the SQL the orchestrator and workers share."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from db.models import Job, ModelRecord, StageRun

__all__ = ["get_job", "lock_job", "lock_stage_run", "record_model"]


def lock_job(session: Session, job_id: str) -> Job | None:
    """The job row, locked for the rest of the transaction.

    PostgreSQL: ``SELECT ... FOR UPDATE``. SQLite: the transaction already holds the write
    lock (``BEGIN IMMEDIATE`` in db.engine); FOR UPDATE is not rendered there.
    """
    stmt = (
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    job = session.execute(stmt).scalar_one_or_none()
    if job is not None:
        session.execute(
            select(StageRun)
            .where(StageRun.job_id == job_id)
            .execution_options(populate_existing=True)
        ).scalars().all()
    return job


def lock_stage_run(session: Session, stage_run_id: int) -> StageRun | None:
    stmt = (
        select(StageRun)
        .where(StageRun.id == stage_run_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return session.execute(stmt).scalar_one_or_none()


def get_job(session: Session, job_id: str) -> Job | None:
    return session.execute(
        select(Job).where(Job.id == job_id).options(selectinload(Job.stage_runs))
    ).scalar_one_or_none()


def stage_runs_of(session: Session, job_id: str) -> Sequence[StageRun]:
    return (
        session.execute(
            select(StageRun).where(StageRun.job_id == job_id).order_by(StageRun.position)
        )
        .scalars()
        .all()
    )


def record_model(
    session: Session, *, name: str, version: str, weights_sha256: str, source: str, license: str
) -> None:
    """Insert the models row on first load; a concurrent insert of the same row is fine."""
    exists = session.execute(
        select(ModelRecord.id).where(
            ModelRecord.name == name,
            ModelRecord.version == version,
            ModelRecord.weights_sha256 == weights_sha256,
        )
    ).first()
    if exists:
        return
    try:
        with session.begin_nested():
            session.add(
                ModelRecord(
                    name=name,
                    version=version,
                    weights_sha256=weights_sha256,
                    source=source,
                    license=license,
                    first_loaded_by=socket.gethostname(),
                )
            )
    except IntegrityError:
        pass
