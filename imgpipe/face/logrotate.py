"""Size-bounded log files for the children of ``imgpipe up`` / ``imgpipe run``.

A child writes its stdout and stderr straight into ``data_dir/logs/<name>.log`` (opened
with O_APPEND, so its writes always land at the current end). ``rotate_if_large`` copies
a file past ``max_bytes`` to ``<name>.log.1`` (older copies shift to ``.2`` ... up to
``backups``) and truncates it in place — logrotate's *copytruncate*: the child keeps its
descriptor and simply continues at the start of the emptied file. Lines written between
the copy and the truncation (microseconds) are lost; nothing else is. The stack's
supervisor thread calls it every tick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = ["rotate_all", "rotate_if_large"]

log = logging.getLogger(__name__)


def rotate_all(paths: Iterable[Path], max_bytes: int, backups: int) -> None:
    """``rotate_if_large`` for each path; an error is logged (a full disk must not stop
    the supervisor that calls this)."""
    for path in paths:
        try:
            rotate_if_large(path, max_bytes, backups)
        except OSError as exc:
            log.warning("could not rotate %s: %s; free disk space or check permissions", path, exc)


def rotate_if_large(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate ``path`` if it holds more than ``max_bytes``; True if it did."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups > 0:
        for index in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{index}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with contextlib.suppress(FileNotFoundError), path.open("r+b") as log_file:
        log_file.truncate(0)
    return True
