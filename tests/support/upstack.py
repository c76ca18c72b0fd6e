"""``imgpipe up`` as a real subprocess (its own session, like under a supervisor), and
what tests read about its process tree from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["UpProcess", "alive", "cmdline", "descendants", "processes_with_env"]

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "imgpipe up: ready"


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pids: Iterable[int]) -> set[int]:
    """The pids of ``pids`` that still run (zombies do not count)."""
    found = set()
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None and fields[0] != "Z":
            found.add(pid)
    return found


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, theirs, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def processes_with_env(marker: str) -> set[int]:
    """Live processes of this user whose environment holds ``marker`` (``NAME=value``):
    finds what a stack started even after it was re-parented to init."""
    found = set()
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as env:
                variables = env.read().split(b"\0")
        except OSError:
            continue
        if needle in variables and alive([int(entry)]):
            found.add(int(entry))
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid`` as ``ps`` shows it ("" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class UpProcess:
    """``python -m imgpipe up ARGS`` with ``env``; stdout and stderr go to ``out_path``."""

    def __init__(self, env: dict[str, str], out_path: Path, args: Iterable[str] = ()) -> None:
        self.out_path = out_path
        # The HTTP API on a free port: parallel stacks must not fight over 8780.
        env = {"IMGPIPE_API_PORT": "0", **env, "PYTHONPATH": str(REPO)}
        with out_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imgpipe", "up", *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Until it prints its ready line; AssertionError (with its output) if it exits
        first or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"imgpipe up not ready (exit {self.process.poll()}):\n{self.output()[-4000:]}"
                )
            time.sleep(0.2)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 300) -> int:
        """Send ``sig`` to the main process only; its exit code."""
        os.kill(self.pid, sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            raise AssertionError(
                f"imgpipe up still running {timeout_s:.0f} s after {sig.name}"
            ) from None

    def kill_everything(self) -> None:
        """Clean-up after a failed test: SIGKILL the whole tree."""
        for pid in [self.pid, *descendants(self.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(30)
