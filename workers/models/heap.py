"""glibc heap settings for a process that runs models on the CPU.

A forward pass allocates and frees activations of 1-50 MiB per call. glibc serves blocks
above its mmap threshold (128 KiB, raised on the fly up to 32 MiB) with fresh ``mmap``
pages and returns them on ``free``, and it trims the heap's top past 2x that threshold:
every call then page-faults its activations in again. The anomaly stage as a model worker
runs it (``benchmarks.anomaly_stage_loop``, 2-vCPU Xeon VM, medians of 5 runs alternated
with the setting off) took 20.4 against 25.9 ms/crop at batch 1 and 17.7 against 18.1 at
batch 8 with the two thresholds below, in half the system time (1.4 against 2.3 s, 1.6
against 3.2 s); 20-50 MiB more resident memory (docs/anomaly.md "Speed", fifth session of
2026-12-01).

:func:`retain_freed_memory` raises the mmap threshold to 256 MiB (32 MiB, glibc's older
limit, where that is refused) and the trim threshold to 1 GiB, once per process; memory
freed by models then stays in the heap for the next call. Setting the trim threshold alone
would be much worse: it switches the threshold's on-the-fly raising off, so every block
over 128 KiB would be mapped and unmapped (37.7 against 14.8 ms/crop in one paired
measurement), which is why the mmap
threshold is set first and the trim threshold only if that succeeded.
:func:`return_freed_memory` hands the retained memory back (after models are unloaded).
A process whose environment sets its own glibc malloc options is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

__all__ = ["retain_freed_memory", "return_freed_memory"]

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = (256 << 20, 32 << 20)
"""Tried in order: glibc 2.36 accepts 256 MiB, older ones stop at 32 MiB on 64-bit."""
TRIM_THRESHOLD_BYTES = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_lock = threading.Lock()
_state: dict[str, bool] = {}


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None  # not glibc (musl has no mallopt; macOS has neither)
    return libc


def _user_has_settings() -> bool:
    if any(name in os.environ for name in _USER_SETTINGS):
        return True
    return "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def retain_freed_memory() -> bool:
    """Keep memory freed by model calls in this process's heap (see the module); once per
    process. True when the thresholds are set (now or by an earlier call)."""
    with _lock:
        if "retained" in _state:
            return _state["retained"]
        _state["retained"] = False
        if _user_has_settings():
            log.info("glibc malloc options come from the environment; heap thresholds unchanged")
            return False
        libc = _glibc()
        if libc is None:
            return False
        mmap_set = any(libc.mallopt(M_MMAP_THRESHOLD, size) == 1 for size in MMAP_THRESHOLD_BYTES)
        if not mmap_set:
            return False
        _state["retained"] = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        return _state["retained"]


def return_freed_memory() -> None:
    """Give the heap's free memory back to the system (``malloc_trim``), if
    :func:`retain_freed_memory` kept it."""
    with _lock:
        if not _state.get("retained"):
            return
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
