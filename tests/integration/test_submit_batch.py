"""``submit_many``: a batch of submissions in one transaction, against the running stack
(real Redis, real database, real worker processes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.blobs import LocalBlobStore, PendingPuts
from db.engine import session_scope
from db.models import Job
from imgpipe.contracts import EVENTS_STREAM, JobStatus
from imgpipe.errors import PermanentError
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, SubmitResult, submit, submit_many
from tests.support.images import noise_png
from tests.support.jobs import wait_jobs

pytestmark = pytest.mark.timeout(120)


def jobs_with_key(ctx: OrchestratorContext, key: str) -> int:
    with session_scope(ctx.database_url) as session:
        return int(session.scalar(select(func.count()).where(Job.idempotency_key == key)) or 0)


def test_one_batch_gives_each_request_its_own_outcome(ctx: OrchestratorContext) -> None:
    """A repeated key is one job, a corrupt image is a rejected job with its own event, a
    bad request is an error in its place, and the rest commit and run."""
    requests = [
        SubmitRequest(data=noise_png(1), pipeline="basic", idempotency_key="mb-1"),
        SubmitRequest(data=noise_png(2), pipeline="basic", idempotency_key="mb-1"),
        SubmitRequest(data=noise_png(3)[:120], pipeline="basic", idempotency_key="mb-bad"),
        SubmitRequest(data=noise_png(4), pipeline="nope", idempotency_key="mb-nope"),
        SubmitRequest(data=noise_png(5), pipeline="basic", reply_to="imgpipe:reply:mb"),
    ]
    first, repeat, corrupt, unknown, anonymous = submit_many(ctx, requests)
    assert isinstance(first, SubmitResult) and first.created
    assert isinstance(repeat, SubmitResult) and not repeat.created
    assert repeat.job_id == first.job_id
    assert isinstance(corrupt, SubmitResult) and corrupt.status == JobStatus.REJECTED
    assert isinstance(unknown, PermanentError) and "unknown pipeline" in str(unknown)
    assert isinstance(anonymous, SubmitResult) and anonymous.created
    assert jobs_with_key(ctx, "mb-1") == 1 and jobs_with_key(ctx, "mb-nope") == 0
    statuses = wait_jobs(ctx.database_url, [first.job_id, anonymous.job_id], 60)
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}
    events = ctx.events.client.xrange(EVENTS_STREAM)
    rejected = [f for _id, f in events if f[b"job_id"] == f'"{corrupt.job_id}"'.encode()]
    assert [f[b"event"] for f in rejected] == [b'"rejected"'], "its own rejection only"
    assert not any(f[b"event"] == b'"rejected"' and f[b"job_id"] == f'"{first.job_id}"'.encode()
                   for _id, f in events)  # fmt: skip


class RacingBlobStore(LocalBlobStore):
    """The real blob store, with another submitter committing ``key`` while the batch
    writes its blobs (after the batch looked its keys up, before its transaction)."""

    def __init__(self, root: Path, rival: OrchestratorContext, key: str) -> None:
        super().__init__(root)
        self.rival, self.key, self.raced = rival, key, False

    def start_put_many(self, items: Sequence[tuple[bytes, str]]) -> PendingPuts:
        pending = super().start_put_many(items)
        if not self.raced:
            self.raced = True
            submit(self.rival, SubmitRequest(noise_png(99), "basic", idempotency_key=self.key))
        return pending


def test_a_key_committed_by_a_racing_submitter_stays_one_job(ctx: OrchestratorContext) -> None:
    racing = OrchestratorContext(ctx.settings)
    blob_root = Path(ctx.settings.effective_blob_url.removeprefix("file://"))
    racing._blobs = RacingBlobStore(blob_root, OrchestratorContext(ctx.settings), "race-1")
    requests = [
        SubmitRequest(data=noise_png(10), pipeline="basic", idempotency_key="race-1"),
        SubmitRequest(data=noise_png(11), pipeline="basic", idempotency_key="race-2"),
    ]
    lost, won = submit_many(racing, requests)
    assert isinstance(lost, SubmitResult) and not lost.created, "the rival's job"
    assert isinstance(won, SubmitResult) and won.created, "the rest of the batch commits"
    assert jobs_with_key(ctx, "race-1") == 1 and jobs_with_key(ctx, "race-2") == 1
    with session_scope(ctx.database_url) as session:
        rival = session.scalars(select(Job).where(Job.idempotency_key == "race-1")).one()
        assert rival.id == lost.job_id
    statuses = wait_jobs(ctx.database_url, [lost.job_id, won.job_id], 60)
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}


def test_same_image_twice_in_a_batch_is_one_images_row_and_two_jobs(
    ctx: OrchestratorContext,
) -> None:
    data = noise_png(20)
    results = submit_many(ctx, [SubmitRequest(data=data, pipeline="basic", force=True)] * 2)
    assert all(isinstance(r, SubmitResult) and r.created for r in results)
    ids = [r.job_id for r in results if isinstance(r, SubmitResult)]
    assert len(set(ids)) == 2
    assert set(wait_jobs(ctx.database_url, ids, 60).values()) == {JobStatus.SUCCEEDED}
