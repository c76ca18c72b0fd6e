"""Collect and render in one call: what ``imgpipe report`` and ``imgpipe run --report`` do."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from db.blobs import blob_store_for
from db.engine import session_scope
from imgpipe.decode import DecodeLimits
from imgpipe.face.report.collect import collect_views
from imgpipe.face.report.render import render_page
from imgpipe.settings import Settings

__all__ = ["ReportWritten", "write_report"]


@dataclass(frozen=True)
class ReportWritten:
    path: Path
    jobs: int
    unknown: list[str]
    size_bytes: int


def write_report(settings: Settings, job_ids: Sequence[str], out: Path) -> ReportWritten:
    """Write the HTML report of ``job_ids`` to ``out`` (atomically: a temp file, renamed)."""
    blobs = blob_store_for(settings)
    limits = DecodeLimits.from_settings(settings)
    with session_scope(settings.effective_database_url) as session:
        views, unknown = collect_views(session, blobs, job_ids, limits)
    page = render_page(views, unknown).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(page)
    tmp.replace(out)
    return ReportWritten(out, len(views), unknown, len(page))
