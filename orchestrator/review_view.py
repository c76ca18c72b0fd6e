"""What a reviewer sees of one job: the image, its boxes, the deciding scores and the
thresholds they were held against; the score the queue can be ordered by; the history.

A job's **score** (``review_scores``) is the highest moderation category score of its
``moderate`` stage (how close the image came to being blocked); a job without one gets
its highest detection score; a job with neither has no score (it sorts after the others).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Detection, Image, Job, Review, StageRun
from db.repo import get_job
from imgpipe.contracts import StageStatus
from imgpipe.policy import explain_rules
from orchestrator.review import decision_choices

__all__ = ["HistoryFilter", "review_history", "review_item", "review_scores"]

MODERATE_KIND = "moderate"
ENHANCE_KIND = "enhance"
ANOMALY_KIND = "anomaly"
MAX_BOXES = 200


def _moderation_max(output: Mapping[str, Any] | None) -> float | None:
    scores = (output or {}).get("scores")
    if not isinstance(scores, Mapping):
        return None
    values = [float(v) for v in scores.values() if isinstance(v, int | float)]
    return max(values) if values else None


def review_scores(session: Session, job_ids: Sequence[str]) -> dict[str, float]:
    """job id -> score (see the module) for the jobs that have one: two queries."""
    if not job_ids:
        return {}
    scores: dict[str, float] = {}
    rows = session.execute(
        select(StageRun.job_id, StageRun.output).where(
            StageRun.job_id.in_(list(job_ids)),
            StageRun.kind == MODERATE_KIND,
            StageRun.status == StageStatus.SUCCEEDED,
        )
    )
    for job_id, output in rows:
        value = _moderation_max(output)
        if value is not None:
            scores[job_id] = max(value, scores.get(job_id, value))
    missing = [j for j in job_ids if j not in scores]
    if missing:
        best = session.execute(
            select(Detection.job_id, func.max(Detection.score))
            .where(Detection.job_id.in_(missing))
            .group_by(Detection.job_id)
        )
        scores.update({job_id: float(score) for job_id, score in best if score is not None})
    return scores


def review_item(session: Session, job_id: str) -> dict[str, Any] | None:
    """Everything the console shows for one job, or None when there is no such job."""
    job = get_job(session, job_id)
    if job is None:
        return None
    image = session.get(Image, job.image_sha256) if job.image_sha256 else None
    outputs = {
        r.stage: r.output
        for r in job.stage_runs
        if r.status == StageStatus.SUCCEEDED and r.output is not None
    }
    detections = session.execute(
        select(Detection)
        .where(Detection.job_id == job_id)
        .order_by(Detection.score.desc(), Detection.id)
        .limit(MAX_BOXES)
    ).scalars()
    policy = (job.pipeline_spec or {}).get("policy") or {}
    rules = policy.get("rules") or []
    moderation = next(
        (r.output for r in job.stage_runs if r.kind == MODERATE_KIND and r.output), None
    )
    return {
        "job_id": job.id,
        "pipeline": job.pipeline,
        "verdict": job.verdict,
        "reasons": list(job.reasons),
        "choices": list(decision_choices(job)),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "image_sha256": job.image_sha256,
        "width": image.width if image is not None else None,
        "height": image.height if image is not None else None,
        "score": review_scores(session, [job_id]).get(job_id),
        "boxes": [
            {"label": d.label, "score": d.score, "box": [d.x1, d.y1, d.x2, d.y2]}
            for d in detections
        ],
        "rules": [check.to_json() for check in explain_rules(list(rules), outputs)],
        "moderation": {
            "scores": moderation.get("scores", {}),
            "thresholds": moderation.get("thresholds", {}),
            "verdict": moderation.get("verdict"),
        }
        if moderation is not None
        else None,
        "has_heatmap": any(r.kind == ANOMALY_KIND and r.output_blob_key for r in job.stage_runs),
        "has_enhanced": any(
            r.kind == ENHANCE_KIND and r.status == StageStatus.SUCCEEDED for r in job.stage_runs
        ),
    }


@dataclass(frozen=True)
class HistoryFilter:
    reviewer: str | None = None
    decision: str | None = None
    pipeline: str | None = None
    job_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    offset: int = 0


def review_history(session: Session, where: HistoryFilter) -> tuple[int, list[dict[str, Any]]]:
    """Decisions, newest first, with the filters of ``where``; (total matching, page)."""
    stmt = select(Review, Job.pipeline, Job.image_sha256).join(Job, Job.id == Review.job_id)
    if where.reviewer is not None:
        stmt = stmt.where(Review.reviewer == where.reviewer)
    if where.decision is not None:
        stmt = stmt.where(Review.decision == where.decision)
    if where.pipeline is not None:
        stmt = stmt.where(Job.pipeline == where.pipeline)
    if where.job_id is not None:
        stmt = stmt.where(Review.job_id == where.job_id)
    if where.since is not None:
        stmt = stmt.where(Review.at >= where.since)
    if where.until is not None:
        stmt = stmt.where(Review.at < where.until)
    total = session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
    page = session.execute(
        stmt.order_by(Review.at.desc(), Review.id.desc()).limit(where.limit).offset(where.offset)
    ).all()
    return int(total), [
        {
            "id": review.id,
            "job_id": review.job_id,
            "decision": review.decision,
            "reviewer": review.reviewer,
            "note": review.note,
            "at": review.at.isoformat(),
            "pipeline": pipeline,
            "image_sha256": image_sha256,
        }
        for review, pipeline, image_sha256 in page
    ]
