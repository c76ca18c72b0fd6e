"""Repository functions: the SQL the orchestrator and workers share."""

from __future__ import annotations

import socket
from collections.abc import Collection, Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from db.models import Job, ModelRecord, StageRun

__all__ = [
    "get_job",
    "lock_job",
    "lock_jobs",
    "lock_stage_run",
    "lock_stage_runs",
    "record_model",
]


def lock_jobs(session: Session, job_ids: Collection[str]) -> dict[str, Job]:
    """The job rows, locked for the rest of the transaction in id order (the order every
    job-locking transaction keeps), each with its stage rows loaded fresh.

    PostgreSQL: ``SELECT ... FOR UPDATE``. SQLite: the transaction already holds the write
    lock (``BEGIN IMMEDIATE`` in db.engine); FOR UPDATE is not rendered there.
    """
    if not job_ids:
        return {}
    stmt = (
        select(Job)
        .where(Job.id.in_(sorted(set(job_ids))))
        .order_by(Job.id)
        .with_for_update()
        .options(selectinload(Job.stage_runs))
        .execution_options(populate_existing=True)
    )
    return {job.id: job for job in session.execute(stmt).scalars()}


def lock_job(session: Session, job_id: str) -> Job | None:
    """One job row, locked (see ``lock_jobs``)."""
    return lock_jobs(session, [job_id]).get(job_id)


def lock_stage_runs(session: Session, stage_run_ids: Collection[int]) -> list[StageRun]:
    """Stage rows locked in id order (a claim's lock order; it never locks a job)."""
    stmt = (
        select(StageRun)
        .where(StageRun.id.in_(sorted(set(stage_run_ids))))
        .order_by(StageRun.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return list(session.execute(stmt).scalars())


def lock_stage_run(session: Session, stage_run_id: int) -> StageRun | None:
    rows = lock_stage_runs(session, [stage_run_id])
    return rows[0] if rows else None


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
