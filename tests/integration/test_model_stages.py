"""Model stages through the model worker process (torch on the CPU here, the same code on
a GPU): detections with provenance, moderation thresholds changed per submission."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.models import Detection, ModelRecord
from imgpipe.contracts import JobStatus, StageStatus
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.integration.test_pipeline_e2e import report
from tests.support.jobs import wait_jobs

pytestmark = pytest.mark.timeout(240)


def test_moderation_pipeline_finds_the_face_and_records_model_provenance(
    ctx: OrchestratorContext, samples_dir: Path
) -> None:
    data = (samples_dir / "astronaut.jpg").read_bytes()
    result = submit(ctx, SubmitRequest(data=data, pipeline="moderation", force=True))
    assert wait_jobs(ctx.database_url, [result.job_id], 180)[result.job_id] == JobStatus.SUCCEEDED
    final = report(ctx, result.job_id)
    stages = {s["stage"]: s for s in final["stages"]}
    assert final["verdict"] == "allow"
    detect = stages["detect"]
    assert detect["status"] == StageStatus.SUCCEEDED
    assert detect["device"] == "cpu"
    assert detect["model"]["name"] and len(detect["model"]["weights_sha256"]) == 64
    labels = {d["label"] for d in detect["output"]["detections"]}
    assert "FACE_FEMALE" in labels
    assert stages["moderate"]["output"]["verdict"] == "allow"
    with session_scope(ctx.database_url) as session:
        rows = (
            session.execute(select(Detection).where(Detection.job_id == result.job_id))
            .scalars()
            .all()
        )
        assert {r.label for r in rows} >= {"FACE_FEMALE"}
        face = next(r for r in rows if r.label == "FACE_FEMALE")
        assert 0 <= face.x1 < face.x2 <= 512 and 0 <= face.y1 < face.y2 <= 512
        model = session.execute(
            select(ModelRecord).where(
                ModelRecord.weights_sha256 == detect["model"]["weights_sha256"]
            )
        ).scalar_one()
        assert "AGPL-3.0" in model.license


def test_moderation_thresholds_change_per_submission_without_a_restart(
    ctx: OrchestratorContext, samples_dir: Path
) -> None:
    data = (samples_dir / "astronaut.jpg").read_bytes()
    overrides = {"moderate": {"thresholds": {"FACE_FEMALE": {"review": 0.2}}}}
    result = submit(
        ctx, SubmitRequest(data=data, pipeline="moderation", overrides=overrides, force=True)
    )
    wait_jobs(ctx.database_url, [result.job_id], 180)
    final = report(ctx, result.job_id)
    moderate = {s["stage"]: s for s in final["stages"]}["moderate"]
    assert moderate["output"]["verdict"] == "review"
    assert any("FACE_FEMALE" in r and "0.2" in r for r in moderate["output"]["reasons"])
    assert final["verdict"] == "review"
