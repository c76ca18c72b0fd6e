"""SQLAlchemy 2 typed models. The schema changes only through Alembic revisions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from db.types import UTCDateTime

__all__ = [
    "ApiKey",
    "Base",
    "Detection",
    "Image",
    "Job",
    "JobReply",
    "ModelRecord",
    "OutboxRow",
    "Review",
    "ReviewLease",
    "StageRun",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012


class Image(Base):
    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    blob_key: Mapped[str] = mapped_column(String(128))
    working_blob_key: Mapped[str | None] = mapped_column(String(128))
    """The blob stages decode pixels from (docs/pixels.md): normally ``blob_key`` itself;
    a lossless PNG for GIF/TIFF uploads; a raw .npy on rows written before that. NULL after
    ``db.gc`` collected it: the next submission of the image stores a new one."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    conversions: Mapped[list[Any]] = mapped_column(default=list)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_image_pipeline_hash", "image_sha256", "pipeline_hash"),
        Index("ix_jobs_verdict_finished", "verdict", "finished_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    image_sha256: Mapped[str | None] = mapped_column(ForeignKey("images.sha256"))
    input_sha256: Mapped[str] = mapped_column(String(64))
    """sha256 of the submitted bytes, also for rejected input that has no images row."""
    pipeline: Mapped[str] = mapped_column(String(64))
    pipeline_hash: Mapped[str] = mapped_column(String(64))
    pipeline_spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[str] = mapped_column(String(16), default="interactive")
    source: Mapped[str] = mapped_column(String(32), default="api")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    cache_hit_of: Mapped[str | None] = mapped_column(String(36))
    verdict: Mapped[str | None] = mapped_column(String(16))
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    error: Mapped[str | None] = mapped_column(Text)
    metadata_json: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    overrides: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reply_to: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    stage_runs: Mapped[list[StageRun]] = relationship(
        back_populates="job", order_by="StageRun.position"
    )


class StageRun(Base):
    __tablename__ = "stage_runs"
    __table_args__ = (
        UniqueConstraint("job_id", "stage"),
        Index("ix_stage_runs_status_deadline", "status", "deadline_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    position: Mapped[int] = mapped_column(Integer, default=0)
    task_name: Mapped[str] = mapped_column(String(128))
    queue: Mapped[str] = mapped_column(String(64))
    needs: Mapped[list[Any]] = mapped_column(default=list)
    reads: Mapped[str] = mapped_column(String(64), default="original")
    gate: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    time_limit_s: Mapped[int] = mapped_column(Integer, default=300)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output_blob_key: Mapped[str | None] = mapped_column(String(128))
    skip_reason: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    error_history: Mapped[list[Any]] = mapped_column(default=list)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(32))
    code_version: Mapped[str | None] = mapped_column(String(64))
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_weights_sha256: Mapped[str | None] = mapped_column(String(64))
    dispatch_count: Mapped[int] = mapped_column(Integer, default=0)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    queue_wait_ms: Mapped[float | None] = mapped_column(Float)
    load_ms: Mapped[float | None] = mapped_column(Float)
    compute_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    """How many stage runs shared this run's forward pass (micro-batching model workers)."""

    job: Mapped[Job] = relationship(back_populates="stage_runs")


class Detection(Base):
    __tablename__ = "detections"
    __table_args__ = (Index("ix_detections_label_score", "label", "score"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    stage_run_id: Mapped[int] = mapped_column(ForeignKey("stage_runs.id", ondelete="CASCADE"))
    job_id: Mapped[str] = mapped_column(String(36), index=True)
    label: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)


class ModelRecord(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", "weights_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text)
    license: Mapped[str] = mapped_column(String(128))
    first_loaded: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    first_loaded_by: Mapped[str | None] = mapped_column(String(255))


class Review(Base):
    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    decision: Mapped[str] = mapped_column(String(16))
    reviewer: Mapped[str] = mapped_column(String(128))
    note: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobReply(Base):
    """A ``reply_to`` stream subscribed to a job by a duplicate submission (same idempotency
    key): it gets the job's ``completed`` (and ``reviewed``) events too. The first
    submitter's stream is ``jobs.reply_to``."""

    __tablename__ = "job_replies"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    reply_to: Mapped[str] = mapped_column(String(200), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class OutboxRow(Base):
    """An answer decided by a committed transaction and not yet known to be delivered
    (db/outbox.py): an event for one or more Redis streams, or a webhook body.

    Written in the transaction that made the state change; removed once published. Rows
    still here after ``IMGPIPE_OUTBOX_RELAY_AFTER_S`` are re-sent by the relay."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    """The ``event_id`` consumers deduplicate by (a uuid4, hex)."""
    kind: Mapped[str] = mapped_column(String(16))
    """``event`` or ``webhook``."""
    streams: Mapped[list[Any]] = mapped_column(default=list)
    """Stream keys an event goes to (``imgpipe:events`` and every reply_to); empty for a
    webhook."""
    payload: Mapped[str] = mapped_column(Text)
    """An event's fields as a JSON object of JSON-encoded strings, or the webhook body."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ReviewLease(Base):
    """Who is looking at a ``review`` job right now, and until when (the review console:
    orchestrator/review_lease.py). One row per job: a second reviewer cannot take it before
    ``expires_at``; the decision deletes it in the transaction that records the review."""

    __tablename__ = "review_leases"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(128), index=True)
    taken_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiKey(Base):
    """An HTTP API key (db/apikeys.py): only the sha256 of the token is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    """Who holds the key; a review key's name is the reviewer stored with each decision."""
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    """The token's first characters, shown by `imgpipe apikey list` to tell keys apart."""
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
