"""The moderate stage: per-category nudity scores and an allow/review/block verdict.

The stage runs NudeNet's detector (the same cached model instance the detect stage uses)
on the image it is given (the wrapper gives it the original upload) and reads, for every
category, the highest score the network gave anywhere in the image. The verdict is the
most severe level any category reaches; every triggered category is named in ``reasons``.
Raw scores are always stored, so a policy change can be re-applied without the model.

Parameters (``StageInput.params``)::

    thresholds      {CATEGORY: {"review": float | null, "block": float | null}}, merged
                    per key over DEFAULT_THRESHOLDS (null switches a level off)
    weights_path    weights file (default: 320n.onnx inside the nudenet package)
    weights_sha256  pin for that file

Importing this module does not import torch: ``verdict_from_scores`` is a pure function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from imgpipe.errors import PermanentError
from imgpipe.stageoutputs import ModerateOutput, ModerationThresholds
from workers.stagecontract import StageInput, StageOutput, StageSkip
from workers.stages.detect import (
    NUDENET_MODEL,
    check_keys,
    detector_model,
    optional_sha256,
    optional_str,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "CategoryThresholds",
    "ModerateParams",
    "Verdict",
    "run_stage_batch",
    "verdict_from_scores",
]

Verdict = Literal["allow", "review", "block"]


@dataclass(frozen=True)
class CategoryThresholds:
    """Score at or above which a category asks for review / blocks; None: never."""

    review: float | None = None
    block: float | None = None

    def to_json(self) -> ModerationThresholds:
        return {"review": self.review, "block": self.block}


_NEVER = CategoryThresholds()

DEFAULT_THRESHOLDS: Final[Mapping[str, CategoryThresholds]] = MappingProxyType(
    {
        # exposed sexual anatomy: review early, block when the detector is fairly sure
        "FEMALE_GENITALIA_EXPOSED": CategoryThresholds(review=0.30, block=0.50),
        "MALE_GENITALIA_EXPOSED": CategoryThresholds(review=0.30, block=0.50),
        "ANUS_EXPOSED": CategoryThresholds(review=0.30, block=0.50),
        "FEMALE_BREAST_EXPOSED": CategoryThresholds(review=0.35, block=0.60),
        # a round colour gradient (skimage's color.png) scores 0.74 here: block only
        # when very sure, review otherwise
        "BUTTOCKS_EXPOSED": CategoryThresholds(review=0.45, block=0.80),
        # covered intimate areas: review only
        "FEMALE_GENITALIA_COVERED": CategoryThresholds(review=0.60),
        "ANUS_COVERED": CategoryThresholds(review=0.60),
        # swimwear, bare chests, bellies, armpits, feet, faces: never by themselves
        "FEMALE_BREAST_COVERED": _NEVER,
        "BUTTOCKS_COVERED": _NEVER,
        "MALE_BREAST_EXPOSED": _NEVER,
        "BELLY_EXPOSED": _NEVER,
        "BELLY_COVERED": _NEVER,
        "ARMPITS_EXPOSED": _NEVER,
        "ARMPITS_COVERED": _NEVER,
        "FEET_EXPOSED": _NEVER,
        "FEET_COVERED": _NEVER,
        "FACE_FEMALE": _NEVER,
        "FACE_MALE": _NEVER,
    }
)
"""Starting points, not tuned on a labelled set; see docs/models.md."""

CATEGORIES: Final = tuple(DEFAULT_THRESHOLDS)
_LEVELS: Final = ("review", "block")


def verdict_from_scores(
    scores: Mapping[str, float], thresholds: Mapping[str, CategoryThresholds]
) -> tuple[Verdict, list[str]]:
    """The most severe level any category reaches, and one reason per triggered category.

    Reasons read ``"<CATEGORY> score 0.81 >= block threshold 0.60"``; block reasons come
    first, each group by descending score. A category without thresholds never triggers.
    """
    triggered: list[tuple[int, float, str]] = []
    for category, score in scores.items():
        limits = thresholds.get(category, _NEVER)
        if limits.block is not None and score >= limits.block:
            triggered.append((2, score, _reason(category, score, "block", limits.block)))
        elif limits.review is not None and score >= limits.review:
            triggered.append((1, score, _reason(category, score, "review", limits.review)))
    if not triggered:
        return "allow", []
    triggered.sort(key=lambda t: (-t[0], -t[1], t[2]))
    verdict: Verdict = "block" if triggered[0][0] == 2 else "review"
    return verdict, [reason for _, _, reason in triggered]


def _reason(category: str, score: float, level: str, threshold: float) -> str:
    return f"{category} score {score:.2f} >= {level} threshold {threshold:.2f}"


@dataclass(frozen=True)
class ModerateParams:
    thresholds: Mapping[str, CategoryThresholds] = field(default_factory=lambda: DEFAULT_THRESHOLDS)
    weights_path: str | None = None
    weights_sha256: str | None = None

    @classmethod
    def from_json(cls, params: Mapping[str, Any]) -> ModerateParams:
        check_keys("moderate", params, cls.__dataclass_fields__)
        return cls(
            thresholds=merge_thresholds(params.get("thresholds", {})),
            weights_path=optional_str("moderate", params, "weights_path"),
            weights_sha256=optional_sha256("moderate", params, "weights_sha256"),
        )


def merge_thresholds(overrides: Any) -> Mapping[str, CategoryThresholds]:
    """``overrides`` (JSON) merged per category and level over DEFAULT_THRESHOLDS."""
    if not isinstance(overrides, Mapping):
        raise PermanentError(
            f"moderate: thresholds must be an object {{CATEGORY: {{review, block}}}}, "
            f"got {overrides!r}"
        )
    merged = dict(DEFAULT_THRESHOLDS)
    for category, levels in overrides.items():
        if category not in DEFAULT_THRESHOLDS:
            raise PermanentError(
                f"moderate: unknown category {category!r} in thresholds; "
                f"known: {', '.join(CATEGORIES)}"
            )
        if not isinstance(levels, Mapping) or not set(levels) <= set(_LEVELS):
            raise PermanentError(
                f"moderate: thresholds.{category} must be an object with keys "
                f"'review' and/or 'block', got {levels!r}"
            )
        current = merged[category]
        values = {"review": current.review, "block": current.block}
        for level, value in levels.items():
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0.0 <= value <= 1.0
            ):
                raise PermanentError(
                    f"moderate: thresholds.{category}.{level} must be a number in [0, 1] "
                    f"or null, got {value!r}"
                )
            values[level] = None if value is None else float(value)
        review, block = values["review"], values["block"]
        if review is not None and block is not None and review > block:
            raise PermanentError(
                f"moderate: thresholds.{category} has review {review} above block {block}; "
                "review must not exceed block"
            )
        merged[category] = CategoryThresholds(review=review, block=block)
    return MappingProxyType(merged)


def run_stage_batch(inputs: Sequence[StageInput]) -> list[StageOutput | StageSkip]:
    from workers.models.detection import DetectRequest

    params = [ModerateParams.from_json(item.params) for item in inputs]
    groups: dict[int, list[int]] = {}
    models: dict[int, Any] = {}
    for i, (item, p) in enumerate(zip(inputs, params, strict=True)):
        model = detector_model(NUDENET_MODEL, p.weights_path, p.weights_sha256, item.device)
        models[id(model)] = model
        groups.setdefault(id(model), []).append(i)

    results: list[StageOutput | StageSkip | None] = [None] * len(inputs)
    for model_id, members in groups.items():
        model = models[model_id]
        # Moderation reads the per-class maxima only: no boxes needed.
        requests = [
            DetectRequest(image=inputs[i].image, score_threshold=1.0, max_detections=0)
            for i in members
        ]
        predictions = model.predict(requests)
        info = model.info().to_json()
        for i, prediction in zip(members, predictions, strict=True):
            scores = {c: round(prediction.class_scores.get(c, 0.0), 4) for c in CATEGORIES}
            results[i] = _stage_output(scores, params[i].thresholds, info)
    return [r for r in results if r is not None]


def _stage_output(
    scores: dict[str, float],
    thresholds: Mapping[str, CategoryThresholds],
    model: Mapping[str, str],
) -> StageOutput:
    verdict, reasons = verdict_from_scores(scores, thresholds)
    output: ModerateOutput = {
        "scores": scores,
        "verdict": verdict,
        "reasons": reasons,
        "thresholds": {c: thresholds[c].to_json() for c in CATEGORIES},
    }
    return StageOutput(
        output=output,
        model=model,
    )
