"""``imgpipe status [JOB]`` and ``imgpipe health``: the live state of the stack.

``status`` without a job id shows queue depths, the workers answering remote control
(their devices and queues), jobs per state in the last hour, stuck stage runs, dead
letters and the ingest lag (``--json``: the same as one object). ``health`` exits 1 with
the reasons when the stack is unhealthy: broker or database unreachable, a queue holding
messages that no worker consumes, stage runs stuck past their deadline (a container
health check runs it).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from imgpipe.settings import Settings

__all__ = ["add_status_commands", "health_problems"]

EXIT_UNHEALTHY = 1
SHOWN_STUCK = 10

if TYPE_CHECKING:  # not at run time: the CLI starts without SQLAlchemy
    from imgpipe.face.livestate import LiveState


def health_problems(state: LiveState) -> list[str]:
    """Why the stack is unhealthy (empty: healthy). Needs ``state.workers``."""
    problems = list(state.errors)
    if state.workers is not None and not any("broker" in e for e in state.errors):
        consumed = {q for w in state.workers for q in w.queues}
        for queue, depth in sorted(state.queue_depths.items()):
            if depth and queue not in consumed:
                problems.append(
                    f"queue {queue} holds {depth} message(s) and no worker consumes it: start "
                    "one (imgpipe worker ... / imgpipe orchestrator) or check its log"
                )
    if state.stuck_count:
        first = state.stuck[0]
        problems.append(
            f"{state.stuck_count} stage run(s) stuck past their deadline (oldest: stage "
            f"{first.stage} of job {first.job_id}, {first.status}, {first.overdue_s:.0f} s "
            "overdue): is the orchestrator (its reaper) running? see its log"
        )
    return problems


def _read(settings: Settings, timeout_s: float) -> LiveState:
    from imgpipe.face.livestate import read_live_state, read_workers

    state = read_live_state(settings)
    if not any("broker" in e for e in state.errors):
        workers, error = read_workers(settings, timeout_s)
        state.workers = workers
        if error:
            state.errors.append(error)
    return state


def _render(console: Console, state: LiveState, problems: list[str]) -> None:
    queues = Table("queue", "waiting", "consumed by", title="broker queues")
    for queue, depth in state.queue_depths.items():
        consumers = [w.name for w in state.workers or [] if queue in w.queues]
        queues.add_row(queue, str(depth), ", ".join(consumers) or "[yellow]nobody[/]")
    console.print(queues)
    workers = Table("worker", "device", "queues", title="workers (remote control)")
    for w in state.workers or []:
        workers.add_row(w.name, w.device or "?", ", ".join(w.queues))
    console.print(workers)
    jobs = Table("status", "jobs", "by pipeline", title="jobs in flight + created in the last hour")
    for status, by_pipeline in sorted(state.jobs.items()):
        detail = ", ".join(f"{p} {n}" for p, n in sorted(by_pipeline.items()))
        jobs.add_row(status, str(sum(by_pipeline.values())), detail)
    console.print(jobs)
    lines = [
        f"stuck stage runs: {state.stuck_count}",
        f"dead stage runs (last hour): {state.dead_stage_runs_last_hour}",
        f"submit dead letters (imgpipe:submit:dead): {_or_unknown(state.submit_dead_letters)}",
        f"submit entries trimmed unread: {_or_unknown(state.submit_trimmed_unread)}",
        f"outbox: {state.outbox_pending} answer(s) not yet delivered"
        + (
            f" (oldest {state.outbox_oldest_age_s:.0f} s)"
            if state.outbox_oldest_age_s is not None
            else ""
        ),
    ]
    if state.ingest is None:
        lines.append("ingest: no consumer group yet (no `imgpipe ingest` has run)")
    else:
        age = state.ingest.oldest_undelivered_age_s
        lines.append(
            f"ingest: {_or_unknown(state.ingest.lag_entries)} entries waiting"
            f"{' (Redis < 7 reports no group lag)' if state.ingest.lag_entries is None else ''}"
            f"{f' (oldest {age:.1f} s)' if age is not None else ''}, "
            f"{state.ingest.pending_entries} pending, {state.ingest.consumers} consumer(s)"
        )
    for line in lines:
        console.print(line)
    for run in state.stuck[:SHOWN_STUCK]:
        console.print(
            f"  stuck: stage run {run.stage_run_id} ({run.stage} of job {run.job_id}) "
            f"{run.status} on {run.queue}, {run.overdue_s:.0f} s past its deadline"
            f"{f', worker {run.worker}' if run.worker else ''}"
        )
    if problems:
        console.print("[red]unhealthy:[/red]")
        for problem in problems:
            console.print(f"  - {problem}")
    else:
        console.print("[green]healthy[/green]")


def _or_unknown(value: int | None) -> str:
    return "?" if value is None else str(value)


def add_status_commands(app: typer.Typer, console: Console) -> None:
    @app.command()
    def status(
        job_id: Annotated[
            str | None, typer.Argument(help="A job id; none: the live state of the stack.")
        ] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
        timeout_s: Annotated[
            float, typer.Option(help="How long workers may take to answer remote control.")
        ] = 1.0,
    ) -> None:
        """A job's status, verdict and stages; without JOB_ID the stack's live state: queue
        depths, workers and their devices, jobs per state in the last hour, stuck stage
        runs, dead letters, ingest lag."""
        if job_id is not None:
            _job_status(console, job_id, json_out)
            return
        state = _read(Settings(), timeout_s)
        problems = health_problems(state)
        if json_out:
            data = state.to_json()
            data["healthy"] = not problems
            data["problems"] = problems
            typer.echo(json.dumps(data, indent=2, default=str))
            return
        _render(Console(), state, problems)

    @app.command()
    def health(
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
        timeout_s: Annotated[
            float, typer.Option(help="How long workers may take to answer remote control.")
        ] = 2.0,
    ) -> None:
        """Exit 0 when the stack is healthy, 1 (with the reasons) when the broker or the
        database is unreachable, a queue holding messages has no worker, or stage runs are
        stuck past their deadline. For container health checks."""
        state = _read(Settings(), timeout_s)
        problems = health_problems(state)
        if json_out:
            typer.echo(json.dumps({"healthy": not problems, "problems": problems}))
        elif problems:
            for problem in problems:
                typer.echo(f"unhealthy: {problem}")
        else:
            workers = len(state.workers or [])
            typer.echo(f"healthy: broker and database reachable, {workers} worker(s) answering")
        if problems:
            raise typer.Exit(EXIT_UNHEALTHY)


def _job_status(console: Console, job_id: str, json_out: bool) -> None:
    from imgpipe.face.api import results

    report = results(job_id)
    if report is None:
        console.print(f"[red]error:[/red] no job {job_id}: check the id (imgpipe submit prints it)")
        raise typer.Exit(1)
    if json_out:
        keys = ("job_id", "status", "verdict", "pipeline")
        summary: dict[str, Any] = {k: report.get(k) for k in keys}
        summary["stages"] = {s["stage"]: s["status"] for s in report["stages"]}
        typer.echo(json.dumps(summary, default=str))
        return
    stages = " ".join(f"{s['stage']}={s['status']}" for s in report["stages"])
    typer.echo(f"{report['job_id']} {report['status']} verdict={report['verdict']} {stages}")
