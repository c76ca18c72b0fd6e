"""What the benchmark ran on: machine facts, resident memory per process group, and GPU
utilisation sampled with ``nvidia-smi`` while the stack works (None without a GPU)."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Collection
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "GpuSampler",
    "cpu_model",
    "cpu_s_of_groups",
    "machine_info",
    "rss_mib",
    "rss_mib_of_group",
]

NVIDIA_SMI_TIMEOUT_S = 5.0


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cuda_index(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def _nvidia_smi(fields: str, index: int) -> list[str] | None:
    """One row of ``nvidia-smi --query-gpu`` for GPU ``index``; None if unavailable."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        out = subprocess.run(
            [binary, f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    row = out.strip().splitlines()
    return [v.strip() for v in row[0].split(",")] if row else None


def machine_info(device: str) -> dict[str, Any]:
    index = _cuda_index(device)
    gpu = _nvidia_smi("name,memory.total,driver_version", index) if index is not None else None
    return {
        "platform": platform.platform(),
        "node": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "celery": _dist_version("celery"),
        "device": device,
        "device_name": gpu[0] if gpu else cpu_model(),
        "gpu_memory_total_mib": float(gpu[1]) if gpu else None,
        "gpu_driver": gpu[2] if gpu else None,
    }


def _pages_to_mib(pages: int) -> float:
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def rss_mib(pid: int) -> float | None:
    """Resident memory of one process."""
    try:
        return _pages_to_mib(int(Path(f"/proc/{pid}/statm").read_text().split()[1]))
    except (OSError, IndexError, ValueError):
        return None


def rss_mib_of_group(pgid: int) -> float:
    """Resident memory of every process in process group ``pgid`` (a worker and its pool
    children: the stack starts each child in its own session)."""
    pages = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                pages += int((proc / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return _pages_to_mib(pages)


def cpu_s_of_groups(pgids: Collection[int]) -> float:
    """CPU time (user + system, seconds) used so far by every live process in the process
    groups ``pgids``. Differences of two readings give the CPU a phase cost, a figure that
    does not move with the machine's load the way wall-clock rates do."""
    ticks = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) in pgids:
                ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


class GpuSampler:
    """Samples utilisation and memory of the GPU behind ``device`` every ``interval_s``
    from a thread; ``stop()`` returns the summary, or None without CUDA / nvidia-smi."""

    def __init__(self, device: str, interval_s: float = 0.5) -> None:
        self.index = _cuda_index(device)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> GpuSampler:
        if self.index is not None and shutil.which("nvidia-smi") is not None:
            self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        assert self.index is not None
        while not self._stop.is_set():
            row = _nvidia_smi("utilization.gpu,memory.used", self.index)
            if row is not None:
                with contextlib.suppress(ValueError, IndexError):
                    self.samples.append((float(row[0]), float(row[1])))
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, float | int] | None:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join(NVIDIA_SMI_TIMEOUT_S + 1)
        if not self.samples:
            return None
        util = [u for u, _ in self.samples]
        memory = [m for _, m in self.samples]
        return {
            "samples": len(self.samples),
            "utilization_pct_mean": round(sum(util) / len(util), 1),
            "utilization_pct_max": max(util),
            "memory_used_mib_max": max(memory),
        }
