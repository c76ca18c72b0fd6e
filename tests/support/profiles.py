"""Reading and rewriting anomaly profile files in tests (a profile is a plain ``.npz``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["read_profile_arrays", "write_profile_arrays"]


def read_profile_arrays(path: Path | str) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
    """Every array of the profile file at ``path``, and its decoded ``meta`` record."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(arrays["meta"].tobytes())


def write_profile_arrays(
    path: Path, arrays: dict[str, NDArray[Any]], meta: dict[str, Any] | None = None
) -> Path:
    """Write ``arrays`` (with ``meta`` encoded in place of theirs when given) as a profile
    file at ``path``; returns ``path``."""
    if meta is not None:
        arrays = {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return path
