"""The compute phase of a stage batch: one forward pass per stage kind, split on failure.

``StageExecutor`` (workers/execute.py) claims a batch and loads each claim's pixels into a
``Work`` item, then hands the items to ``BatchCompute``: those of one kind go to the kind's
batch function (imgpipe/stagekinds.py, imported on first use) in one call, under the
stage time limits (workers/timelimits.py). A failure that is not transient splits the
group so that one bad input fails only its own stage run; a CUDA out-of-memory error
halves the batch and tries again.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded
from numpy.typing import NDArray

from imgpipe.errors import PermanentError, TransientError
from imgpipe.logs import StageRef, bound_stages
from imgpipe.metrics import observe_batch
from imgpipe.stagekinds import STAGE_KINDS
from workers.claims import Claim
from workers.persist import Failure
from workers.stagecontract import BatchRunner, StageInput, StageOutput, StageSkip
from workers.timelimits import ComputeClock, soft_time_limit

__all__ = ["BatchCompute", "Result", "Work", "failure_of", "is_cuda_oom", "stage_ref"]

log = logging.getLogger(__name__)

Result = StageOutput | StageSkip | Failure


def is_cuda_oom(exc: BaseException) -> bool:
    """A device out-of-memory error, by type. torch is looked up, not imported: a process
    that never loaded torch (a CPU stage worker) cannot have raised one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def stage_ref(claim: Claim) -> StageRef:
    return (claim.job_id, claim.stage, claim.attempt, claim.stage_run_id)


@dataclass
class Work:
    """One claimed stage run on its way through load, compute and persist."""

    claim: Claim
    pixels: NDArray[np.uint8] | None = None
    load_ms: float = 0.0
    result: Result | None = None
    compute_ms: float = 0.0
    batch_size: int = 1


def failure_of(claim: Claim, exc: BaseException) -> Failure:
    if isinstance(exc, PermanentError):
        return Failure(str(exc), permanent=True)
    if is_cuda_oom(exc):
        return Failure(f"CUDA out of memory on one image: {exc}", permanent=False)
    if isinstance(exc, SoftTimeLimitExceeded):
        return Failure("stage exceeded its time limit", permanent=False)
    log.exception("stage %s of job %s crashed", claim.stage, claim.job_id, exc_info=exc)
    return Failure(
        f"internal error in stage {claim.stage}: {type(exc).__name__}: {exc}; this is a "
        "bug, please report it with the job id",
        permanent=True,
    )


class BatchCompute:
    """The stage kinds' batch functions of one worker process, and the forward passes."""

    def __init__(self, device: str, compute_clock: ComputeClock) -> None:
        self.device = device
        self.compute_clock = compute_clock
        """The hard time limit of the forward pass in progress (the consumer's watchdog)."""
        self._runners: dict[str, BatchRunner] = {}

    def runner(self, kind: str) -> BatchRunner:
        runner = self._runners.get(kind)
        if runner is None:
            spec = STAGE_KINDS[kind]
            runner = getattr(importlib.import_module(spec.implementation), spec.entry)
            self._runners[kind] = runner
        return runner

    def compute(self, work: Sequence[Work]) -> None:
        by_kind: dict[str, list[Work]] = defaultdict(list)
        for w in work:
            if w.result is None:
                by_kind[w.claim.kind].append(w)
        for kind, group in by_kind.items():
            self._compute_group(kind, group)

    def _compute_group(self, kind: str, group: list[Work]) -> None:
        if len(group) == 1:  # alone (or split down to it): its lines name it
            with bound_stages([stage_ref(group[0].claim)]):
                self._compute_bound(kind, group)
        else:
            self._compute_bound(kind, group)

    def _compute_bound(self, kind: str, group: list[Work]) -> None:
        """One forward pass for the whole group; on a failure that is not transient the
        group is split so that one bad input fails only its own stage run. A CUDA
        out-of-memory error halves the batch and tries again."""
        assert all(w.pixels is not None for w in group)
        inputs = [
            StageInput(
                image=w.pixels,  # type: ignore[arg-type]
                original_size=w.claim.original_size,
                params=w.claim.params,
                upstream=w.claim.upstream,
                device=self.device,
                upstream_kinds=w.claim.upstream_kinds,
            )
            for w in group
        ]
        limits = [w.claim.time_limit_s for w in group if w.claim.time_limit_s]
        limit_s = max(limits) if limits else None
        t0 = time.perf_counter()
        try:
            run = self.runner(kind)  # importing the stage is not stage work
            with self.compute_clock.running(limit_s), soft_time_limit(limit_s):
                results = run(inputs)
        except TransientError as exc:
            if is_cuda_oom(exc.__cause__ or exc) and len(group) > 1:
                self._split(kind, group)
                return
            for w in group:
                w.result = Failure(str(exc), permanent=False)
            return
        except Exception as exc:
            if len(group) > 1:
                self._split(kind, group)
                return
            for w in group:
                w.result = failure_of(w.claim, exc)
            return
        compute_ms = (time.perf_counter() - t0) * 1000
        observe_batch(kind, self.device, len(group))
        for w, result in zip(group, results, strict=True):
            w.result = result
            w.compute_ms = compute_ms / len(group)
            w.batch_size = len(group)

    def _split(self, kind: str, group: list[Work]) -> None:
        half = len(group) // 2
        self._compute_group(kind, group[:half])
        self._compute_group(kind, group[half:])
