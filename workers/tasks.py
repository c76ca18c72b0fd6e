"""Celery tasks: one per stage kind, each three lines. The behaviour lives in
workers/execute.py (claim, provenance, retries, the DAG step) and the same executor
serves the micro-batching model worker (workers/batching.py)."""

from __future__ import annotations

import logging

from celery import Celery, Task, shared_task

from imgpipe.celery_app import settings_of
from imgpipe.contracts import stage_task_name
from imgpipe.errors import TransientError
from workers.execute import Outcome, StageExecutor

__all__ = ["DEVICE_CONF_KEY", "StageTask", "make_executor"]

log = logging.getLogger(__name__)

DEVICE_CONF_KEY = "imgpipe_device"
CLAIM_RETRY_S = 2.0
"""Delay before a message whose claim or persist could not reach the database is retried."""


def make_executor(app: Celery, device: str | None) -> StageExecutor:
    """The executor of this worker process; a model worker also configures torch here,
    in the process that will run the models (CUDA initialises in it, not in a parent)."""
    settings = settings_of(app)
    if device is None:
        executor = StageExecutor(settings, "cpu")
    else:
        from workers.devices import configure_torch, start_idle_unloader
        from workers.models.base import add_load_listener
        from workers.models.registry import configure_models

        configure_torch(device, settings.model_cpu_threads)
        configure_models(precision=settings.model_precision)
        start_idle_unloader()
        executor = StageExecutor(settings, device)
        # the models row is written when a model first loads in this process
        add_load_listener(lambda info: executor.record_model(info.to_json()))
    executor.use_app(app)
    return executor


class StageTask(Task):  # type: ignore[misc]
    """Base of every stage task: one executor per worker process."""

    _executor: StageExecutor | None = None
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True

    @property
    def executor(self) -> StageExecutor:
        if StageTask._executor is None:
            device = self.app.conf.get(DEVICE_CONF_KEY)
            StageTask._executor = make_executor(self.app, None if device is None else str(device))
        return StageTask._executor

    def execute_stage(self, stage_run_id: int) -> str:
        try:
            outcome: Outcome = self.executor.run(stage_run_id, self.request.id)
        except TransientError as exc:
            log.warning("stage run %s: %s; retrying in %.0f s", stage_run_id, exc, CLAIM_RETRY_S)
            raise self.retry(countdown=CLAIM_RETRY_S, max_retries=None) from exc
        if outcome.retry_in_s is not None:
            raise self.retry(countdown=outcome.retry_in_s, max_retries=None)
        return outcome.status


@shared_task(name=stage_task_name("quality"), bind=True, base=StageTask)
def quality(self: StageTask, stage_run_id: int) -> str:
    return self.execute_stage(stage_run_id)


@shared_task(name=stage_task_name("enhance"), bind=True, base=StageTask)
def enhance(self: StageTask, stage_run_id: int) -> str:
    return self.execute_stage(stage_run_id)


@shared_task(name=stage_task_name("detect"), bind=True, base=StageTask)
def detect(self: StageTask, stage_run_id: int) -> str:
    return self.execute_stage(stage_run_id)


@shared_task(name=stage_task_name("anomaly"), bind=True, base=StageTask)
def anomaly(self: StageTask, stage_run_id: int) -> str:
    return self.execute_stage(stage_run_id)


@shared_task(name=stage_task_name("moderate"), bind=True, base=StageTask)
def moderate(self: StageTask, stage_run_id: int) -> str:
    return self.execute_stage(stage_run_id)


@shared_task(name=stage_task_name("noop"), bind=True, base=StageTask)
def noop(self: StageTask, stage_run_id: int) -> str:
    """Benchmarks only (``imgpipe bench --stages noop``): the stage path with no compute."""
    return self.execute_stage(stage_run_id)
