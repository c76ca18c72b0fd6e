"""The ``noop`` stage kind: returns a tiny output per input without reading the pixels.

It exists to measure the cost of the DAG itself (`imgpipe bench --stages noop`): every
claim, transaction, hop and event a real stage pays, with no compute in between.
"""

from __future__ import annotations

from collections.abc import Sequence

from imgpipe.stageoutputs import NoopOutput
from workers.stagecontract import StageInput, StageOutput, StageSkip

__all__ = ["run_stage_batch"]


def run_stage_batch(inputs: Sequence[StageInput]) -> list[StageOutput | StageSkip]:
    outputs: list[NoopOutput] = [{"noop": True, "upstream": sorted(i.upstream)} for i in inputs]
    return [StageOutput(output=output) for output in outputs]
