"""Plain, typed views of one job for the HTML report: what ``collect`` reads from SQL and
the blob store, and all ``render`` needs. Strings here come from the database: the renderer
escapes every one of them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Box", "JobView", "Picture", "Score", "StageNote", "Timing"]


@dataclass(frozen=True)
class Picture:
    """An inlined image (``data_uri``), or why there is none (``missing``)."""

    data_uri: str | None = None
    missing: str | None = None


@dataclass(frozen=True)
class Box:
    """One detection, in the original upload's pixels (upright, EXIF applied)."""

    label: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Score:
    """One moderation category's raw score and its thresholds; ``deciding`` when the score
    reached a review or block threshold (it made the verdict)."""

    category: str
    score: float
    review: float | None
    block: float | None
    deciding: bool


@dataclass(frozen=True)
class Timing:
    """One stage in the waterfall: offsets from the job's creation, in milliseconds."""

    stage: str
    status: str
    start_ms: float
    queue_wait_ms: float
    load_ms: float
    compute_ms: float

    @property
    def end_ms(self) -> float:
        return self.start_ms + self.queue_wait_ms + self.load_ms + self.compute_ms


@dataclass(frozen=True)
class StageNote:
    """A stage that did not succeed: its status and the reason (skip reason or error)."""

    stage: str
    status: str
    reason: str


@dataclass
class JobView:
    job_id: str
    title: str
    pipeline: str
    status: str
    verdict: str | None
    reasons: list[str]
    error: str | None
    width_px: int
    height_px: int
    original: Picture = field(default_factory=Picture)
    enhanced: Picture = field(default_factory=Picture)
    heatmap: Picture = field(default_factory=Picture)
    enhance_ops: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    quality_score: float | None = None
    quality_flags: list[str] = field(default_factory=list)
    anomaly_score: float | None = None
    anomaly_threshold: float | None = None
    moderation_verdict: str | None = None
    moderation_reasons: list[str] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    notes: list[StageNote] = field(default_factory=list)
