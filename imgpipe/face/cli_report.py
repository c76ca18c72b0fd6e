"""The ``imgpipe report`` command: a self-contained HTML page of jobs (imgpipe/face/report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from imgpipe.face.cli_console import console, fail
from imgpipe.settings import Settings

__all__ = ["register", "report"]

DEFAULT_SINCE_LIMIT = 200


def report(
    jobs: Annotated[list[str] | None, typer.Argument(help="Job ids to show.")] = None,
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")] = Path(
        "imgpipe-report.html"
    ),
    since: Annotated[
        str | None, typer.Option(help="Jobs created in the last DURATION (30m, 2h, 1d).")
    ] = None,
    limit: Annotated[
        int, typer.Option(help="With --since: at most this many jobs (the newest).")
    ] = DEFAULT_SINCE_LIMIT,
) -> None:
    """Write a self-contained HTML page (no external assets) of JOBS or of the jobs since
    DURATION: thumbnails, boxes, heat map, quality, moderation scores, stage timings."""
    from db.engine import session_scope
    from imgpipe.face.report import job_ids_since, parse_duration, write_report

    settings = Settings()
    if bool(jobs) == (since is not None):
        raise fail("give job ids or --since DURATION (one of the two), e.g. `--since 1h`")
    job_ids = list(jobs or [])
    if since is not None:
        try:
            window = parse_duration(since)
        except ValueError as exc:
            raise fail(str(exc)) from None
        with session_scope(settings.effective_database_url) as session:
            job_ids = job_ids_since(session, window, limit)
        if not job_ids:
            raise fail(f"no job was created in the last {since}; widen --since", 1)
    written = write_report(settings, job_ids, out)
    for job_id in written.unknown:
        console.print(f"[yellow]no job {escape(job_id)}[/yellow] (listed as not found in the page)")
    console.print(
        f"wrote {escape(str(written.path))} ({written.jobs} job(s), {written.size_bytes} bytes)"
    )
    if written.jobs == 0:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
