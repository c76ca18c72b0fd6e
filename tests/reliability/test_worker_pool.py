"""The CPU worker's consumer processes: one killed mid-stage is replaced by its parent,
and the stage it held runs again (the reaper re-dispatches it from SQL)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.models import StageRun
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.face.stack import Stack
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.reliability.test_crashes import failures, photo_jpeg
from tests.support.jobs import wait_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def children_of(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from /proc; zombies are not counted)."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def wait_running_row(
    database_url: str, parent_pid: int | None = None, timeout_s: float = 30
) -> StageRun:
    """A RUNNING stage row; with ``parent_pid``, one running in a live consumer child of it
    (on a loaded machine a row can still name a consumer the hard time limit ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope(database_url) as session:
            rows = session.execute(
                select(StageRun).where(StageRun.status == StageStatus.RUNNING)
            ).scalars()
            live = children_of(parent_pid) if parent_pid is not None else None
            row = next((r for r in rows if live is None or r.worker_pid in live), None)
        if row is not None:
            return row
        time.sleep(0.005)
    raise AssertionError("no stage was seen running in a consumer child")


def kill_a_consumer_mid_stage(database_url: str, parent_pid: int, tries: int = 10) -> StageRun:
    """SIGKILL the consumer running some stage; returns that stage's row as the kill left
    it. A stage that finished between being seen and the kill, or whose consumer was
    already gone, does not count: try another."""
    for _ in range(tries):
        row = wait_running_row(database_url, parent_pid)
        pid = row.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid in children_of(parent_pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        with session_scope(database_url) as session:
            after = session.get(StageRun, row.id)
            assert after is not None
        if after.status == StageStatus.RUNNING and after.worker_pid == pid:
            return after  # the dead process can no longer finish it
    raise AssertionError(f"no stage was caught mid-run in {tries} kills")


def test_a_killed_consumer_process_is_replaced_and_its_stage_runs_again(
    make_stack: Callable[..., Stack], short_deadline_settings: Settings
) -> None:
    stack = make_stack()
    parent = stack.child("cpu").process
    ctx = OrchestratorContext(short_deadline_settings)
    db_url = short_deadline_settings.effective_database_url
    job_ids = [
        submit(ctx, SubmitRequest(data=photo_jpeg(700 + i, (1920, 1080)), pipeline="basic")).job_id
        for i in range(12)
    ]
    interrupted = kill_a_consumer_mid_stage(db_url, parent.pid)
    statuses = wait_jobs(db_url, job_ids, 120)
    assert set(statuses.values()) == {JobStatus.SUCCEEDED}, failures(
        short_deadline_settings, statuses
    )
    assert parent.poll() is None, "the parent outlives its children"
    children = children_of(parent.pid)
    assert len(children) == short_deadline_settings.cpu_concurrency
    assert interrupted.worker_pid not in children, "the killed one was replaced"
    with session_scope(db_url) as session:
        rerun = session.get(StageRun, interrupted.id)
        assert rerun is not None and rerun.status == StageStatus.SUCCEEDED
        assert rerun.attempts >= 2, "the interrupted stage ran again as a new attempt"
        assert rerun.worker_pid != interrupted.worker_pid
