"""Per-process cache of loaded models.

A worker process builds each configured model once (keyed by a string that includes
everything that changes the weights, e.g. ``"nudenet-yolov8n:<path>:<device>"``) and
reuses it for every stage run. Models load lazily on their first ``predict``.

Options that come from the worker's settings (the parameter precision, whether freed
model memory stays in the heap) are set once per process by :func:`configure_models` when
the worker starts (never read at import); the stages read the precision with
:func:`model_precision` and put it in the key. Building the first model of a process sets
the heap thresholds of :mod:`workers.models.heap` (unless configured off), and unloading
idle models hands that memory back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workers.models.base import InferenceModel
from workers.models.heap import retain_freed_memory, return_freed_memory

if TYPE_CHECKING:
    from imgpipe.settings import Settings

__all__ = [
    "cached_model",
    "configure_models",
    "configure_models_from",
    "loaded_models",
    "model_precision",
    "unload_idle_models",
]

_precision = "auto"
_retain_heap = True
_models: dict[str, InferenceModel[Any, Any]] = {}
_lock = threading.Lock()


def configure_models(*, precision: str, retain_heap: bool = True) -> None:
    """Set this process's model options (from ``Settings.model_precision`` and
    ``Settings.model_retain_heap``)."""
    global _precision, _retain_heap
    _precision, _retain_heap = precision, retain_heap


def configure_models_from(settings: Settings) -> None:
    """:func:`configure_models` with this process's settings: what a model worker, the
    anomaly CLI and the stage benchmark all do before building a model."""
    configure_models(precision=settings.model_precision, retain_heap=settings.model_retain_heap)


def model_precision() -> str:
    """The precision models built in this process ask for (``auto`` unless configured)."""
    return _precision


def cached_model(
    key: str, factory: Callable[[], InferenceModel[Any, Any]]
) -> InferenceModel[Any, Any]:
    """The model stored under ``key`` in this process, built by ``factory`` the first time."""
    with _lock:
        model = _models.get(key)
        if model is None:
            if _retain_heap:
                retain_freed_memory()
            model = factory()
            _models[key] = model
        return model


def loaded_models() -> list[InferenceModel[Any, Any]]:
    with _lock:
        return list(_models.values())


def unload_idle_models() -> int:
    """Unload every model idle past its ``idle_unload_s``; returns how many unloaded (their
    memory goes back to the system)."""
    unloaded = sum(1 for model in loaded_models() if model.unload_if_idle())
    if unloaded:
        return_freed_memory()
    return unloaded
