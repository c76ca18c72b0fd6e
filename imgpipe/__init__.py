"""imgpipe: every uploaded image becomes a DAG of Celery tasks with results in SQL.

This file is the package's front door, not kernel code: ``imgpipe.submit``, ``wait`` and
``results`` are the face's Python API (``imgpipe/face/api.py``), loaded on first use, so
importing a kernel module (``imgpipe.settings``, ``imgpipe.contracts`` ...) loads nothing
of the face, and ``import imgpipe`` loads no torch and no orchestrator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from imgpipe.errors import ImgpipeError, PermanentError, TransientError
from imgpipe.settings import Settings

if TYPE_CHECKING:
    from imgpipe.face.api import results, submit, wait

__all__ = [
    "ImgpipeError",
    "PermanentError",
    "Settings",
    "TransientError",
    "results",
    "submit",
    "wait",
]

_FACE_API = frozenset({"results", "submit", "wait"})


def __getattr__(name: str) -> Any:
    if name in _FACE_API:
        return getattr(importlib.import_module("imgpipe.face.api"), name)
    raise AttributeError(f"module 'imgpipe' has no attribute {name!r}")
