"""Backfill: re-submit stored images through a pipeline (``imgpipe reprocess``).

Every selected image (``images`` table, bytes from the blob store by ``blob_key``) becomes a
*new* job at ``bulk`` priority with ``force=True``; old jobs and results are kept. A run
has an id; each image's job gets the idempotency key ``reprocess:<run id>:<sha256>``, so a
run interrupted at any point and started again with the same ``--run-id`` submits only
what it had not submitted. A cursor file in ``<data dir>/reprocess/<run id>.json`` (the
last sha256 handled and the run's options) lets the rerun skip ahead instead of asking
the database about every image again.

Selection (images in sha256 order, optionally ``first_seen >= --since``):
- ``--where model-version-differs``: the image's latest job for the pipeline has another
  ``pipeline_hash`` than the current resolved pipeline (params, stage versions, and each
  stage's model version and weights identity: imgpipe/modelcatalog.py);
- ``--stage S``: the image's latest job for the pipeline has no succeeded stage ``S`` or
  ran ``S`` with other settings (kind, params, inputs) than the pipeline has now.
Both given: both must hold.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from db.engine import session_scope
from db.models import Image, Job, StageRun
from imgpipe.contracts import Priority, StageStatus
from imgpipe.errors import PermanentError, TransientError
from orchestrator.context import OrchestratorContext
from orchestrator.pipelines import load_pipeline, pipeline_hash
from orchestrator.submit import SubmitRequest, resolve_spec, submit

__all__ = ["WHERE_CHOICES", "Backfill", "BackfillError", "BackfillOptions", "BackfillReport"]

WHERE_MODEL_VERSION_DIFFERS = "model-version-differs"
WHERE_CHOICES = (WHERE_MODEL_VERSION_DIFFERS,)
SCAN_BATCH = 500
CURSOR_EVERY = 25
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class BackfillError(PermanentError):
    """Bad reprocess options or a resumed run whose options changed."""


@dataclass(frozen=True)
class BackfillOptions:
    pipeline: str
    stage: str | None = None
    since: datetime | None = None
    where: str | None = None
    run_id: str | None = None
    limit: int | None = None


@dataclass
class BackfillReport:
    run_id: str
    pipeline_hash: str
    total: int = 0
    submitted: int = 0
    skipped: int = 0
    """Already submitted by an earlier try of the same run."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(image sha256, error): bytes missing from the blob store, database errors."""
    job_ids: list[str] = field(default_factory=list)

    @property
    def handled(self) -> int:
        return self.submitted + self.skipped + len(self.failed)


@dataclass
class _Cursor:
    run_id: str
    pipeline: str
    pipeline_hash: str
    stage: str | None
    since: str | None
    where: str | None
    last_sha256: str = ""
    submitted: int = 0
    skipped: int = 0
    finished: bool = False


class Backfill:
    def __init__(self, ctx: OrchestratorContext, options: BackfillOptions) -> None:
        self.ctx = ctx
        self.options = options
        since = options.since
        self.since = since.replace(tzinfo=UTC) if since and since.tzinfo is None else since
        if options.where is not None and options.where not in WHERE_CHOICES:
            raise BackfillError(
                f"--where {options.where!r} is not supported; choose {', '.join(WHERE_CHOICES)}"
            )
        spec = load_pipeline(options.pipeline, ctx.settings.pipelines_dir)
        spec.require_installed()
        self.pipeline = spec.name
        self.resolved = resolve_spec(ctx, spec, None)
        self.pipeline_hash = pipeline_hash(self.resolved)
        if options.stage is not None and options.stage not in self.resolved["stages"]:
            raise BackfillError(
                f"--stage {options.stage!r}: pipeline {spec.name!r} has stages "
                f"{', '.join(self.resolved['stages'])}"
            )
        run_id = options.run_id or f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        if not _RUN_ID.match(run_id):
            raise BackfillError(
                f"--run-id {run_id!r}: use 1 to 64 letters, digits, '.', '_' or '-'"
            )
        self.run_id = run_id
        self.cursor_path = ctx.settings.resolved_data_dir / "reprocess" / f"{run_id}.json"
        self.cursor = self._load_cursor()

    # -- cursor ---------------------------------------------------------------------------
    def _fresh_cursor(self) -> _Cursor:
        since = self.since.isoformat() if self.since else None
        return _Cursor(
            self.run_id, self.pipeline, self.pipeline_hash, self.options.stage, since,
            self.options.where,
        )  # fmt: skip

    def _load_cursor(self) -> _Cursor:
        fresh = self._fresh_cursor()
        try:
            stored = _Cursor(**json.loads(self.cursor_path.read_text()))
        except FileNotFoundError:
            return fresh
        except (ValueError, TypeError) as exc:
            raise BackfillError(
                f"cursor file {self.cursor_path} is unreadable ({exc}); delete it to restart "
                "the run (already submitted images are still skipped by their keys)"
            ) from exc
        mine = (fresh.pipeline, fresh.pipeline_hash, fresh.stage, fresh.since, fresh.where)
        theirs = (stored.pipeline, stored.pipeline_hash, stored.stage, stored.since, stored.where)
        if mine != theirs:
            raise BackfillError(
                f"run {self.run_id} was started with other options or an older pipeline "
                f"({stored.pipeline} {stored.pipeline_hash[:12]}, stage={stored.stage}, "
                f"since={stored.since}, where={stored.where}); resume it with the same "
                "options, or start a new run with another --run-id"
            )
        return stored

    def _save_cursor(self) -> None:
        self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cursor_path.parent, prefix=".cursor-")
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self.cursor), fh)
        os.replace(tmp, self.cursor_path)

    # -- selection ------------------------------------------------------------------------
    def _images_after(self, after: str, batch: int) -> list[tuple[str, str]]:
        stmt = select(Image.sha256, Image.blob_key).where(Image.sha256 > after)
        if self.since is not None:
            stmt = stmt.where(Image.first_seen >= self.since)
        with session_scope(self.ctx.database_url) as session:
            rows = session.execute(stmt.order_by(Image.sha256).limit(batch)).all()
        return [(sha, key) for sha, key in rows]

    def _wanted(self, shas: Sequence[str]) -> set[str]:
        """Of ``shas``, those the --where / --stage filters select."""
        if self.options.where is None and self.options.stage is None:
            return set(shas)
        with session_scope(self.ctx.database_url) as session:
            jobs = session.execute(
                select(Job.id, Job.image_sha256, Job.pipeline_hash, Job.created_at).where(
                    Job.pipeline == self.pipeline, Job.image_sha256.in_(list(shas))
                )
            ).all()
            latest: dict[str, Any] = {}
            for job in jobs:
                best = latest.get(job.image_sha256)
                if best is None or (job.created_at, job.id) > (best.created_at, best.id):
                    latest[job.image_sha256] = job
            stage_ok: set[str] = set()
            if self.options.stage is not None and latest:
                stage_ok = self._stage_current(session, [j.id for j in latest.values()])
        wanted = set()
        for sha in shas:
            last = latest.get(sha)
            if self.options.where == WHERE_MODEL_VERSION_DIFFERS and (
                last is None or last.pipeline_hash == self.pipeline_hash
            ):
                continue
            if self.options.stage is not None and last is not None and last.id in stage_ok:
                continue
            wanted.add(sha)
        return wanted

    def _stage_current(self, session: Any, job_ids: list[str]) -> set[str]:
        """Jobs whose stage --stage succeeded with the settings the pipeline has now."""
        stage = self.options.stage
        current = self.resolved["stages"][stage]
        rows = session.execute(
            select(Job.id, Job.pipeline_spec)
            .join(StageRun, StageRun.job_id == Job.id)
            .where(
                Job.id.in_(job_ids),
                StageRun.stage == stage,
                StageRun.status == StageStatus.SUCCEEDED,
            )
        ).all()
        return {
            job_id for job_id, spec in rows if (spec or {}).get("stages", {}).get(stage) == current
        }

    def candidates(self, after: str = "") -> Iterator[tuple[str, str]]:
        """(sha256, blob key) of every selected image after ``after``, in sha256 order."""
        while True:
            batch = self._images_after(after, SCAN_BATCH)
            if not batch:
                return
            wanted = self._wanted([sha for sha, _ in batch])
            yield from ((sha, key) for sha, key in batch if sha in wanted)
            after = batch[-1][0]

    def count(self) -> int:
        return sum(1 for _ in self.candidates(self.cursor.last_sha256))

    # -- running --------------------------------------------------------------------------
    def run(self, on_progress: Callable[[BackfillReport], None] | None = None) -> BackfillReport:
        """Submit every remaining selected image; the cursor survives an interruption."""
        report = BackfillReport(self.run_id, self.pipeline_hash)
        report.submitted, report.skipped = self.cursor.submitted, self.cursor.skipped
        remaining = self.count()
        if self.options.limit is not None:
            remaining = min(remaining, self.options.limit)
        report.total = report.handled + remaining
        if on_progress:
            on_progress(report)
        done_now = 0
        try:
            for sha, blob_key in self.candidates(self.cursor.last_sha256):
                if self.options.limit is not None and done_now >= self.options.limit:
                    break
                self._submit_one(sha, blob_key, report)
                done_now += 1
                self.cursor.last_sha256 = sha
                self.cursor.submitted, self.cursor.skipped = report.submitted, report.skipped
                if done_now % CURSOR_EVERY == 0:
                    self._save_cursor()
                if on_progress:
                    on_progress(report)
            else:
                self.cursor.finished = True
        finally:
            self._save_cursor()
        return report

    def _submit_one(self, sha: str, blob_key: str, report: BackfillReport) -> None:
        try:
            data = self.ctx.blobs.get(blob_key)
            result = submit(
                self.ctx,
                SubmitRequest(
                    data=data,
                    pipeline=self.pipeline,
                    priority=Priority.BULK,
                    idempotency_key=f"reprocess:{self.run_id}:{sha}",
                    source="reprocess",
                    metadata={"reprocess_run": self.run_id},
                    force=True,
                ),
            )
        except TransientError as exc:
            report.failed.append((sha, str(exc)))
            return
        if result.created:
            report.submitted += 1
            report.job_ids.append(result.job_id)
        else:
            report.skipped += 1
