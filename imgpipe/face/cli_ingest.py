"""Commands for submissions from other services, backfills and the review queue:
``imgpipe ingest``, ``imgpipe reprocess``, ``imgpipe review list|decide``."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from imgpipe.errors import ImgpipeError
from imgpipe.settings import Settings

__all__ = ["add_ingest_commands"]


def add_ingest_commands(app: typer.Typer, console: Console) -> None:
    review_app = typer.Typer(help="The human review queue.", no_args_is_help=True)
    app.add_typer(review_app, name="review")

    def fail(message: str, code: int = 2) -> typer.Exit:
        console.print(f"[red]error:[/red] {message}")
        return typer.Exit(code)

    @app.command()
    def ingest(
        consumer: Annotated[
            str | None,
            typer.Option(help="Consumer name in the group (default: host-pid; NAME-i with -n)."),
        ] = None,
        consumers: Annotated[
            int,
            typer.Option(
                "--consumers", "-n", min=1, help="Consumer processes in the group (default 1)."
            ),
        ] = 1,
        loglevel: Annotated[str, typer.Option()] = "INFO",
    ) -> None:
        """Consume the submit stream (imgpipe:submit) in the foreground until SIGTERM/Ctrl-C.

        Run one or more anywhere the database and Redis are reachable (each process is its
        own consumer in the group); --consumers N starts N here and restarts one that
        dies. See docs/submitting.md.
        """
        from imgpipe.logs import configure_logging

        configure_logging(Settings().log_format, loglevel, worker=f"ingest-{os.getpid()}")
        stop = threading.Event()

        def request_stop(signum: int, _frame: Any) -> None:
            logging.getLogger(__name__).info("signal %d: stopping after this batch", signum)
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        if consumers > 1:
            from imgpipe.face.ingest_group import run_consumer_processes

            names = [f"{consumer}-{i}" if consumer else None for i in range(1, consumers + 1)]
            run_consumer_processes(names, loglevel, stop)
            return
        from orchestrator.context import OrchestratorContext
        from orchestrator.ingest import SubmitConsumer

        settings = Settings()
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        consumer_ = SubmitConsumer(OrchestratorContext(settings), consumer)
        consumer_.run_forever(stop)

    @app.command()
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

    @review_app.command("list")
    def review_list(
        pipeline: Annotated[str | None, typer.Option()] = None,
        limit: Annotated[int, typer.Option(min=1)] = 100,
        json_out: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Jobs whose verdict is `review` and that nobody has decided yet, oldest first."""
        from db.engine import session_scope
        from orchestrator.review import pending_reviews

        settings = Settings()
        with session_scope(settings.effective_database_url) as session:
            items = pending_reviews(session, pipeline=pipeline, limit=limit)
        if json_out:
            rows = [
                {
                    "job_id": i.job_id, "pipeline": i.pipeline, "choices": list(i.choices),
                    "reasons": i.reasons, "idempotency_key": i.idempotency_key,
                    "image_sha256": i.image_sha256,
                    "finished_at": i.finished_at.isoformat() if i.finished_at else None,
                }
                for i in items
            ]  # fmt: skip
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        table = Table("job", "pipeline", "finished", "reasons", "decide with")
        for i in items:
            finished = i.finished_at.isoformat(timespec="seconds") if i.finished_at else ""
            reasons = "; ".join(str(r) for r in i.reasons)
            table.add_row(i.job_id, i.pipeline, finished, reasons, "|".join(i.choices))
        Console().print(table)
        console.print(f"{len(items)} job(s) waiting for review")

    @review_app.command("decide")
    def review_decide(
        job_id: Annotated[str, typer.Argument(help="The job to decide.")],
        decision: Annotated[str, typer.Argument(help="allow|block (moderation), pass|fail (qc)")],
        reviewer: Annotated[str, typer.Option(help="Who decides (stored with the decision).")],
        note: Annotated[str | None, typer.Option(help="Why; stored with the decision.")] = None,
    ) -> None:
        """Record a decision; it becomes the job's final verdict and a `reviewed` event."""
        from orchestrator.context import OrchestratorContext
        from orchestrator.review import decide

        try:
            outcome = decide(
                OrchestratorContext(Settings()), job_id, decision, reviewer=reviewer, note=note
            )
        except ImgpipeError as exc:
            raise fail(str(exc)) from None
        typer.echo(
            f"{outcome.job_id} {outcome.previous_verdict} -> {outcome.decision} "
            f"by {outcome.reviewer}"
        )
