"""The ``noop`` stage kind: returns a tiny output per input without reading the pixels.

It exists to measure the cost of the DAG itself (`imgpipe bench --stages noop`): every
claim, transaction, hop and event a real stage pays, with no compute in between.

Two parameters stand in for compute in benchmarks and fault drills (none by default):

- ``sleep_ms``: time spent per input as Python-level work (a sleep the stage's soft time
  limit interrupts, like any Python loop or I/O wait);
- ``hang_ms``: time spent per input as a call stuck in native code — the sleep runs with
  ``SIGALRM`` blocked, so the soft time limit cannot interrupt it and only the hard limit
  (the consumer's watchdog) ends it, as with a forward pass that never returns.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any

from imgpipe.errors import PermanentError
from imgpipe.stageoutputs import NoopOutput
from workers.stagecontract import StageInput, StageOutput, StageSkip

__all__ = ["run_stage_batch"]


def _ms(params: Mapping[str, Any], name: str) -> float:
    value = params.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise PermanentError(
            f"noop stage parameter {name} must be a number of milliseconds >= 0, got {value!r}"
        )
    return float(value)


def run_stage_batch(inputs: Sequence[StageInput]) -> list[StageOutput | StageSkip]:
    for i in inputs:
        sleep_ms, hang_ms = _ms(i.params, "sleep_ms"), _ms(i.params, "hang_ms")
        if sleep_ms:
            time.sleep(sleep_ms / 1000)
        if hang_ms:
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            try:
                time.sleep(hang_ms / 1000)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    outputs: list[NoopOutput] = [{"noop": True, "upstream": sorted(i.upstream)} for i in inputs]
    return [StageOutput(output=output) for output in outputs]
