"""imgpipe: every uploaded image becomes a DAG of Celery tasks with results in SQL.

Importing this package is cheap (no torch, no orchestrator): the API functions import
their layers when called.
"""

from __future__ import annotations

from imgpipe.errors import ImgpipeError, PermanentError, TransientError
from imgpipe.face.api import results, submit, wait
from imgpipe.settings import Settings

__all__ = [
    "ImgpipeError",
    "PermanentError",
    "Settings",
    "TransientError",
    "results",
    "submit",
    "wait",
]
