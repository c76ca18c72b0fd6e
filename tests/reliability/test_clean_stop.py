"""SIGTERM to ``imgpipe up`` (what systemd, docker and supervisors send) stops every
process it started, with a warm shutdown of the workers: nothing is left running, no
stage is left half-run, and every job finishes on the next start."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.migrate import upgrade
from db.models import StageRun
from imgpipe.contracts import JobStatus, StageStatus
from imgpipe.settings import Settings
from orchestrator.context import OrchestratorContext
from orchestrator.submit import SubmitRequest, submit
from tests.reliability.test_crashes import failures, photo_jpeg
from tests.reliability.test_worker_pool import wait_running_row
from tests.support.jobs import wait_jobs
from tests.support.services import own_database, short_tmp_dir
from tests.support.upstack import REPO, UpProcess, alive, descendants, processes_with_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.one_backend("sqlite")]

STAGE_LIMITS_S = '{"quality": 20, "enhance": 20, "detect": 60, "anomaly": 60, "moderate": 60}'


@pytest.fixture
def up_env(database_url: str) -> Iterator[tuple[dict[str, str], Settings]]:
    """The environment of an ``imgpipe up`` on a fresh data dir and database, and the same
    settings for this test process."""
    data_dir = short_tmp_dir("ipup-")
    with own_database(database_url) as db_url:
        upgrade(db_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
        env |= {
            "IMGPIPE_DATA_DIR": str(data_dir),
            "IMGPIPE_DATABASE_URL": db_url,
            "IMGPIPE_STAGE_TIME_LIMITS_S": STAGE_LIMITS_S,
            "IMGPIPE_DISPATCH_TIMEOUT_S": "3",
            "IMGPIPE_DISPATCH_GRACE_S": "1",
            "IMGPIPE_REAPER_INTERVAL_S": "0.5",
        }
        yield env, Settings(data_dir=data_dir, database_url=db_url)
    leftovers = processes_with_env(f"IMGPIPE_DATA_DIR={data_dir}")
    for pid in leftovers:  # a failed test must not leave a stack behind
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(data_dir, ignore_errors=True)


def stop_and_check_nothing_is_left(up: UpProcess, data_dir: Path) -> None:
    tree = descendants(up.pid)
    assert len(tree) >= 6, f"redis, orchestrator, cpu pool, ingest, gpu worker: {tree}"
    code = up.stop(signal.SIGTERM)
    assert code == 0, f"documented: exit 0 after a clean stop\n{up.output()[-3000:]}"
    assert alive(tree) == set(), "every process the stack started is gone"
    assert processes_with_env(f"IMGPIPE_DATA_DIR={data_dir}") == set()
    output = up.output()
    assert "every process it started has stopped" in output
    steps = [output.index(f"stopping {name}") for name in ("ingest", "cpu", "orchestrator")]
    assert steps == sorted(steps), "ingest, then the stage workers, then the orchestrator"


def test_sigterm_stops_every_process_and_no_job_is_lost(
    up_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    env, settings = up_env
    db_url = settings.effective_database_url
    up = UpProcess(env, tmp_path / "up-1.out", ["--no-flower", "--device", "cpu"])
    try:
        up.wait_ready()
        ctx = OrchestratorContext(settings)
        job_ids = [
            submit(ctx, SubmitRequest(data=photo_jpeg(900 + i, (1920, 1080)), pipeline="basic"))
            .job_id
            for i in range(12)
        ]  # fmt: skip
        wait_running_row(db_url, timeout_s=120)  # SIGTERM with work in flight
        stop_and_check_nothing_is_left(up, settings.resolved_data_dir)
    finally:
        if up.process.poll() is None:
            up.kill_everything()
    with session_scope(db_url) as session:
        rows = list(session.execute(select(StageRun)).scalars())
        assert [r.id for r in rows if r.status == StageStatus.RUNNING] == [], (
            "a warm shutdown finishes the stages in hand or hands them back"
        )

    up = UpProcess(env, tmp_path / "up-2.out", ["--no-flower", "--device", "cpu"])
    try:
        up.wait_ready()
        statuses = wait_jobs(db_url, job_ids, 180)
        assert set(statuses.values()) == {JobStatus.SUCCEEDED}, failures(settings, statuses)
        stop_and_check_nothing_is_left(up, settings.resolved_data_dir)
    finally:
        if up.process.poll() is None:
            up.kill_everything()
    with session_scope(db_url) as session:
        attempts = {
            (r.job_id, r.stage): r.attempts for r in session.execute(select(StageRun)).scalars()
        }
    assert set(attempts.values()) == {1}, f"no stage burned an attempt on the stop: {attempts}"


def test_sigterm_to_imgpipe_run_stops_its_stack_and_exits_143(
    up_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    env, settings = up_env
    images = []
    for i in range(16):
        images.append(tmp_path / f"photo-{i}.jpg")
        images[-1].write_bytes(photo_jpeg(1300 + i, (1920, 1080)))
    with (tmp_path / "run.out").open("wb") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "imgpipe", "run", "--pipeline", "basic", *map(str, images)],
            cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_running_row(settings.effective_database_url, timeout_s=180)
        tree = descendants(run.pid)
        assert len(tree) >= 4, f"redis, orchestrator, cpu pool: {tree}"
        os.kill(run.pid, signal.SIGTERM)
        assert run.wait(300) == 143, (tmp_path / "run.out").read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert alive(tree) == set()
    assert processes_with_env(f"IMGPIPE_DATA_DIR={settings.resolved_data_dir}") == set()
    assert "stopped by SIGTERM" in (tmp_path / "run.out").read_text()
