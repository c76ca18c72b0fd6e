"""Per-process cache of loaded models.

A worker process builds each configured model once (keyed by a string that includes
everything that changes the weights, e.g. ``"nudenet-yolov8n:<path>:<device>"``) and
reuses it for every stage run. Models load lazily on their first ``predict``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from workers.models.base import InferenceModel

__all__ = ["cached_model", "loaded_models", "unload_idle_models"]

_models: dict[str, InferenceModel[Any, Any]] = {}
_lock = threading.Lock()


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
