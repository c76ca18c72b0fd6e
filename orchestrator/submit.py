"""Accepting images: validate, store, plan, dispatch — one at a time or a batch at once.

Used by the Python API, the CLI, the ``imgpipe.submit`` Celery task and the Redis
stream consumer, so every entry point behaves the same. ``submit`` is ``submit_many`` of
one request. A batch costs, whatever its size:

1. one query for the idempotency keys already taken (a key repeated inside the batch
   becomes one job: the later requests get it with ``created=False``);
2. decoding and hashing each image, then writing every blob on the blob store's threads
   (db/blobs.py ``start_put_many``) while the transaction runs;
3. one transaction: the images rows (one SELECT), one query for cache hits, every job
   and stage row (ids reserved first, one executemany per table), and the DAG step
   (db/dag.py) for each job; it commits only once every blob it names is durable
   (on SQLite, whose one write lock the transaction holds, the blobs are waited for
   before it begins);
   and the outbox rows of its answers (``accepted``/``rejected``, ``completed`` of a
   cache hit; db/outbox.py);
4. after the commit, the stage messages through one producer and every event in one
   Redis round trip (imgpipe/aftercommit.py), then one DELETE of the delivered rows;
5. duplicates (a key already taken) that name a ``reply_to`` are subscribed to their
   job and answered in one more transaction (orchestrator/duplicates.py);
6. duplicates of a job still in flight re-send its stage messages that have waited
   unclaimed for a while (orchestrator/resend.py): the duplicate may be the caller's
   retry of a submission that committed but never sent them.

If the batch transaction fails — a racing consumer took an idempotency key or inserted
the same image first (IntegrityError), or one request holds something the database
refuses — each request is retried in a transaction of its own, so the conflict or the
bad request affects only itself and every key still ends as exactly one job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from db.blobs import PendingPuts, sha256_bytes
from db.dag import completed_payload, step
from db.engine import is_sqlite, session_scope
from db.ids import reserve_stage_run_ids
from db.models import Job, StageRun, new_uuid, utcnow
from db.outbox import write_outbox
from imgpipe.aftercommit import AfterCommit, Dispatch, deliver
from imgpipe.contracts import JobStatus, Priority, reply_to_problem
from imgpipe.decode import DecodedImage, DecodeLimits, decode_image
from imgpipe.errors import ImageRejectedError, PermanentError, TransientError
from imgpipe.events import EventType
from orchestrator.context import OrchestratorContext
from orchestrator.duplicates import Duplicate, answer_duplicates
from orchestrator.pipelines import PipelineSpec, load_pipeline, pipeline_hash
from orchestrator.resend import resend_unclaimed
from orchestrator.submit_rows import (
    StoredImage,
    cache_sources,
    copy_cached,
    plan_stages,
    resolve_spec,
    store_image_rows,
    write_image_blobs,
)

__all__ = ["SubmitRequest", "SubmitResult", "resolve_spec", "submit", "submit_many"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmitRequest:
    data: bytes
    pipeline: str
    priority: Priority = Priority.INTERACTIVE
    idempotency_key: str | None = None
    source: str = "api"
    metadata: Mapping[str, Any] | None = None
    overrides: Mapping[str, Mapping[str, Any]] | None = None
    reply_to: str | None = None
    force: bool = False


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    status: str
    created: bool
    """False when the idempotency key matched an existing job."""
    cache_hit: bool = False
    reason: str | None = None


@dataclass
class _Pending:
    """One request on its way into the batch transaction."""

    request: SubmitRequest
    sha: str
    pipeline: str
    resolved: dict[str, Any]
    p_hash: str
    decoded: DecodedImage | None
    rejection: ImageRejectedError | None
    image: StoredImage | None = None
    result: SubmitResult | Exception | None = None
    after: AfterCommit = field(default_factory=AfterCommit)


def submit(ctx: OrchestratorContext, request: SubmitRequest) -> SubmitResult:
    """Create (or find) the job for one image. Raises PermanentError for a bad request
    (unknown pipeline, bad overrides); a bad *image* becomes a ``rejected`` job."""
    (result,) = submit_many(ctx, [request])
    if isinstance(result, Exception):
        raise result
    return result


def submit_many(
    ctx: OrchestratorContext, requests: Sequence[SubmitRequest]
) -> list[SubmitResult | Exception]:
    """Create (or find) the job of each request, in order; see the module docstring.

    A request's own error takes its place in the list — ``PermanentError`` for a bad
    request (unknown pipeline, bad overrides), any other exception when only that request
    failed — and the others go ahead. An error that stops the whole batch before anything
    committed (database or blob store down) is raised."""
    results: list[SubmitResult | Exception | None] = [None] * len(requests)
    existing = _jobs_by_key(ctx, {r.idempotency_key for r in requests if r.idempotency_key})
    pending: dict[int, _Pending] = {}
    first_of_key: dict[str, int] = {}
    repeats: dict[int, int] = {}
    specs: dict[str, PipelineSpec] = {}
    for index, request in enumerate(requests):
        key = request.idempotency_key
        if key and key in existing:
            job_id, status = existing[key]
            results[index] = SubmitResult(job_id, status, created=False)
        elif key and key in first_of_key:
            repeats[index] = first_of_key[key]
        else:
            try:
                pending[index] = _prepare(ctx, request, specs)
            except Exception as exc:
                results[index] = exc
                continue
            if key:
                first_of_key[key] = index
    accepted = [p for p in pending.values() if p.decoded is not None]
    stored, blobs = write_image_blobs(
        ctx.blobs, [(p.sha, p.request.data, p.decoded) for p in accepted if p.decoded]
    )
    for p, image in zip(accepted, stored, strict=True):
        p.image = image
    if pending:
        _commit_batch(ctx, list(pending.values()), blobs)
        after = AfterCommit()
        for p in pending.values():
            after.extend(p.after)
        _deliver(ctx, after)
    for index, p in pending.items():
        results[index] = p.result
    for index, first in repeats.items():
        original = results[first]
        results[index] = (
            SubmitResult(original.job_id, original.status, created=False)
            if isinstance(original, SubmitResult)
            else original
        )
    _answer_duplicates(ctx, requests, results)
    in_flight = {job for job, status in existing.values() if not JobStatus(status).terminal}
    resend_unclaimed(ctx, in_flight)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def _answer_duplicates(
    ctx: OrchestratorContext,
    requests: Sequence[SubmitRequest],
    results: list[SubmitResult | Exception | None],
) -> None:
    """Duplicates with a reply_to get ``accepted`` (duplicate) and the job's ``completed``
    there (orchestrator/duplicates.py). If that transaction fails, those requests fail
    (and are retried by their entry point); the others keep their results."""
    found = [
        (index, Duplicate(result.job_id, reply_to))
        for index, (request, result) in enumerate(zip(requests, results, strict=True))
        if isinstance(result, SubmitResult)
        and not result.created
        and (reply_to := request.reply_to) is not None
    ]
    if not found:
        return
    try:
        answer_duplicates(ctx, [duplicate for _, duplicate in found])
    except Exception as exc:
        log.warning("answers to %d duplicate submission(s) not recorded: %s", len(found), exc)
        for index, _ in found:
            results[index] = exc


def _jobs_by_key(ctx: OrchestratorContext, keys: set[str]) -> dict[str, tuple[str, str]]:
    """``key -> (job id, status)`` of the keys already taken: one query."""
    if not keys:
        return {}
    with session_scope(ctx.database_url) as session:
        rows = session.execute(
            select(Job.idempotency_key, Job.id, Job.status).where(Job.idempotency_key.in_(keys))
        ).all()
    return {key: (job_id, status) for key, job_id, status in rows if key is not None}


def _prepare(
    ctx: OrchestratorContext, request: SubmitRequest, specs: dict[str, PipelineSpec]
) -> _Pending:
    """Resolve the pipeline and decode the image (a rejected image is not an error)."""
    if request.reply_to is not None:
        problem = reply_to_problem(request.reply_to, ctx.settings.reply_to_prefix)
        if problem is not None:
            raise PermanentError(problem)
    spec = specs.get(request.pipeline)
    if spec is None:
        spec = load_pipeline(request.pipeline, ctx.settings.pipelines_dir)
        spec.require_installed()
        specs[request.pipeline] = spec
    resolved = resolve_spec(ctx, spec, request.overrides)
    rejection: ImageRejectedError | None = None
    decoded: DecodedImage | None = None
    try:
        decoded = decode_image(request.data, DecodeLimits.from_settings(ctx.settings))
    except ImageRejectedError as exc:
        rejection = exc
    return _Pending(
        request=request,
        sha=sha256_bytes(request.data),
        pipeline=spec.name,
        resolved=resolved,
        p_hash=pipeline_hash(resolved),
        decoded=decoded,
        rejection=rejection,
    )


def _commit_batch(ctx: OrchestratorContext, batch: list[_Pending], blobs: PendingPuts) -> None:
    """One transaction for ``batch``; if it fails, one per request (see the module)."""
    if len(batch) == 1:
        _commit_one(ctx, batch[0], blobs)
        return
    try:
        _commit(ctx, batch, blobs)
        return
    except TransientError:
        raise  # nothing committed; the whole batch is tried again later
    except Exception as exc:
        reason = getattr(exc, "orig", exc)
        log.info("submit batch of %d retried one by one: %s", len(batch), reason)
    for p in batch:
        try:
            _commit_one(ctx, p, blobs)
        except Exception as exc:
            p.result, p.after = exc, AfterCommit()


def _commit_one(ctx: OrchestratorContext, p: _Pending, blobs: PendingPuts) -> None:
    """One request in its own transaction. An IntegrityError means a concurrent submitter
    committed the same key (its job is the result) or the same image first (that images
    row exists now: one more try)."""
    for attempt in (1, 2):
        try:
            _commit(ctx, [p], blobs)
            return
        except IntegrityError:
            key = p.request.idempotency_key
            found = _jobs_by_key(ctx, {key}).get(key) if key else None
            if found is not None:
                p.result = SubmitResult(found[0], found[1], created=False)
                p.after = AfterCommit()
                return
            if attempt == 2:
                raise


def _commit(ctx: OrchestratorContext, batch: list[_Pending], blobs: PendingPuts) -> None:
    """Images rows, jobs, stage rows, the DAG step and the outbox rows of the answers of
    ``batch`` in one transaction, committed once ``blobs`` are durable (they are written
    meanwhile); each request's result and what to send for it after the commit."""
    now = utcnow()
    jobs = [_new_job(p, now) for p in batch]
    dispatches: list[list[Dispatch]] = [[] for _ in batch]
    finals: list[dict[str, Any] | None] = [None for _ in batch]
    if is_sqlite(ctx.database_url):
        blobs.wait()  # SQLite has one writer at a time: do not hold its lock for the disk
    with session_scope(ctx.database_url) as session, session.no_autoflush:
        store_image_rows(session, [p.image for p in batch if p.image is not None])
        session.add_all(jobs)
        wanted = {(p.sha, p.p_hash) for p in batch if p.image is not None and not p.request.force}
        sources = cache_sources(session, wanted)
        planned: list[tuple[int, list[StageRun]]] = []
        for i, (p, job) in enumerate(zip(batch, jobs, strict=True)):
            if p.image is None:
                continue
            source = None if p.request.force else sources.get((p.sha, p.p_hash))
            if source is not None:
                finals[i] = completed_payload(job, copy_cached(session, job, source))
            else:
                planned.append((i, plan_stages(job, p.resolved, ctx, p.request.priority)))
        # Ids first: the step names dispatched rows by id, and the rows of the whole batch
        # are then inserted by one executemany (no RETURNING, no UPDATE after the INSERT).
        new_rows = [row for _, rows in planned for row in rows]
        ids = reserve_stage_run_ids(session, len(new_rows))
        for row, row_id in zip(new_rows, ids, strict=True):
            row.id = row_id
        for i, rows in planned:
            outcome = step(jobs[i], rows, now, ctx.settings.dispatch_timeout_s)
            dispatches[i], finals[i] = outcome.dispatches, outcome.completed
        session.add_all(new_rows)
        session.flush()
        _answers(ctx, batch, jobs, dispatches, finals)
        answers = AfterCommit()
        for p in batch:
            answers.extend(p.after)
        write_outbox(session, answers, fan_out=False)  # new jobs: no subscribers yet
        for p in batch:
            p.after.outboxed = answers.outboxed
        blobs.wait()  # no row may commit before the blobs it names are on disk


def _answers(
    ctx: OrchestratorContext,
    batch: list[_Pending],
    jobs: list[Job],
    dispatches: list[list[Dispatch]],
    finals: list[dict[str, Any] | None],
) -> None:
    """Each request's result and what to send for it after the commit: its stage
    messages and its answers (accepted or rejected, completed for a cache hit), which
    also go to the request's reply_to."""
    webhook = bool(ctx.settings.webhook_url)
    for p, job, sends, final in zip(batch, jobs, dispatches, finals, strict=True):
        p.after = AfterCommit(dispatches=sends)
        if p.rejection is not None:
            p.after.event(
                EventType.REJECTED,
                job.id,
                idempotency_key=job.idempotency_key,
                reply_to=job.reply_to,
                reason=p.rejection.code,
                error=str(p.rejection),
            )
            p.result = SubmitResult(job.id, job.status, created=True, reason=str(p.rejection))
            continue
        p.after.event(
            EventType.ACCEPTED,
            job.id,
            idempotency_key=job.idempotency_key,
            reply_to=job.reply_to,
            pipeline=p.pipeline,
            image_sha256=p.sha,
        )
        if final is not None:  # a cache hit: completed at once
            p.after.completed(job.id, final, job.idempotency_key, job.reply_to, webhook=webhook)
        cache_hit = job.cache_hit_of is not None
        p.result = SubmitResult(job.id, job.status, created=True, cache_hit=cache_hit)


def _new_job(p: _Pending, now: datetime) -> Job:
    request = p.request
    job = Job(
        id=new_uuid(),
        created_at=now,
        input_sha256=p.sha,
        pipeline=p.pipeline,
        pipeline_hash=p.p_hash,
        pipeline_spec=p.resolved,
        status=JobStatus.QUEUED,
        priority=str(request.priority),
        source=request.source,
        idempotency_key=request.idempotency_key,
        metadata_json=dict(request.metadata or {}),
        overrides={k: dict(v) for k, v in (request.overrides or {}).items()},
        reply_to=request.reply_to,
        # Every job of a batch sets the same columns: one executemany inserts them all.
        image_sha256=None if p.rejection is not None else p.sha,
        error=None,
        started_at=None,
        finished_at=None,
    )
    if p.rejection is not None:
        job.status = JobStatus.REJECTED
        job.error = str(p.rejection)
        job.reasons = [p.rejection.code]
        job.finished_at = now
    return job


def _deliver(ctx: OrchestratorContext, after: AfterCommit) -> None:
    """Send a committed batch's stage messages through one producer, then its events."""
    if not after.dispatches:
        deliver(ctx, ctx.events, after, ctx.acks)
        return
    with ctx.celery.producer_or_acquire() as producer:
        deliver(ctx.with_producer(producer), ctx.events, after, ctx.acks)
