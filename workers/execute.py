"""Running stage runs: claim, load, compute, persist + step — for one message or a batch.

This is the shared base of every stage worker (DESIGN.md "worker" flow): the batching
consumers (workers/batching.py) call ``run_batch`` with up to ``batch_size`` stage
messages. A batch costs two transactions: one claims every row, one records every
result *and* runs the DAG step for each touched job
(workers/persist.py), after which the next stages' messages and the events go out
(imgpipe/aftercommit.py). Ready stages on the worker's own queues may be claimed in that
persist transaction and run next (``continuations``), without a message. The compute
phase, one forward pass per stage kind, is workers/compute.py.

Every step is written for at-least-once delivery: a duplicate message for a finished row
is a no-op, results are updates of the (job, stage) row, detections are replaced, blobs
are content-addressed. One bad image fails only its own stage run.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from db.blobs import BlobStore, blob_store_for
from db.dag import advance_in_session, mark_dispatched
from db.engine import session_scope
from db.models import utcnow
from db.outbox import DeferredAcks, delete_rows
from db.repo import lock_stage_runs, record_model
from imgpipe.aftercommit import AfterCommit, deliver
from imgpipe.celery_app import create_app
from imgpipe.contracts import StageStatus
from imgpipe.decode import DecodeLimits
from imgpipe.errors import PermanentError, TransientError
from imgpipe.events import EventPublisher
from imgpipe.logs import bound_stages
from imgpipe.metrics import record_stage
from imgpipe.retry import outage_retry_policy
from imgpipe.settings import Settings
from imgpipe.stagekinds import STAGE_KINDS
from workers.claims import (
    Claim,
    ClaimRequest,
    NoInput,
    Outcome,
    WorkerIdentity,
    claim_rows,
)
from workers.compute import BatchCompute, Work, stage_ref
from workers.outage import OnceSender, OutageWait, resend_uncertain
from workers.persist import Failure, Finished, LocalContinuation, persist_finished
from workers.pixels import PixelCache, encode_working_copy
from workers.stagecontract import BatchRunner, StageOutput
from workers.timelimits import ComputeClock
from workers.version import code_version

__all__ = ["Claim", "ClaimRequest", "Outcome", "StageExecutor"]

log = logging.getLogger(__name__)

LOAD_THREADS = 4
"""Threads that load a batch's pixels (blob reads and decodes release the GIL)."""


class StageExecutor:
    def __init__(self, settings: Settings, device: str = "cpu") -> None:
        self.settings = settings
        self.device = device
        self.identity = WorkerIdentity(
            host=socket.gethostname(),
            pid=os.getpid(),
            device=device,
            code_version=settings.code_version or code_version(),
            dispatch_grace_s=settings.dispatch_grace_s,
        )
        self._blobs: BlobStore | None = None
        self._pixels: PixelCache | None = None
        self._loader: ThreadPoolExecutor | None = None
        self.events = EventPublisher(settings.effective_redis_url, settings.events_maxlen)
        self.acks = DeferredAcks(settings.effective_database_url)
        """Outbox rows this worker delivered; its next persist transaction removes them."""
        self._app: Any = None
        self.local: LocalContinuation | None = None
        """Set by a consumer: ready stages on its own queues are claimed in the persist
        transaction and run here next, without a message (workers/persist.py)."""
        self.continuations: list[Claim] = []
        self._recorded_models: set[tuple[str, str, str]] = set()
        self.compute_clock = ComputeClock()
        """The hard time limit of the forward pass in progress (the consumer's watchdog)."""
        self._batch_compute = BatchCompute(device, self.compute_clock)
        """The stage kinds' batch functions and the forward passes (workers/compute.py)."""
        self.outage = OutageWait(outage_retry_policy(settings))
        """How claims, persists and sends wait out a database or broker outage; a consumer
        gives it its stop event and watchdog (workers/batching.py)."""

    @property
    def db_url(self) -> str:
        return self.settings.effective_database_url

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            self._blobs = blob_store_for(self.settings)
        return self._blobs

    @property
    def pixels(self) -> PixelCache:
        if self._pixels is None:
            self._pixels = PixelCache(
                self.blobs,
                self.settings.working_copy_cache_mb * 1024 * 1024,
                DecodeLimits.from_settings(self.settings),
            )
        return self._pixels

    @property
    def app(self) -> Any:
        """The Celery app used to send the next stages' messages."""
        if self._app is None:
            self._app = create_app(self.settings)
        return self._app

    def use_app(self, app: Any) -> None:
        self._app = app

    def continue_locally(self, queues: Sequence[str], limit: int) -> None:
        """Run ready interactive stages on ``queues`` in this process (see ``local``)."""
        self.local = LocalContinuation(frozenset(queues), self.identity, limit)

    def runner(self, kind: str) -> BatchRunner:
        return self._batch_compute.runner(kind)

    def record_model(self, info: Mapping[str, str]) -> None:
        """Write the ``models`` row the first time this process uses a model."""
        key = (info["name"], info["version"], info["weights_sha256"])
        if key in self._recorded_models:
            return
        try:
            with session_scope(self.db_url) as session:
                record_model(
                    session,
                    name=info["name"],
                    version=info["version"],
                    weights_sha256=info["weights_sha256"],
                    source=info["source"],
                    license=info["license"],
                )
        except TransientError as exc:
            # Bookkeeping only (each stage row names its model itself): never fail a
            # stage for it; the row is written at the model's next use.
            log.warning("models row for %s not written yet: %s", info["name"], exc)
            return
        self._recorded_models.add(key)

    # -- the whole path -------------------------------------------------------------------
    def run_batch(self, requests: Sequence[ClaimRequest]) -> list[Outcome]:
        """Claim, load, compute and persist ``requests``; one outcome per request.

        A database or broker outage is waited out here (``outage``: bounded backoff with
        jitter), holding the batch: TransientError escapes only when the worker is asked to
        stop meanwhile. Stages this worker claimed for itself while persisting
        (``continue_locally``) wait in ``continuations`` for ``run_continuations``."""
        started = time.perf_counter()

        def claim() -> list[Claim | Outcome | NoInput]:
            with session_scope(self.db_url) as session:
                return claim_rows(session, requests, utcnow(), self.identity)

        claimed = self.outage.call(f"claiming {len(requests)} stage run(s)", claim)
        outcomes: dict[int, Outcome] = {}
        claims: list[Claim] = []
        failed: list[Finished] = []
        dead_jobs: set[str] = set()
        for index, item in enumerate(claimed):
            if isinstance(item, Outcome):
                outcomes[index] = item
                if item.status == "dead" and item.job_id:
                    dead_jobs.add(item.job_id)
            elif isinstance(item, NoInput):
                failure = Failure(item.error, permanent=True)
                failed.append(
                    Finished(item.claim_row_id, item.job_id, item.stage, item.attempt,
                             item.idempotency_key, failure, started_perf_s=started)
                )  # fmt: skip
            else:
                claims.append(item)
        by_id = self._run_claims(claims, failed, started, dead_jobs)
        for index, item in enumerate(claimed):
            if index not in outcomes:
                row_id = item.claim_row_id if isinstance(item, NoInput) else item.stage_run_id  # type: ignore[union-attr]
                outcomes[index] = by_id[row_id]
        return [outcomes[i] for i in range(len(claimed))]

    def run_continuations(self) -> list[tuple[Claim, Outcome]]:
        """Run the stages claimed locally by the last persist (and theirs, in turn, up to
        the same batch size); returns each with its outcome."""
        claims, self.continuations = self.continuations, []
        if not claims:
            return []
        by_id = self._run_claims(claims, [], time.perf_counter(), set())
        return [(c, by_id[c.stage_run_id]) for c in claims]

    def release_continuations(self) -> None:
        """Hand stages claimed locally but not run back to their queues (a stopping worker):
        each row goes back to ``dispatched`` with its attempt returned, and its message is
        sent after the commit."""
        claims, self.continuations = self.continuations, []
        if not claims:
            return
        after = AfterCommit()
        now = utcnow()
        with session_scope(self.db_url) as session:
            for row in lock_stage_runs(session, [c.stage_run_id for c in claims]):
                if row.status != StageStatus.RUNNING or row.worker_pid != self.identity.pid:
                    continue
                row.attempts -= 1
                after.dispatches.append(mark_dispatched(row, now, self.settings.dispatch_timeout_s))
        deliver(self.app, self.events, after, self.acks)

    def _run_claims(
        self, claims: list[Claim], finished: list[Finished], started: float, dead_jobs: set[str]
    ) -> dict[int, Outcome]:
        # every log line while these stages are handled names them (imgpipe/logs.py)
        with bound_stages([stage_ref(c) for c in claims]):
            return self._run_bound(claims, finished, started, dead_jobs)

    def _run_bound(
        self, claims: list[Claim], finished: list[Finished], started: float, dead_jobs: set[str]
    ) -> dict[int, Outcome]:
        work = [Work(c) for c in claims]
        self._load(work)
        self._batch_compute.compute(work)
        finished = [*finished, *(self._finish(w, started) for w in work)]
        by_id: dict[int, Outcome] = {}
        after = AfterCommit()
        if finished:
            results, after, local = self._persist(finished)
            self.continuations.extend(local)
            by_id = {f.stage_run_id: r for f, r in zip(finished, results, strict=True)}
            self._record_metrics(work, by_id)
        if dead_jobs:
            after.extend(self.outage.call("advancing jobs", lambda: self._advance(dead_jobs)))
        sender = OnceSender(self.app)
        self.outage.call(
            "sending the next stages' messages",
            lambda: deliver(sender, self.events, after, self.acks),
        )
        return by_id

    def _record_metrics(self, work: Sequence[Work], by_id: Mapping[int, Outcome]) -> None:
        """Prometheus: each run's outcome and phase durations (imgpipe/metrics.py)."""
        for w in work:
            outcome = by_id.get(w.claim.stage_run_id)
            model = w.result.model if isinstance(w.result, StageOutput) else None
            computed = w.pixels is not None and not isinstance(w.result, Failure)
            record_stage(
                w.claim.stage, self.device,
                (model or {}).get("name", "none"),
                outcome.status if outcome is not None else "unknown",
                queue_wait_ms=w.claim.queue_wait_ms,
                load_ms=w.load_ms if w.pixels is not None else None,
                compute_ms=w.compute_ms if computed else None,
            )  # fmt: skip
        if self.device.startswith("cuda"):
            from workers.devices import record_gpu_memory

            record_gpu_memory(self.device)

    def _persist(self, finished: list[Finished]) -> tuple[list[Outcome], AfterCommit, list[Claim]]:
        """``persist_finished`` in one transaction, tried again through an outage. A try
        after a failed one also re-sends what an unacknowledged commit may have decided
        (``resend_uncertain``): the results are written once (the claim's attempt is the
        token), the messages at least once."""
        tries = 0
        delivered = self.acks.take()  # removed in this transaction: no extra one

        def persist() -> tuple[list[Outcome], AfterCommit, list[Claim]]:
            nonlocal tries
            tries += 1
            now = utcnow()
            with session_scope(self.db_url) as session:
                delete_rows(session, delivered)
                results, after, local = persist_finished(
                    session, finished, now, self.settings, self.local
                )
                if tries > 1:
                    skip = {d.stage_run_id for d in after.dispatches}
                    skip |= {c.stage_run_id for c in [*local, *self.continuations]}
                    after.extend(
                        resend_uncertain(
                            session, {f.job_id for f in finished}, self.identity, skip, now,
                            self.settings.dispatch_timeout_s,
                        )
                    )  # fmt: skip
            return results, after, local

        try:
            return self.outage.call(f"recording {len(finished)} stage result(s)", persist)
        except BaseException:
            self.acks.delivered(delivered)  # not removed: the next transaction will
            raise

    def _advance(self, job_ids: set[str]) -> AfterCommit:
        """Step jobs whose stage went dead at claim time (rare: attempts exhausted)."""
        after = AfterCommit()
        webhook = bool(self.settings.webhook_url)
        with session_scope(self.db_url) as session:
            for job_id in sorted(job_ids):
                after.extend(
                    advance_in_session(
                        session, job_id, utcnow(), self.settings.dispatch_timeout_s,
                        webhook=webhook,
                    )
                )  # fmt: skip
        return after

    # -- load -----------------------------------------------------------------------------
    def _load_one(self, w: Work) -> None:
        t0 = time.perf_counter()
        try:
            side_px = STAGE_KINDS[w.claim.kind].input_side_px(w.claim.params)
            w.pixels = self.pixels.get(w.claim.image_key, side_px)
        except PermanentError as exc:
            w.result = Failure(str(exc), permanent=True)
        except (TransientError, OSError) as exc:
            w.result = Failure(f"could not load the stage's input image: {exc}", permanent=False)
        w.load_ms = (time.perf_counter() - t0) * 1000

    def _load(self, work: Sequence[Work]) -> None:
        if len(work) <= 1:
            for w in work:
                self._load_one(w)
            return
        if self._loader is None:
            self._loader = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="imgpipe-load")
        list(self._loader.map(self._load_one, work))

    # -- prepare the record ---------------------------------------------------------------
    def _finish(self, w: Work, started: float) -> Finished:
        claim, result = w.claim, w.result
        assert result is not None
        output: dict[str, Any] | None = None
        blob_key: str | None = None
        if isinstance(result, StageOutput):
            try:
                output, blob_key = self._store_outputs(claim, result)
            except (TransientError, OSError) as exc:
                result = Failure(f"could not store the stage's output: {exc}", permanent=False)
        return Finished(
            stage_run_id=claim.stage_run_id,
            job_id=claim.job_id,
            stage=claim.stage,
            attempt=claim.attempt,
            idempotency_key=claim.idempotency_key,
            result=result,
            output=output,
            blob_key=blob_key,
            load_ms=w.load_ms,
            compute_ms=w.compute_ms,
            started_perf_s=started,
            batch_size=w.batch_size,
        )

    def _store_outputs(
        self, claim: Claim, result: StageOutput
    ) -> tuple[dict[str, Any], str | None]:
        output = dict(result.output)
        blob_key: str | None = None
        if result.passthrough:
            output["working_blob_key"] = claim.image_key
            output["unchanged"] = True
        elif result.image is not None:
            # one blob: the viewable artifact is also what downstream stages read
            data, media_type = encode_working_copy(result.image)
            blob_key = self.blobs.put(data, media_type)
            output["working_blob_key"] = blob_key
        elif result.blob is not None:
            blob_key = self.blobs.put(
                result.blob, result.blob_media_type or "application/octet-stream"
            )
        if result.model is not None:
            self.record_model(result.model)
        return output, blob_key
