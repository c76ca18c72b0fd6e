"""Response and request bodies of the HTTP API (they make the published OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DecisionIn",
    "DecisionOut",
    "HealthOut",
    "HistoryOut",
    "JobOut",
    "LeaseOut",
    "QueueOut",
    "ReviewItemOut",
    "ReviewNextIn",
    "SubmitOut",
]

JOB_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
"""Query and body strings: no control characters (PostgreSQL refuses NUL in text)."""
NOTE_PATTERN = r"^[^\x00]*$"
MAX_EXCLUDE = 1000
MAX_NOTE_CHARS = 2000


class Links(BaseModel):
    job: str
    events: str


class SubmitOut(BaseModel):
    job_id: str
    status: str
    created: bool = Field(description="False when the Idempotency-Key named an existing job.")
    cache_hit: bool
    reason: str | None = Field(None, description="Why the image was rejected, if it was.")
    links: Links


class StageOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    stage: str
    kind: str
    status: str
    attempts: int
    model: dict[str, Any] | None
    params: dict[str, Any]
    output: dict[str, Any] | None
    error: str | None
    skip_reason: str | None
    timings_ms: dict[str, float | None]


class JobOut(BaseModel):
    """The job with every stage's outcome and provenance (orchestrator/reports.py)."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    status: str
    verdict: str | None
    reasons: list[Any]
    error: str | None
    pipeline: str
    pipeline_hash: str
    priority: str
    source: str
    idempotency_key: str | None
    cache_hit_of: str | None
    image_sha256: str | None
    input_sha256: str
    metadata: dict[str, Any]
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    elapsed_ms: float | None
    stages: list[StageOut]


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    database: str
    redis: str


class ReviewNextIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order: Literal["oldest", "score"] = "oldest"
    exclude: list[Annotated[str, Field(pattern=JOB_ID_PATTERN)]] = Field(
        default_factory=list,
        max_length=MAX_EXCLUDE,
        description="Job ids not to be given (the ones this reviewer skipped).",
    )
    pipeline: str | None = Field(None, max_length=64, pattern=TEXT_PATTERN)


class LeaseOut(BaseModel):
    job_id: str
    reviewer: str
    expires_at: str


class Box(BaseModel):
    label: str
    score: float
    box: list[float] = Field(description="x1, y1, x2, y2 in the original image's pixels.")


class RuleOut(BaseModel):
    stage: str
    field: str
    op: str
    value: Any = Field(description="The rule's threshold.")
    verdict: str
    found: bool
    actual: Any = Field(description="The value the job's stage output has.")
    matched: bool


class ReviewItemOut(BaseModel):
    job_id: str
    pipeline: str
    verdict: str | None
    reasons: list[Any]
    choices: list[str]
    finished_at: str | None
    image_sha256: str | None
    width: int | None
    height: int | None
    score: float | None
    boxes: list[Box]
    rules: list[RuleOut]
    moderation: dict[str, Any] | None
    has_heatmap: bool
    has_enhanced: bool
    lease: LeaseOut | None = None


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: str = Field(min_length=1, max_length=16, pattern=TEXT_PATTERN)
    note: str | None = Field(None, max_length=MAX_NOTE_CHARS, pattern=NOTE_PATTERN)


class DecisionOut(BaseModel):
    job_id: str
    decision: str
    previous_verdict: str | None
    reviewer: str
    at: str


class QueueOut(BaseModel):
    waiting: int
    leased: int
    lease_s: float
    reviewer: str


class HistoryItem(BaseModel):
    id: int
    job_id: str
    decision: str
    reviewer: str
    note: str | None
    at: str
    pipeline: str
    image_sha256: str | None


class HistoryOut(BaseModel):
    total: int
    items: list[HistoryItem]
