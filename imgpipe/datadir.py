"""Where the stack's data lives when ``IMGPIPE_DATA_DIR`` is not set.

A relative ``.imgpipe/`` meant that ``imgpipe status JOB`` run from another directory
looked at another (empty) stack. The default is now found the way git finds ``.git``:

1. the nearest directory, from the current one up to ``/``, that holds a ``.imgpipe/``
   directory (a project-local stack, e.g. the one ``make demo`` makes in the checkout);
2. otherwise the per-user data directory ``$XDG_DATA_HOME/imgpipe`` (XDG's default
   ``~/.local/share/imgpipe``), the same from every directory.

``IMGPIPE_DATA_DIR`` still wins (a relative value is resolved against the current
directory, as before); ``imgpipe up`` prints the directory it uses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["LOCAL_DIR_NAME", "default_data_dir", "nearest_local_data_dir", "user_data_dir"]

LOCAL_DIR_NAME = ".imgpipe"


def nearest_local_data_dir(start: Path) -> Path | None:
    """``start/.imgpipe`` or that of its nearest ancestor, if one is a directory."""
    here = start.resolve()
    for directory in (here, *here.parents):
        candidate = directory / LOCAL_DIR_NAME
        if candidate.is_dir():
            return candidate
    return None


def user_data_dir(environ: Mapping[str, str]) -> Path:
    """``$XDG_DATA_HOME/imgpipe``, or ``~/.local/share/imgpipe`` when it is unset or
    relative (the XDG base directory specification ignores relative values)."""
    xdg = environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "imgpipe"


def default_data_dir(start: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The data directory used when ``IMGPIPE_DATA_DIR`` is unset (module docstring)."""
    local = nearest_local_data_dir(start if start is not None else Path.cwd())
    if local is not None:
        return local
    return user_data_dir(os.environ if environ is None else environ)
