"""The review queue and backfills, through real workers, Redis and the database."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from db.engine import session_scope
from db.models import Job, Review, StageRun
from imgpipe.contracts import EVENTS_STREAM, StageStatus
from imgpipe.face.cli import app
from imgpipe.face.stack import child_env
from orchestrator.backfill import Backfill, BackfillError, BackfillOptions
from orchestrator.context import OrchestratorContext
from orchestrator.reports import job_statuses
from orchestrator.review import ReviewError, decide, pending_reviews
from orchestrator.submit import SubmitRequest, submit
from tests.support.images import noise_png
from tests.support.jobs import wait_jobs

pytestmark = pytest.mark.timeout(150)

REVIEW_PIPELINE = """
name = "{name}"
description = "Every image goes to a person."

[stages.quality]

[policy]
vocabulary = "{vocabulary}"

[[policy.rules]]
stage = "quality"
field = "score"
op = ">="
value = 0
verdict = "review"
"""


def fresh_images(count: int) -> list[bytes]:
    """Never seen before by this database (random seeds), so first_seen is now."""
    base = uuid.uuid4().int % 10**9
    return [noise_png(base + i, side_px=64) for i in range(count)]


def run_cli(ctx: OrchestratorContext, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=child_env(ctx.settings))
    return result.exit_code, result.output


@pytest.fixture
def review_pipelines(tmp_path: Path) -> Iterator[dict[str, str]]:
    suffix = uuid.uuid4().hex[:8]
    paths = {}
    for vocabulary in ("moderation", "qc"):
        name = f"review-{vocabulary}-{suffix}"
        path = tmp_path / f"{name}.toml"
        path.write_text(REVIEW_PIPELINE.format(name=name, vocabulary=vocabulary))
        paths[vocabulary] = str(path)
    yield paths


def reviewed_jobs(
    ctx: OrchestratorContext, pipeline: str, count: int, reply_to: str | None = None
) -> list[str]:
    ids = [
        submit(ctx, SubmitRequest(data=data, pipeline=pipeline, reply_to=reply_to)).job_id
        for data in fresh_images(count)
    ]
    wait_jobs(ctx.database_url, ids, 60)
    return ids


def test_review_list_and_decide_make_the_reviewer_verdict_final(
    ctx: OrchestratorContext, review_pipelines: dict[str, str]
) -> None:
    path = review_pipelines["moderation"]
    name = Path(path).stem
    first, second = reviewed_jobs(ctx, path, 2, reply_to="imgpipe:reply:reviews")
    code, out = run_cli(ctx, "review", "list", "--pipeline", name, "--json")
    assert code == 0, out
    listed = json.loads(out[out.index("[") :])
    assert {item["job_id"] for item in listed} == {first, second}
    assert listed[0]["finished_at"] <= listed[1]["finished_at"], "oldest first"
    assert listed[0]["choices"] == ["allow", "block"]

    code, out = run_cli(
        ctx, "review", "decide", first, "block", "--reviewer", "alice", "--note", "nsfw"
    )
    assert code == 0, out
    assert f"{first} review -> block by alice" in out
    with session_scope(ctx.database_url) as session:
        job = session.get(Job, first)
        assert job is not None and job.verdict == "block"
        assert job.reasons[-1] == "reviewed by alice: block"
        (review,) = session.execute(select(Review).where(Review.job_id == first)).scalars()
        assert (review.decision, review.reviewer, review.note) == ("block", "alice", "nsfw")
        assert datetime.now(UTC) - review.at < timedelta(minutes=1)
        assert [i.job_id for i in pending_reviews(session, pipeline=name)] == [second]
    client = ctx.events.client
    for stream in (EVENTS_STREAM, "imgpipe:reply:reviews"):
        entries: Any = client.xrange(stream)
        events = [{k.decode(): json.loads(v) for k, v in f.items()} for _id, f in entries]
        (reviewed,) = [e for e in events if e["event"] == "reviewed" and e["job_id"] == first]
        assert reviewed["verdict"] == "block" and reviewed["previous_verdict"] == "review"
        assert reviewed["reviewer"] == "alice" and reviewed["note"] == "nsfw"

    corrected = decide(ctx, first, "allow", reviewer="bob")
    assert corrected.previous_verdict == "block"
    with session_scope(ctx.database_url) as session:
        decisions = session.execute(
            select(Review.decision).where(Review.job_id == first).order_by(Review.id)
        ).scalars()
        assert list(decisions) == ["block", "allow"]


def test_decisions_are_checked_against_the_pipeline_vocabulary(
    ctx: OrchestratorContext, review_pipelines: dict[str, str]
) -> None:
    (moderation_job,) = reviewed_jobs(ctx, review_pipelines["moderation"], 1)
    (qc_job,) = reviewed_jobs(ctx, review_pipelines["qc"], 1)
    with pytest.raises(ReviewError, match="choose one of allow, block"):
        decide(ctx, moderation_job, "pass", reviewer="alice")
    with pytest.raises(ReviewError, match="choose one of pass, fail"):
        decide(ctx, qc_job, "review", reviewer="alice")
    with pytest.raises(ReviewError, match="--reviewer"):
        decide(ctx, qc_job, "pass", reviewer="  ")
    with pytest.raises(ReviewError, match="no job"):
        decide(ctx, str(uuid.uuid4()), "pass", reviewer="alice")
    (plain,) = [
        submit(ctx, SubmitRequest(data=d, pipeline="basic", force=True)).job_id
        for d in fresh_images(1)
    ]
    wait_jobs(ctx.database_url, [plain], 60)
    with session_scope(ctx.database_url) as session:
        verdict = session.get(Job, plain).verdict  # type: ignore[union-attr]
    if verdict != "review":
        with pytest.raises(ReviewError, match="only jobs waiting"):
            decide(ctx, plain, "pass", reviewer="alice")
    code, out = run_cli(ctx, "review", "decide", qc_job, "allow", "--reviewer", "alice")
    assert code == 2 and "choose one of pass, fail" in out


def submit_and_wait(ctx: OrchestratorContext, images: list[bytes], **kwargs: object) -> list[str]:
    ids = [
        submit(ctx, SubmitRequest(data=d, pipeline="basic", force=True, **kwargs)).job_id  # type: ignore[arg-type]
        for d in images
    ]
    wait_jobs(ctx.database_url, ids, 60)
    return ids


def run_jobs(ctx: OrchestratorContext, run_id: str) -> list[Job]:
    with session_scope(ctx.database_url) as session:
        return list(
            session.execute(
                select(Job).where(Job.idempotency_key.like(f"reprocess:{run_id}:%"))
            ).scalars()
        )


def test_reprocess_resubmits_stored_images_as_new_bulk_jobs_and_resumes(
    ctx: OrchestratorContext,
) -> None:
    since = datetime.now(UTC)
    old_ids = submit_and_wait(ctx, fresh_images(4))
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    options = BackfillOptions("basic", since=since, run_id=run_id, limit=2)
    interrupted = Backfill(ctx, options).run()
    assert (interrupted.submitted, interrupted.total) == (2, 2)
    resumed = Backfill(ctx, BackfillOptions("basic", since=since, run_id=run_id)).run()
    assert (resumed.submitted, resumed.skipped, resumed.total) == (4, 0, 4)
    new_jobs = run_jobs(ctx, run_id)
    assert len(new_jobs) == 4
    wait_jobs(ctx.database_url, [j.id for j in new_jobs], 60)
    with session_scope(ctx.database_url) as session:
        for job in new_jobs:
            assert (job.priority, job.source, job.cache_hit_of) == ("bulk", "reprocess", None)
            assert job.metadata_json["reprocess_run"] == run_id
        queues = session.execute(
            select(StageRun.queue).where(StageRun.job_id.in_([j.id for j in new_jobs]))
        ).scalars()
        assert set(queues) == {"imgpipe.cpu.bulk"}
        assert job_statuses(session, old_ids) == dict.fromkeys(old_ids, "succeeded"), "kept"
    Backfill(ctx, BackfillOptions("basic", since=since, run_id=run_id)).cursor_path.unlink()
    rerun = Backfill(ctx, BackfillOptions("basic", since=since, run_id=run_id)).run()
    # A lost cursor: the idempotency keys still skip everything.
    assert (rerun.submitted, rerun.skipped) == (0, 4)
    assert len(run_jobs(ctx, run_id)) == 4
    with pytest.raises(BackfillError, match="started with other options"):
        Backfill(ctx, BackfillOptions("basic", stage="enhance", since=since, run_id=run_id))


def test_where_model_version_differs_selects_images_whose_latest_job_has_another_hash(
    ctx: OrchestratorContext,
) -> None:
    since = datetime.now(UTC)
    current, stale, updated = fresh_images(3)
    stale_params = {"quality": {"blocky_above_ratio": 1.6}}
    submit_and_wait(ctx, [current])
    (stale_job,) = submit_and_wait(ctx, [stale], overrides=stale_params)
    submit_and_wait(ctx, [updated], overrides=stale_params)
    submit_and_wait(ctx, [updated])
    run_id = f"w-{uuid.uuid4().hex[:8]}"
    options = BackfillOptions("basic", since=since, where="model-version-differs", run_id=run_id)
    report = Backfill(ctx, options).run()
    assert report.submitted == 1
    (job,) = run_jobs(ctx, run_id)
    with session_scope(ctx.database_url) as session:
        previous = session.get(Job, stale_job)
        assert previous is not None and job.image_sha256 == previous.image_sha256
        assert job.pipeline_hash != previous.pipeline_hash
    wait_jobs(ctx.database_url, [job.id], 60)


def test_reprocess_cli_with_stage_picks_images_whose_stage_did_not_succeed(
    ctx: OrchestratorContext,
) -> None:
    time.sleep(1.1)  # --since has whole seconds: keep earlier tests' images out of range
    since = datetime.now(UTC).replace(microsecond=0)
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(buffer, format="PNG")
    blank_id, _textured = submit_and_wait(ctx, [buffer.getvalue(), *fresh_images(1)])
    with session_scope(ctx.database_url) as session:
        skipped = session.execute(
            select(StageRun.status).where(StageRun.job_id == blank_id, StageRun.stage == "enhance")
        ).scalar_one()
        assert skipped == StageStatus.SKIPPED, "the blank image tripped the quality gate"
    run_id = f"c-{uuid.uuid4().hex[:8]}"
    code, out = run_cli(
        ctx, "reprocess", "--pipeline", "basic", "--stage", "enhance",
        "--since", since.strftime("%Y-%m-%dT%H:%M:%S"), "--run-id", run_id,
    )  # fmt: skip
    assert code == 0, out
    assert "submitted 1, already done 0, failed 0 of 1" in out
    (job,) = run_jobs(ctx, run_id)
    with session_scope(ctx.database_url) as session:
        blank = session.get(Job, blank_id)
        assert blank is not None and job.image_sha256 == blank.image_sha256
    wait_jobs(ctx.database_url, [job.id], 60)
    code, out = run_cli(ctx, "reprocess", "--pipeline", "basic", "--where", "newer")
    assert code == 2 and "--where 'newer' is not supported" in out
    code, out = run_cli(ctx, "reprocess", "--pipeline", "basic", "--stage", "detect")
    assert code == 2 and "has stages quality, enhance" in out
