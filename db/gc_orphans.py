"""Blobs no row names, past a retention period: ``imgpipe gc`` (with db/gc.py).

A blob can end up named by nothing: a submission whose transaction failed after its
blobs were written, a working copy released by ``collect_working_copies`` and shared no
more, a dead letter's parked upload (orchestrator/ingest_dead.py) once it left the
dead-letter stream, the ``.tmp-`` file of a write that crashed. Such a blob is deleted
once it is older (file mtime) than the retention period and no images row, stage run
(``output_blob_key`` or any key in its output JSON) or dead letter names it.

Racing a submission of the same bytes is safe: ``put`` refreshes an existing blob's
mtime before its row commits (db/blobs.py), and deleting is two-phase: the candidates
are moved into ``<root>/.trash``, the references are read again, and a candidate that is
named now or whose mtime was refreshed before the move is moved back; only the rest is
unlinked. A ``put`` after the move finds no file and writes it anew.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from db.blobs import LocalBlobStore
from db.engine import session_scope
from db.models import Image, StageRun

__all__ = ["OrphanReport", "collect_orphans", "referenced_keys"]

TRASH_DIR = ".trash"
_KEY_PREFIX = "sha256/"


@dataclass
class OrphanReport:
    scanned: int = 0
    """Blob files looked at."""
    referenced: int = 0
    young: int = 0
    """Unreferenced but newer than the retention period: kept."""
    restored: int = 0
    """Named again (or refreshed) while being deleted: moved back."""
    deleted: int = 0
    """Deleted (with ``dry_run``: would be)."""
    bytes: int = 0
    """Bytes of ``deleted``."""
    keys: list[str] = field(default_factory=list)


def _json_keys(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value.startswith(_KEY_PREFIX):
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _json_keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_keys(item)


def referenced_keys(database_url: str) -> set[str]:
    """Every blob key a row names (images, stage outputs), read in one transaction."""
    keys: set[str] = set()
    with session_scope(database_url) as session:
        for blob, working in session.execute(select(Image.blob_key, Image.working_blob_key)):
            keys.add(blob)
            if working is not None:
                keys.add(working)
        rows = session.execute(
            select(StageRun.output_blob_key, StageRun.output).execution_options(yield_per=2000)
        )
        for blob_key, output in rows:
            if blob_key is not None:
                keys.add(blob_key)
            keys.update(_json_keys(output))
    return keys


def collect_orphans(
    database_url: str,
    store: LocalBlobStore,
    retention_s: float,
    *,
    dry_run: bool = True,
    also_referenced: Iterable[str] = (),
) -> OrphanReport:
    """Delete (``dry_run``: list) blobs no row names that are older than ``retention_s``;
    ``also_referenced`` are kept too (dead letters' parked uploads)."""
    report = OrphanReport()
    cutoff = time.time() - retention_s
    extra = set(also_referenced)
    named = referenced_keys(database_url) | extra
    candidates: list[tuple[str, Path, int]] = []
    for key, path, info in store.iter_blobs():
        report.scanned += 1
        if key in named:
            report.referenced += 1
        elif info.st_mtime >= cutoff:
            report.young += 1
        else:
            candidates.append((key, path, info.st_size))
    if dry_run:
        report.deleted = len(candidates)
        report.bytes = sum(size for _, _, size in candidates)
        report.keys = [key for key, _, _ in candidates]
        return report
    trash = store.root / TRASH_DIR
    trash.mkdir(exist_ok=True)
    moved: list[tuple[str, Path, Path]] = []
    for key, path, _size in candidates:
        parked = trash / path.name
        try:
            os.rename(path, parked)
        except FileNotFoundError:
            continue
        moved.append((key, path, parked))
    named_now = referenced_keys(database_url) | extra
    for key, path, parked in moved:
        info = parked.stat()
        if key in named_now or info.st_mtime >= cutoff:
            if path.exists():  # a put wrote it anew meanwhile: same content
                parked.unlink()
            else:
                os.rename(parked, path)
            report.restored += 1
            continue
        parked.unlink()
        report.deleted += 1
        report.bytes += info.st_size
        report.keys.append(key)
    return report
