"""Celery tasks: one per stage kind, each three lines. The behaviour lives in
workers/execute.py (claim, provenance, retries, advance)."""

from __future__ import annotations

import logging

from celery import Task, shared_task

from imgpipe.celery_app import settings_of
from imgpipe.contracts import ADVANCE_TASK, CONTROL_QUEUE, Priority, queue_for, stage_task_name
from workers.execute import Outcome, StageExecutor

__all__ = ["DEVICE_CONF_KEY", "StageTask"]

log = logging.getLogger(__name__)

DEVICE_CONF_KEY = "imgpipe_device"


class StageTask(Task):  # type: ignore[misc]
    """Base of every stage task: one executor per worker process."""

    _executor: StageExecutor | None = None
    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True

    @property
    def executor(self) -> StageExecutor:
        if StageTask._executor is None:
            settings = settings_of(self.app)
            device = self.app.conf.get(DEVICE_CONF_KEY)
            if device is not None:  # a model worker: configure torch in this pool child
                from workers.devices import configure_torch, start_idle_unloader
                from workers.models.base import add_load_listener

                configure_torch(str(device), settings.model_cpu_threads)
                start_idle_unloader()
                executor = StageExecutor(settings, str(device))
                # the models row is written when a model first loads in this process
                add_load_listener(lambda info: executor.record_model(info.to_json()))
                StageTask._executor = executor
            else:
                StageTask._executor = StageExecutor(settings, "cpu")
        return StageTask._executor

    def execute_stage(self, stage_run_id: int) -> str:
        outcome: Outcome = self.executor.run(stage_run_id, self.request.id)
        if outcome.retry_in_s is not None:
            raise self.retry(countdown=outcome.retry_in_s, max_retries=None)
        if outcome.advance and outcome.job_id is not None:
            queue = queue_for(CONTROL_QUEUE, Priority(outcome.priority or Priority.INTERACTIVE))
            self.app.send_task(ADVANCE_TASK, args=[outcome.job_id], queue=queue)
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
