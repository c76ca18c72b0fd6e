"""Set-up of a stage worker process: its executor, and torch for a model worker.

Stage messages are Celery messages (task ``imgpipe.stage.<kind>(stage_run_id)``, JSON),
consumed by name by the batching consumers (workers/batching.py); there are no Celery
task objects on this side. The behaviour lives in workers/execute.py."""

from __future__ import annotations

import logging

from celery import Celery

from imgpipe.celery_app import settings_of
from workers.execute import StageExecutor

__all__ = ["make_executor"]

log = logging.getLogger(__name__)


def make_executor(app: Celery, device: str | None) -> StageExecutor:
    """The executor of this worker process; a model worker also configures torch here,
    in the process that will run the models (CUDA initialises in it, not in a parent)."""
    settings = settings_of(app)
    if device is None:
        executor = StageExecutor(settings, "cpu")
    else:
        from workers.devices import configure_torch, start_idle_unloader
        from workers.models.base import add_load_listener
        from workers.models.registry import configure_models_from

        configure_torch(device, settings.model_cpu_threads)
        configure_models_from(settings)
        start_idle_unloader()
        executor = StageExecutor(settings, device)
        # the models row is written when a model first loads in this process
        add_load_listener(lambda info: executor.record_model(info.to_json()))
    executor.use_app(app)
    return executor
