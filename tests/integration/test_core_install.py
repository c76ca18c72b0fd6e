"""The core install: the CLI, the orchestrator and the CPU worker run without torch, and
asking for a model stage there says which extra to install. Each check runs Python in a
subprocess whose imports of torch, torchvision and the model weight packages fail
(tests/support/notorch/sitecustomize.py), as on a host installed without the extra."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.services import short_tmp_dir

REPO = Path(__file__).resolve().parents[2]
NO_TORCH = REPO / "tests" / "support" / "notorch"
SAMPLE = REPO / "samples" / "astronaut.jpg"


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    env["PYTHONPATH"] = f"{NO_TORCH}{os.pathsep}{REPO}"
    env["IMGPIPE_DATA_DIR"] = str(data_dir)
    return env


def _python(
    args: list[str], data_dir: Path, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=data_dir,
        env=_env(data_dir),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_the_blocker_works(tmp_path: Path) -> None:
    done = _python(["-c", "import torch"], tmp_path)
    assert done.returncode == 1
    assert "No module named 'torch' (blocked)" in done.stderr


def test_cli_orchestrator_and_cpu_worker_import_without_torch(tmp_path: Path) -> None:
    helped = _python(["-m", "imgpipe", "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "up", "orchestrator", "worker", "ingest", "db"):
        assert command in helped.stdout
    code = (
        "import sys\n"
        "import imgpipe, imgpipe.face.cli, imgpipe.face.workerproc, imgpipe.face.stack\n"
        "import orchestrator, orchestrator.tasks, orchestrator.context, orchestrator.reaper\n"
        "import orchestrator.ingest, orchestrator.submit\n"
        "import workers.process, workers.pool, workers.batching, workers.stages.classical\n"
        "from celery import Celery\n"
        "from imgpipe.settings import Settings\n"
        "from workers.process import make_executor\n"
        "from imgpipe.celery_app import create_app\n"
        "make_executor(create_app(Settings()), None)  # the cpu worker's executor\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision', 'nudenet'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    imported = _python(["-c", code], tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "ok"


def test_a_model_stage_without_torch_names_the_extra(tmp_path: Path) -> None:
    worker = _python(["-m", "imgpipe", "worker", "gpu", "--device", "cpu"], tmp_path)
    assert worker.returncode == 2, worker.stderr
    said = " ".join(worker.stderr.split())  # rich wraps lines at the terminal's width
    assert "needs torch and torchvision" in said
    assert "pip install 'imgpipe[models]'" in said
    run = _python(["-m", "imgpipe", "run", str(SAMPLE), "--pipeline", "full"], tmp_path)
    assert run.returncode == 2, run.stderr
    said = " ".join(run.stderr.split())
    assert "missing module(s) torch, torchvision" in said
    assert "pip install 'imgpipe[models]'" in said
    fit = _python(["-m", "imgpipe", "anomaly", "fit", "p.npz", str(SAMPLE)], tmp_path)
    assert fit.returncode == 2, fit.stderr
    assert "imgpipe anomaly fit needs torch" in " ".join(fit.stderr.split())
    pipelines = _python(["-m", "imgpipe", "pipelines"], tmp_path)
    assert pipelines.returncode == 0, pipelines.stderr
    assert "imgpipe[models" in pipelines.stdout.replace("\n", "").replace(" ", "")


def test_a_basic_job_runs_through_orchestrator_and_cpu_worker_without_torch() -> None:
    """`imgpipe run --pipeline basic`: the embedded broker, the orchestrator and the CPU
    worker processes, every one of them unable to import torch."""
    data_dir = short_tmp_dir("ipnt-")
    try:
        run = _python(
            ["-m", "imgpipe", "run", str(SAMPLE), "--pipeline", "basic", "--json"], data_dir
        )
        assert run.returncode == 0, run.stderr[-4000:]
        assert '"status": "succeeded"' in run.stdout
        logs = "".join(p.read_text(errors="replace") for p in data_dir.rglob("*.log"))
        assert "(blocked)" not in logs, "a process of the core stack tried to import torch"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
