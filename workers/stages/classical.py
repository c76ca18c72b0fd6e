"""Batch runners for the classical stages (quality, enhance): StageInput -> StageOutput.

The pure functions live in quality.py and enhance.py; this module only adapts them to
the executor's contract (workers/stagecontract.py). Enhance reads the output of the first
quality stage it needs (found by kind) to choose its operations.
"""

from __future__ import annotations

from collections.abc import Sequence

from imgpipe.errors import PermanentError
from workers.stagecontract import StageInput, StageOutput, StageSkip
from workers.stages.enhance import EnhanceParams, enhance_image
from workers.stages.quality import QualityParams, QualityResult, assess_quality

__all__ = ["run_enhance_batch", "run_quality_batch"]


def run_quality_batch(inputs: Sequence[StageInput]) -> list[StageOutput | StageSkip]:
    results: list[StageOutput | StageSkip] = []
    for item in inputs:
        params = QualityParams.from_json(item.params)
        results.append(StageOutput(output=assess_quality(item.image, params).to_json()))
    return results


def _upstream_quality(item: StageInput) -> QualityResult:
    for stage, kind in item.upstream_kinds.items():
        if kind == "quality":
            return QualityResult.from_json(item.upstream[stage])
    raise PermanentError(
        "enhance needs the result of a quality stage: list one in this stage's `needs` "
        "in the pipeline spec"
    )


def run_enhance_batch(inputs: Sequence[StageInput]) -> list[StageOutput | StageSkip]:
    results: list[StageOutput | StageSkip] = []
    for item in inputs:
        params = EnhanceParams.from_json(item.params)
        quality = _upstream_quality(item)
        enhanced = enhance_image(item.image, quality, params)
        output = enhanced.to_json()
        if enhanced.applied:
            results.append(StageOutput(output=output, image=enhanced.image))
        else:
            results.append(StageOutput(output=output, passthrough=True))
    return results
