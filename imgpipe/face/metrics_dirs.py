"""Directories of prometheus_client's multi-process mode (imgpipe/metrics.py).

Nothing here imports prometheus_client: it chooses its value store when first imported,
so ``PROMETHEUS_MULTIPROC_DIR`` must be set before that, in the process that forks the
recording children.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from imgpipe.settings import Settings

__all__ = ["MULTIPROC_ENV", "fresh_multiproc_dir", "standalone_multiproc_dir"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def fresh_multiproc_dir(path: Path) -> Path:
    """An empty directory for the metric files of a new set of processes."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def standalone_multiproc_dir(settings: Settings, role: str) -> Path:
    """The multi-process directory of a standalone worker: ``PROMETHEUS_MULTIPROC_DIR`` if
    set, else ``data_dir/metrics/<role>-<pid>`` (those of workers no longer running are
    removed). Sets the variable: do this before anything imports prometheus_client's
    metrics in this process or forks a recording child."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        return Path(given)
    base = settings.resolved_data_dir / "metrics"
    if base.is_dir():
        for old in base.glob(f"{role}-*"):
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    path = fresh_multiproc_dir(base / f"{role}-{os.getpid()}")
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
