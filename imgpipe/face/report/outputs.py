"""Stage rows -> the report's fields (pure: no SQL, no blobs).

Outputs are read through imgpipe.stageoutputs.read_output, so a stored output that no
longer matches its kind's schema fails loudly here rather than drawing nonsense.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from db.models import StageRun
from imgpipe.contracts import StageStatus
from imgpipe.face.report.views import Box, JobView, Score, StageNote, Timing
from imgpipe.stageoutputs import (
    AnomalyOutput,
    DetectOutput,
    EnhanceOutput,
    ModerateOutput,
    QualityOutput,
    read_output,
)

__all__ = ["MAX_SCORES_SHOWN", "apply_stage_outputs", "first_of_kind", "timings"]

MAX_SCORES_SHOWN = 6
"""Moderation categories shown per job: every deciding one, then the highest others."""


def first_of_kind(rows: Sequence[StageRun], kind: str) -> StageRun | None:
    """The first succeeded stage of ``kind`` (a pipeline may name its stages freely)."""
    return next((r for r in rows if r.kind == kind and r.status == StageStatus.SUCCEEDED), None)


def _output(row: StageRun | None) -> Mapping[str, Any] | None:
    if row is None or row.output is None:
        return None
    return read_output(row.kind, row.output)


def _scores(moderate: ModerateOutput) -> list[Score]:
    scores: list[Score] = []
    for category, value in moderate["scores"].items():
        limits = moderate["thresholds"].get(category) or {"review": None, "block": None}
        review, block = limits.get("review"), limits.get("block")
        reached = any(t is not None and value >= t for t in (review, block))
        scores.append(Score(category, float(value), review, block, reached))
    scores.sort(key=lambda s: (not s.deciding, -s.score))
    deciding = [s for s in scores if s.deciding]
    return (
        deciding + [s for s in scores if not s.deciding][: max(0, MAX_SCORES_SHOWN - len(deciding))]
    )


def apply_stage_outputs(view: JobView, rows: Sequence[StageRun]) -> None:
    """Fill ``view``'s quality, enhance, detect, anomaly and moderation fields and the
    notes on stages that did not succeed."""
    if (out := _output(first_of_kind(rows, "quality"))) is not None:
        quality = cast(QualityOutput, out)
        view.quality_score = float(quality["score"])
        view.quality_flags = list(quality["flags"])
    if (out := _output(first_of_kind(rows, "enhance"))) is not None:
        view.enhance_ops = [op["op"] for op in cast(EnhanceOutput, out)["applied"]]
    if (out := _output(first_of_kind(rows, "detect"))) is not None:
        view.boxes = [
            Box(d["label"], float(d["score"]), *(float(v) for v in d["box"][:4]))
            for d in cast(DetectOutput, out)["detections"]
        ]
    if (out := _output(first_of_kind(rows, "anomaly"))) is not None:
        anomaly = cast(AnomalyOutput, out)
        view.anomaly_score = float(anomaly["score"])
        view.anomaly_threshold = float(anomaly["threshold"])
    if (out := _output(first_of_kind(rows, "moderate"))) is not None:
        moderate = cast(ModerateOutput, out)
        view.moderation_verdict = moderate["verdict"]
        view.moderation_reasons = list(moderate["reasons"])
        view.scores = _scores(moderate)
    view.notes = [
        StageNote(r.stage, r.status, r.skip_reason or r.error or "")
        for r in rows
        if r.status != StageStatus.SUCCEEDED
    ]


def _offset_ms(at: datetime | None, origin: datetime) -> float | None:
    return None if at is None else (at - origin).total_seconds() * 1000


def timings(rows: Sequence[StageRun], created_at: datetime) -> list[Timing]:
    """Waterfall rows for the stages that ran: queue wait ends when the stage started,
    load and compute follow (a stage's own clock; ``total_ms`` also covers persisting)."""
    out: list[Timing] = []
    for row in rows:
        started = _offset_ms(row.started_at, created_at)
        if started is None:
            continue
        wait = row.queue_wait_ms or 0.0
        out.append(
            Timing(
                stage=row.stage,
                status=row.status,
                start_ms=max(0.0, started - wait),
                queue_wait_ms=wait,
                load_ms=row.load_ms or 0.0,
                compute_ms=row.compute_ms or 0.0,
            )
        )
    return out
