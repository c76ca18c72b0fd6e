"""Per-process cache of loaded models.

A worker process builds each configured model once (keyed by a string that includes
everything that changes the weights, e.g. ``"nudenet-yolov8n:<path>:<device>"``) and
reuses it for every stage run. Models load lazily on their first ``predict``.

Options that come from the worker's settings (the parameter precision) are set once per
process by :func:`configure_models` when the worker starts (never read at import); the
stages read them with :func:`model_precision` and put them in the key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from workers.models.base import InferenceModel

__all__ = [
    "cached_model",
    "configure_models",
    "loaded_models",
    "model_precision",
    "unload_idle_models",
]

_precision = "auto"
_models: dict[str, InferenceModel[Any, Any]] = {}
_lock = threading.Lock()


def configure_models(*, precision: str) -> None:
    """Set this process's model options (from ``Settings.model_precision``)."""
    global _precision
    _precision = precision


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
            model = factory()
            _models[key] = model
        return model


def loaded_models() -> list[InferenceModel[Any, Any]]:
    with _lock:
        return list(_models.values())


def unload_idle_models() -> int:
    """Unload every model idle past its ``idle_unload_s``; returns how many unloaded."""
    return sum(1 for model in loaded_models() if model.unload_if_idle())
