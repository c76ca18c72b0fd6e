"""``imgpipe review list|decide``: the human review queue."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from imgpipe.errors import ImgpipeError
from imgpipe.face.cli_console import console, fail
from imgpipe.settings import Settings

__all__ = ["register", "review_app", "review_decide", "review_list"]

review_app = typer.Typer(help="The human review queue.", no_args_is_help=True)


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
        f"{outcome.job_id} {outcome.previous_verdict} -> {outcome.decision} by {outcome.reviewer}"
    )


def register(app: typer.Typer) -> None:
    """Add ``imgpipe review`` to the ``imgpipe`` app."""
    app.add_typer(review_app, name="review")
