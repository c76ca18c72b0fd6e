"""Device set-up for model workers, done once in each pool child (never in the parent,
so CUDA is initialised in the child only)."""

from __future__ import annotations

import logging
import os
import threading
import time

import torch

from imgpipe.errors import ConfigError

__all__ = ["configure_torch", "record_gpu_memory", "start_idle_unloader"]

log = logging.getLogger(__name__)


def configure_torch(device: str, cpu_threads: int | None) -> None:
    """Validate ``device`` and size torch's thread pool for CPU inference."""
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device} requested but CUDA is not available in this process; "
                "start the model worker with --device cpu or on a machine with a GPU"
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device} requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
        torch.cuda.set_device(target)
        return
    threads = cpu_threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    log.info("model worker on %s with %d torch thread(s)", device, threads)


_unloader_started = False


def start_idle_unloader(interval_s: float = 60.0) -> None:
    """In this process, unload models idle past their ``idle_unload_s`` (frees GPU memory)."""
    global _unloader_started
    if _unloader_started:
        return
    _unloader_started = True

    def loop() -> None:
        from workers.models.registry import unload_idle_models

        while True:
            time.sleep(interval_s)
            try:
                unloaded = unload_idle_models()
            except Exception:  # keep the thread alive whatever one model does
                log.exception("idle model unload failed")
                continue
            if unloaded:
                log.info("unloaded %d idle model(s)", unloaded)

    threading.Thread(target=loop, name="imgpipe-idle-unloader", daemon=True).start()


def record_gpu_memory(device: str) -> None:
    """Prometheus gauge of the torch allocator's memory on ``device`` (a few µs: the
    allocator's own counters, no device synchronisation)."""
    from imgpipe.metrics import GPU_MEMORY_BYTES

    GPU_MEMORY_BYTES.labels(device, "allocated").set(torch.cuda.memory_allocated(device))
    GPU_MEMORY_BYTES.labels(device, "reserved").set(torch.cuda.memory_reserved(device))
