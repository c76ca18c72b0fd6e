"""The Celery task of the ``noop`` stage kind (benchmarks only), the same three lines as
every stage task in workers/tasks.py. Kept apart so that the stage tasks module is not
touched for a benchmark kind; the cpu worker includes both modules."""

from __future__ import annotations

from celery import shared_task

from imgpipe.contracts import stage_task_name
from workers.tasks import StageTask

__all__ = ["noop"]


@shared_task(name=stage_task_name("noop"), bind=True, base=StageTask)
def noop(self: StageTask, stage_run_id: int) -> str:
    return self.execute_stage(stage_run_id)
