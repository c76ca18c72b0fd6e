"""End to end through real worker processes, real Redis and a real database."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from db.engine import session_scope
from db.models import Job, StageRun
from imgpipe.contracts import EVENTS_STREAM, JobStatus, StageStatus
from imgpipe.errors import StageNotInstalledError, UnknownPipelineError
from orchestrator.context import OrchestratorContext
from orchestrator.reports import job_report
from orchestrator.submit import SubmitRequest, submit
from tests.support.jobs import wait_jobs

pytestmark = pytest.mark.timeout(180)


def report(ctx: OrchestratorContext, job_id: str) -> dict[str, Any]:
    with session_scope(ctx.database_url) as session:
        result = job_report(session, job_id)
    assert result is not None
    return result


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_photos_get_quality_scores_and_enhanced_blobs_with_provenance(
    ctx: OrchestratorContext, samples_dir: Path
) -> None:
    paths = [samples_dir / "astronaut.jpg", samples_dir / "degraded" / "coffee_dark.jpg"]
    job_ids = [
        submit(ctx, SubmitRequest(data=p.read_bytes(), pipeline="basic", force=True)).job_id
        for p in paths
    ]
    statuses = wait_jobs(ctx.database_url, job_ids, 90)
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}
    for job_id in job_ids:
        result = report(ctx, job_id)
        assert result["verdict"] in ("pass", "review", "fail")
        stages = {s["stage"]: s for s in result["stages"]}
        assert set(stages) == {"quality", "enhance"}
        for stage in stages.values():
            assert stage["status"] == StageStatus.SUCCEEDED
            assert stage["attempts"] == 1
            assert stage["worker_host"] and stage["worker_pid"]
            assert stage["code_version"]
            assert stage["timings_ms"]["compute"] is not None
            assert stage["timings_ms"]["total"] >= stage["timings_ms"]["compute"]
        assert 0 <= stages["quality"]["output"]["score"] <= 100
        enhance = stages["enhance"]
        if enhance["output"].get("unchanged"):
            assert enhance["output_blob_key"] is None, "nothing applied: no new blob"
            continue
        enhanced = Image.open(io.BytesIO(ctx.blobs.get(enhance["output_blob_key"])))
        with Image.open(paths[job_ids.index(job_id)]) as original:
            assert enhanced.size == original.size
    dark = {s["stage"]: s for s in report(ctx, job_ids[1])["stages"]}
    assert "dark" in dark["quality"]["output"]["flags"]
    assert dark["enhance"]["output"]["applied"], "a dark photo must get an exposure fix"
    assert dark["enhance"]["output_blob_key"] is not None


def test_corrupt_file_is_rejected_with_reason_and_never_dispatched(
    ctx: OrchestratorContext, samples_dir: Path
) -> None:
    data = (samples_dir / "astronaut.jpg").read_bytes()[:5000]
    result = submit(ctx, SubmitRequest(data=data, pipeline="basic"))
    assert result.status == JobStatus.REJECTED
    with session_scope(ctx.database_url) as session:
        job = session.get(Job, result.job_id)
        assert job is not None
        assert job.reasons == ["corrupt"]
        assert (job.error and "truncated" in job.error.lower()) or "corrupt" in (job.error or "")
        assert session.query(StageRun).filter(StageRun.job_id == job.id).count() == 0


def test_blank_image_trips_the_quality_gate_and_skips_enhancement(ctx: OrchestratorContext) -> None:
    grey = np.full((480, 640, 3), 128, dtype=np.uint8)
    result = submit(ctx, SubmitRequest(data=png_bytes(grey), pipeline="basic", force=True))
    wait_jobs(ctx.database_url, [result.job_id], 90)
    final = report(ctx, result.job_id)
    stages = {s["stage"]: s for s in final["stages"]}
    assert stages["quality"]["output"]["usable"] is False
    assert stages["enhance"]["status"] == StageStatus.SKIPPED
    assert stages["enhance"]["skip_reason"] == "quality_gate"
    assert final["status"] == JobStatus.SUCCEEDED
    assert final["verdict"] == "fail"
    assert any(r.startswith("quality_gate") for r in final["reasons"])


def test_same_idempotency_key_twice_gives_one_job(
    ctx: OrchestratorContext, samples_dir: Path
) -> None:
    data = (samples_dir / "rocket.jpg").read_bytes()
    first = submit(ctx, SubmitRequest(data=data, pipeline="basic", idempotency_key="rocket-1"))
    second = submit(ctx, SubmitRequest(data=data, pipeline="basic", idempotency_key="rocket-1"))
    assert first.created and not second.created
    assert first.job_id == second.job_id
    with session_scope(ctx.database_url) as session:
        assert session.query(Job).filter(Job.idempotency_key == "rocket-1").count() == 1
    wait_jobs(ctx.database_url, [first.job_id], 90)


def test_identical_image_and_pipeline_reuses_results_unless_forced(
    ctx: OrchestratorContext, samples_dir: Path
) -> None:
    data = (samples_dir / "chelsea.jpg").read_bytes()
    first = submit(ctx, SubmitRequest(data=data, pipeline="basic", force=True))
    wait_jobs(ctx.database_url, [first.job_id], 90)
    again = submit(ctx, SubmitRequest(data=data, pipeline="basic"))
    assert again.cache_hit
    cached = report(ctx, again.job_id)
    assert cached["cache_hit_of"] == first.job_id
    assert cached["verdict"] == report(ctx, first.job_id)["verdict"]
    forced = submit(ctx, SubmitRequest(data=data, pipeline="basic", force=True))
    assert not forced.cache_hit
    wait_jobs(ctx.database_url, [forced.job_id], 90)


def test_events_stream_tells_the_story_of_a_job(
    ctx: OrchestratorContext, samples_dir: Path
) -> None:
    data = (samples_dir / "coffee.jpg").read_bytes()
    result = submit(
        ctx,
        SubmitRequest(data=data, pipeline="basic", force=True, reply_to="imgpipe:reply:replies"),
    )
    wait_jobs(ctx.database_url, [result.job_id], 90)
    client = ctx.events.client
    events = [
        {k.decode(): json.loads(v) for k, v in fields.items()}
        for _id, fields in client.xrange(EVENTS_STREAM)
    ]
    mine = [e["event"] for e in events if e["job_id"] == result.job_id]
    assert mine[0] == "accepted"
    assert mine.count("stage_succeeded") == 2
    assert mine[-1] == "completed"
    replies = client.xrange("imgpipe:reply:replies")
    final = {k.decode(): json.loads(v) for k, v in replies[-1][1].items()}
    assert final["job_id"] == result.job_id and final["event"] == "completed"
    assert final["verdict"] in ("pass", "review", "fail")


def test_celery_clients_submit_by_task_name(ctx: OrchestratorContext, samples_dir: Path) -> None:
    import base64
    import time

    data = (samples_dir / "astronaut.jpg").read_bytes()
    ctx.celery.send_task(
        "imgpipe.submit",
        kwargs={
            "image_b64": base64.b64encode(data).decode(),
            "pipeline": "basic",
            "idempotency_key": "celery-client-1",
        },
        queue="imgpipe.control",
    )
    deadline = time.monotonic() + 60
    job_id = None
    while job_id is None and time.monotonic() < deadline:
        with session_scope(ctx.database_url) as session:
            job = session.query(Job).filter(Job.idempotency_key == "celery-client-1").one_or_none()
            job_id = job.id if job else None
        time.sleep(0.1)
    assert job_id is not None
    assert wait_jobs(ctx.database_url, [job_id], 90)[job_id] == JobStatus.SUCCEEDED


def test_unknown_pipeline_is_refused_with_the_known_names(ctx: OrchestratorContext) -> None:
    with pytest.raises(UnknownPipelineError, match="known: basic"):
        submit(ctx, SubmitRequest(data=b"x", pipeline="nope"))


def test_pipeline_with_uninstalled_stage_is_refused(
    ctx: OrchestratorContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgpipe import stagekinds

    kind = stagekinds.STAGE_KINDS["detect"]
    monkeypatch.setitem(
        stagekinds.STAGE_KINDS,
        "detect",
        stagekinds.StageKind(kind.name, kind.queue, "workers.stages.not_installed", kind.version),
    )
    spec = tmp_path / "det.toml"
    spec.write_text('[stages.quality]\n[stages.detect]\nneeds = ["quality"]\n')
    with pytest.raises(StageNotInstalledError, match="not installed"):
        submit(ctx, SubmitRequest(data=b"x", pipeline=str(spec)))
