"""The live state of a stack, read from SQL, Redis and the workers' remote control.

One reading serves three readers: ``imgpipe status`` (no job id), ``imgpipe health`` and
the scrape-time collector of ``/metrics`` (imgpipe/face/metrics_server.py). Nothing here
writes: SQLite is read outside ``BEGIN IMMEDIATE`` (a scrape never takes the write lock
the workers need), PostgreSQL through plain SELECTs.

Each source that cannot be read adds a line to ``errors`` instead of raising: a status
page must show what it could read and say what it could not.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from db.engine import engine_for, is_sqlite, normalize_url
from db.models import Job, OutboxRow, StageRun, utcnow
from imgpipe.celery_app import QUEUES
from imgpipe.contracts import (
    SUBMIT_DEAD_STREAM,
    SUBMIT_GROUP,
    SUBMIT_STREAM,
    SUBMIT_TRIMMED_KEY,
    StageStatus,
)
from imgpipe.redact import redact_text
from imgpipe.settings import Settings

__all__ = [
    "ALL_QUEUES",
    "IngestLag",
    "LiveState",
    "StuckRun",
    "WorkerInfo",
    "read_live_state",
    "read_workers",
    "stuck_grace_s",
]

ALL_QUEUES: tuple[str, ...] = tuple(q for queues in QUEUES.values() for q in queues)
WINDOW_S = 3600
"""``jobs_last_hour``: jobs created within this window (and every job still in flight)."""
STUCK_LIMIT = 1000
"""At most this many stuck stage runs are read (the count says ``1000+`` past it)."""
IO_TIMEOUT_S = 3.0

_ACTIVE_JOBS = ("queued", "running")
_IN_FLIGHT = (StageStatus.DISPATCHED, StageStatus.RUNNING)


def stuck_grace_s(settings: Settings) -> float:
    """How far past its deadline a stage run is *stuck*: the reaper, which runs every
    ``reaper_interval_s``, should have re-dispatched (or postponed) it by then."""
    return 2 * settings.reaper_interval_s + 30.0


@dataclass(frozen=True)
class StuckRun:
    stage_run_id: int
    job_id: str
    stage: str
    status: str
    queue: str
    overdue_s: float
    worker: str | None


@dataclass(frozen=True)
class IngestLag:
    lag_entries: int | None
    """Entries of the submit stream not yet delivered to the consumer group."""
    pending_entries: int
    """Delivered to a consumer, not yet acked."""
    oldest_undelivered_age_s: float | None
    """Age of the oldest entry not yet delivered (from its stream id); None: none waits."""
    consumers: int


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    queues: tuple[str, ...]
    device: str | None
    kind: str


@dataclass
class LiveState:
    at: datetime
    queue_depths: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, dict[str, int]] = field(default_factory=dict)
    """{status: {pipeline: count}}: jobs in flight, and jobs created in the last hour."""
    stuck: list[StuckRun] = field(default_factory=list)
    stuck_count: int = 0
    dead_stage_runs_last_hour: int = 0
    submit_dead_letters: int | None = None
    submit_trimmed_unread: int | None = None
    """Submit entries trimmed (MAXLEN) before any consumer read them: lost submissions."""
    outbox_pending: int = 0
    """Answers (events, webhooks) committed and not yet known to be delivered."""
    outbox_oldest_age_s: float | None = None
    ingest: IngestLag | None = None
    workers: list[WorkerInfo] | None = None
    """None: not asked (the metrics collector does not broadcast to the workers)."""
    errors: list[str] = field(default_factory=list)

    def jobs_by_status(self) -> dict[str, int]:
        return {status: sum(by.values()) for status, by in sorted(self.jobs.items())}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        data["jobs_by_status"] = self.jobs_by_status()
        return data


_read_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _read_engine(url: str) -> Engine:
    """SQLite: an engine of plain reads (no ``BEGIN IMMEDIATE``: a WAL reader blocks no
    writer); PostgreSQL: the process's engine."""
    if not is_sqlite(url):
        return engine_for(url)
    with _engines_lock:
        engine = _read_engines.get(url)
        if engine is None:
            engine = create_engine(normalize_url(url), connect_args={"timeout": IO_TIMEOUT_S})
            _read_engines[url] = engine
        return engine


def read_live_state(settings: Settings, now: datetime | None = None) -> LiveState:
    """Queue depths and streams from Redis, jobs and stage runs from SQL (not workers:
    ``read_workers`` broadcasts and waits, so callers ask for it separately)."""
    state = LiveState(at=now or utcnow())
    _read_redis(settings, state)
    _read_sql(settings, state)
    return state


def _read_redis(settings: Settings, state: LiveState) -> None:
    try:
        broker = redis.Redis.from_url(
            settings.broker_redis_url,
            socket_timeout=IO_TIMEOUT_S,
            socket_connect_timeout=IO_TIMEOUT_S,
        )
        with broker.pipeline(transaction=False) as pipe:
            for queue in ALL_QUEUES:
                pipe.llen(queue)
            depths = pipe.execute()
        state.queue_depths = dict(zip(ALL_QUEUES, (int(d) for d in depths), strict=True))
        broker.close()
    except (redis.RedisError, OSError) as exc:
        state.errors.append(
            f"broker unreachable: {redact_text(str(exc))}; is the stack running (imgpipe up)? "
            "check IMGPIPE_BROKER_URL"
        )
        return
    try:
        streams = redis.Redis.from_url(
            settings.effective_redis_url,
            socket_timeout=IO_TIMEOUT_S,
            socket_connect_timeout=IO_TIMEOUT_S,
        )
        state.submit_dead_letters = int(streams.xlen(SUBMIT_DEAD_STREAM))
        state.submit_trimmed_unread = int(streams.get(SUBMIT_TRIMMED_KEY) or 0)
        state.ingest = _ingest_lag(streams, state.at)
        streams.close()
    except (redis.RedisError, OSError) as exc:
        state.errors.append(f"streams Redis unreachable: {redact_text(str(exc))}")


def _ingest_lag(client: redis.Redis, now: datetime) -> IngestLag | None:
    """The submit stream's consumer group: lag, pending, age of the oldest undelivered
    entry (None when the group does not exist yet: no ``imgpipe ingest`` ever ran)."""
    if not client.exists(SUBMIT_STREAM):
        return None
    groups: list[dict[Any, Any]] = client.xinfo_groups(SUBMIT_STREAM)
    group = next((g for g in groups if _text(g.get("name")) == SUBMIT_GROUP), None)
    if group is None:
        return None
    lag = group.get("lag")
    last_id = _text(group.get("last-delivered-id")) or "0-0"
    oldest_age_s: float | None = None
    after: list[Any] = client.xrange(SUBMIT_STREAM, min=f"({last_id}", count=1)  # type: ignore[assignment]
    if after:
        entry_ms = int(_text(after[0][0]).split("-", 1)[0])
        oldest_age_s = max(0.0, now.timestamp() - entry_ms / 1000)
    return IngestLag(
        lag_entries=int(lag) if lag is not None else None,
        pending_entries=int(group.get("pending") or 0),
        oldest_undelivered_age_s=oldest_age_s,
        consumers=int(group.get("consumers") or 0),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _read_sql(settings: Settings, state: LiveState) -> None:
    since = state.at - timedelta(seconds=WINDOW_S)
    stuck_before = state.at - timedelta(seconds=stuck_grace_s(settings))
    try:
        with _read_engine(settings.effective_database_url).connect() as conn:
            active = conn.execute(
                select(Job.status, Job.pipeline, func.count())
                .where(Job.status.in_(_ACTIVE_JOBS))
                .group_by(Job.status, Job.pipeline)
            ).all()
            recent = conn.execute(
                select(Job.status, Job.pipeline, func.count())
                .where(Job.status.not_in(_ACTIVE_JOBS), Job.created_at >= since)
                .group_by(Job.status, Job.pipeline)
            ).all()
            for status, pipeline, count in [*active, *recent]:
                state.jobs.setdefault(str(status), {})[str(pipeline)] = int(count)
            stuck_rows = conn.execute(
                select(
                    StageRun.id, StageRun.job_id, StageRun.stage, StageRun.status,
                    StageRun.queue, StageRun.deadline_at, StageRun.worker_host,
                    StageRun.worker_pid,
                )
                .where(StageRun.status.in_(_IN_FLIGHT), StageRun.deadline_at < stuck_before)
                .order_by(StageRun.deadline_at)
                .limit(STUCK_LIMIT)
            ).all()  # fmt: skip
            outbox_count, outbox_oldest = conn.execute(
                select(func.count(), func.min(OutboxRow.created_at))
            ).one()
            state.outbox_pending = int(outbox_count)
            if outbox_oldest is not None:
                state.outbox_oldest_age_s = _overdue_s(state.at, outbox_oldest)
            state.dead_stage_runs_last_hour = int(
                conn.execute(
                    select(func.count())
                    .select_from(StageRun)
                    .where(StageRun.status == StageStatus.DEAD, StageRun.finished_at >= since)
                ).scalar_one()
            )
    except SQLAlchemyError as exc:
        state.errors.append(
            f"database unreachable or not migrated: {redact_text(str(getattr(exc, 'orig', exc)))}"
            " (check IMGPIPE_DATABASE_URL; `imgpipe db upgrade` creates the schema)"
        )
        return
    state.stuck = [
        StuckRun(
            stage_run_id=int(r.id), job_id=str(r.job_id), stage=str(r.stage),
            status=str(r.status), queue=str(r.queue),
            overdue_s=_overdue_s(state.at, r.deadline_at),
            worker=f"{r.worker_host}:{r.worker_pid}" if r.worker_host else None,
        )
        for r in stuck_rows
    ]  # fmt: skip
    state.stuck_count = len(state.stuck)


def _overdue_s(now: datetime, deadline: datetime | None) -> float:
    if deadline is None:
        return 0.0
    if deadline.tzinfo is None and now.tzinfo is not None:
        now = now.replace(tzinfo=None)
    return round((now - deadline).total_seconds(), 1)


def read_workers(settings: Settings, timeout_s: float = 1.0) -> tuple[list[WorkerInfo], str | None]:
    """Every worker that answers a broadcast within ``timeout_s``: its queues (Celery
    ``active_queues``) and device (``stats``; the batching consumers report theirs).
    Returns the workers and an error line if the broker could not be reached."""
    from imgpipe.celery_app import create_app

    app = create_app(settings)
    try:
        inspect = app.control.inspect(timeout=timeout_s)
        queues: dict[str, Any] = inspect.active_queues() or {}
        stats: dict[str, Any] = inspect.stats() or {}
    except Exception as exc:  # kombu raises many kinds when the broker is away
        return [], f"broker unreachable for remote control: {redact_text(str(exc))}"
    finally:
        app.close()
    workers = []
    for name in sorted(set(queues) | set(stats)):
        info = stats.get(name) or {}
        names = tuple(str(q.get("name")) for q in queues.get(name) or [] if isinstance(q, dict))
        device = info.get("device") if isinstance(info, dict) else None
        if device is None and name.startswith("orchestrator-"):
            device = "cpu"
        kind = str(info.get("kind", "celery worker")) if isinstance(info, dict) else "?"
        workers.append(WorkerInfo(name, names, str(device) if device else None, kind))
    return workers, None
