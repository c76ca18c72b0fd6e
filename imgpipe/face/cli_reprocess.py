"""``imgpipe reprocess``: re-submit stored images through a pipeline (a backfill)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from imgpipe.errors import ImgpipeError
from imgpipe.face.cli_console import console, fail
from imgpipe.settings import Settings

__all__ = ["register", "reprocess"]


def reprocess(
    pipeline: Annotated[str, typer.Option(help="Pipeline to run the stored images through.")],
    stage: Annotated[
        str | None,
        typer.Option(help="Only images whose stage S result is missing, failed or stale."),
    ] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Only images first seen at or after (UTC).")
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(help="model-version-differs: latest job has another pipeline_hash."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option(help="Resume this run (printed when a run starts).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most N images now.")] = None,
) -> None:
    """Re-submit stored images as new bulk jobs (force; old results are kept).

    Needs the stack running (`imgpipe up`). Interrupted? Run again with the same --run-id.
    """
    from orchestrator.backfill import Backfill, BackfillOptions, BackfillReport
    from orchestrator.context import OrchestratorContext

    options = BackfillOptions(pipeline, stage, since, where, run_id, limit)
    try:
        backfill = Backfill(OrchestratorContext(Settings()), options)
    except ImgpipeError as exc:
        raise fail(str(exc)) from None
    console.print(
        f"reprocess run [bold]{backfill.run_id}[/bold]: pipeline {backfill.pipeline} "
        f"{backfill.pipeline_hash[:12]} (resume with --run-id {backfill.run_id})"
    )
    with Progress(
        TextColumn("[bold]reprocess"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=console,
    ) as progress:  # fmt: skip
        bar = progress.add_task("images", total=None)

        def show(report: BackfillReport) -> None:
            progress.update(bar, total=report.total, completed=report.handled)

        try:
            report = backfill.run(show)
        except KeyboardInterrupt:
            raise fail(f"interrupted; resume with --run-id {backfill.run_id}", 130) from None
        except ImgpipeError as exc:
            raise fail(f"{exc}; resume with --run-id {backfill.run_id}") from None
    console.print(
        f"submitted {report.submitted}, already done {report.skipped}, "
        f"failed {len(report.failed)} of {report.total}"
    )
    for sha, error in report.failed[:20]:
        console.print(f"  [red]{sha[:16]}[/red] {error}")
    if report.failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``imgpipe reprocess`` to the ``imgpipe`` app."""
    app.command()(reprocess)
