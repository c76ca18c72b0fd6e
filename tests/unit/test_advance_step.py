"""The DAG step on in-memory rows: dispatch once, skip behind gates and failures, finalise."""

from __future__ import annotations

from datetime import UTC, datetime

from db.dag import step
from db.models import Job, StageRun
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.stageoutputs import QualityOutput
from orchestrator.pipelines import load_pipeline

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def make_job(pipeline: str = "full") -> tuple[Job, list[StageRun]]:
    spec = load_pipeline(pipeline)
    job = Job(id="j1", pipeline=pipeline, pipeline_spec=spec.to_json(), status=JobStatus.QUEUED)
    rows = [
        StageRun(
            id=i + 1, job_id="j1", stage=s.name, kind=s.kind, needs=list(s.needs), gate=s.gate,
            status=StageStatus.PENDING, time_limit_s=10, dispatch_count=0, task_name="t", queue="q",
        )
        for i, s in enumerate(spec.stages)
    ]  # fmt: skip
    return job, rows


def quality_output(score: float, usable: bool = True, reason: str | None = None) -> QualityOutput:
    return {"score": score, "flags": [], "metrics": {}, "usable": usable, "unusable_reason": reason}


def by_name(rows: list[StageRun]) -> dict[str, StageRun]:
    return {r.stage: r for r in rows}


def test_only_roots_dispatch_first_and_each_exactly_once() -> None:
    job, rows = make_job()
    first = step(job, rows, NOW, 5)
    assert [d.stage_run_id for d in first.dispatches] == [by_name(rows)["quality"].id]
    assert job.status == JobStatus.RUNNING
    again = step(job, rows, NOW, 5)
    assert again.dispatches == []


def test_downstream_dispatches_when_needs_succeed() -> None:
    job, rows = make_job()
    step(job, rows, NOW, 5)
    quality = by_name(rows)["quality"]
    quality.status, quality.output = StageStatus.SUCCEEDED, dict(quality_output(80.0))
    outcome = step(job, rows, NOW, 5)
    names = {r.stage for r in rows if r.id in {d.stage_run_id for d in outcome.dispatches}}
    assert names == {"enhance", "anomaly", "moderate"}


def test_tripped_gate_skips_every_downstream_stage_and_finalises() -> None:
    job, rows = make_job()
    step(job, rows, NOW, 5)
    quality = by_name(rows)["quality"]
    quality.status = StageStatus.SUCCEEDED
    quality.output = dict(quality_output(0.0, usable=False, reason="uniform image"))
    outcome = step(job, rows, NOW, 5)
    assert outcome.dispatches == []
    assert {r.skip_reason for r in rows if r.stage != "quality"} == {"quality_gate"}
    assert job.status == JobStatus.SUCCEEDED
    assert job.verdict == "review"  # full's on_gate
    assert outcome.completed is not None


def test_failed_stage_skips_dependents_and_fails_the_job_with_the_reason() -> None:
    job, rows = make_job("basic")
    step(job, rows, NOW, 5)
    quality = by_name(rows)["quality"]
    quality.status, quality.error = StageStatus.DEAD, "no result after 3 runs"
    step(job, rows, NOW, 5)
    assert by_name(rows)["enhance"].skip_reason == "upstream_failed:quality"
    assert job.status == JobStatus.FAILED
    assert job.error is not None and "no result after 3 runs" in job.error
