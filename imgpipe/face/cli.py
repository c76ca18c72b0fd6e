"""The ``imgpipe`` command line (typer + rich). Imports no torch: commands import the
layers they need when they run."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from imgpipe.contracts import JobStatus, Priority
from imgpipe.errors import ImgpipeError
from imgpipe.extras import install_hint, missing_model_modules
from imgpipe.face import cli_bench, cli_ingest, cli_ops, cli_report, cli_reprocess, cli_review
from imgpipe.face.cli_console import console
from imgpipe.face.cli_console import fail as _fail
from imgpipe.face.cli_flower import add_flower_command
from imgpipe.face.cli_render import render_results_table
from imgpipe.face.cli_status import add_status_commands
from imgpipe.face.cli_web import add_web_commands
from imgpipe.face.stopsignals import StopRequested, stop_on_signals
from imgpipe.redact import redact_text, redact_url
from imgpipe.settings import DEFAULT_METRICS_PORT, Settings
from imgpipe.stagekinds import GPU_STAGE_KINDS

if TYPE_CHECKING:
    from imgpipe.face.stack import Stack
    from orchestrator.context import OrchestratorContext

__all__ = ["app", "main"]

app = typer.Typer(
    name="imgpipe",
    help="Every image becomes a DAG of Celery tasks; results and provenance land in SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

EXIT_FAILED = 1
EXIT_REJECTED = 3


@app.command()
def run(
    images: Annotated[list[Path], typer.Argument(help="Image files to process.")],
    pipeline: Annotated[str | None, typer.Option(help="Pipeline name or .toml path.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON reports.")] = False,
    priority: Annotated[Priority, typer.Option(help="Queue priority.")] = Priority.INTERACTIVE,
    timeout_s: Annotated[float, typer.Option(help="Give up waiting after this long.")] = 1800,
    device: Annotated[str, typer.Option(help="Device of the model worker.")] = "cpu",
    report: Annotated[
        Path | None, typer.Option(help="Also write the jobs' HTML report (imgpipe report).")
    ] = None,
) -> None:
    """Start the embedded stack, process IMAGES, print one row per image, stop the stack.

    Exit code: 0 all succeeded, 1 a job failed or timed out, 3 some input was rejected,
    128 + N when signal N (SIGTERM, Ctrl-C) stopped it: the stack stops cleanly and jobs
    not finished stay in the database, to finish at the next start on the same data dir.
    """
    from imgpipe.face.stack import Stack
    from orchestrator.context import OrchestratorContext
    from orchestrator.pipelines import load_pipeline
    from orchestrator.submit import submit
    from orchestrator.submit_fields import SubmitFields, build_request

    settings = Settings()
    name = pipeline or settings.default_pipeline
    try:
        spec = load_pipeline(name, settings.pipelines_dir)
        spec.require_installed(on_this_host=True)
    except ImgpipeError as exc:
        raise _fail(str(exc)) from None
    needs_gpu = any(s.kind in GPU_STAGE_KINDS for s in spec.stages)
    roles = ("orchestrator", "cpu", "gpu") if needs_gpu else ("orchestrator", "cpu")
    reports: list[dict[str, Any]] = []
    unreadable: list[tuple[Path, str]] = []
    with Stack(settings, workers=roles, gpu_device=device) as stack:
        with console.status("starting broker and workers"):
            stack.wait_ready()
        ctx = OrchestratorContext(settings)
        submitted: list[tuple[Path, str]] = []
        started = time.monotonic()
        for path in images:
            try:
                data = path.read_bytes()
            except OSError as exc:
                unreadable.append((path, f"cannot read file: {exc.strerror}"))
                continue
            fields = SubmitFields(
                data=data, pipeline=name, priority=priority, metadata={"filename": path.name}
            )
            try:  # the operator's own files: a pipeline .toml path is allowed here
                request = build_request(ctx, fields, source="cli", allow_pipeline_paths=True)
            except ImgpipeError as exc:
                raise _fail(str(exc)) from None
            result = submit(ctx, request)
            submitted.append((path, result.job_id))
        statuses = _wait_with_progress(ctx, stack, [j for _, j in submitted], timeout_s)
        wall_s = time.monotonic() - started
        reports = _collect(ctx, submitted)
    if report is not None:
        from imgpipe.face.report import write_report

        written = write_report(settings, [j for _, j in submitted], report)
        console.print(f"report: {escape(str(written.path))} ({written.jobs} job(s))")
    if json_out:
        sys.stdout.write(json.dumps({"jobs": reports, "wall_s": wall_s}, indent=2, default=str))
        sys.stdout.write("\n")
    else:
        render_results_table(Console(), reports, unreadable, wall_s)
    values = list(statuses.values())
    if unreadable or any(not JobStatus(s).terminal or s == JobStatus.FAILED for s in values):
        raise typer.Exit(EXIT_FAILED)
    if any(s == JobStatus.REJECTED for s in values):
        raise typer.Exit(EXIT_REJECTED)


def _wait_with_progress(
    ctx: OrchestratorContext, stack: Stack, job_ids: list[str], timeout_s: float
) -> dict[str, str]:
    from orchestrator.reports import all_terminal, wait_terminal

    with Progress(
        TextColumn("[bold]processing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
    ) as progress:  # fmt: skip
        bar = progress.add_task("jobs", total=len(job_ids))
        dead: list[str] = []

        def keep_waiting(statuses: dict[str, str]) -> bool:
            progress.update(bar, completed=sum(JobStatus(s).terminal for s in statuses.values()))
            dead.extend(stack.check_alive())
            return not dead

        statuses = wait_terminal(ctx.database_url, job_ids, timeout_s, keep_waiting=keep_waiting)
    if dead:
        console.print(f"[red]worker process exited:[/red] {', '.join(dead)}")
    elif not all_terminal(statuses, job_ids):
        console.print(f"[red]timed out after {timeout_s:.0f} s[/red]")
    return statuses


def _collect(ctx: OrchestratorContext, submitted: list[tuple[Path, str]]) -> list[dict[str, Any]]:
    from db.engine import session_scope
    from orchestrator.reports import job_report

    reports = []
    with session_scope(ctx.database_url) as session:
        for path, job_id in submitted:
            report = job_report(session, job_id) or {"job_id": job_id}
            report["file"] = str(path)
            reports.append(report)
    return reports


@app.command()
def up(
    device: Annotated[list[str], typer.Option(help="Model worker device(s).")] = ["cpu"],  # noqa: B006
    flower: Annotated[
        bool,
        typer.Option(help="Start Flower (needs IMGPIPE_FLOWER_PASSWORD or _PASSWORD_FILE)."),
    ] = True,
    api: Annotated[
        bool, typer.Option(help="Start the HTTP API and review console (`imgpipe serve`).")
    ] = True,
) -> None:
    """Run the stack in the foreground until SIGTERM or Ctrl-C: broker, orchestrator,
    workers, the HTTP API, Flower.

    A stop signal stops every process it started, in order (ingest, stage workers with a
    warm shutdown, orchestrator, Flower, the embedded broker), and exits 0. Exit 1: a
    process kept exiting and was given up on.
    """
    from imgpipe.face.stack import Stack
    from imgpipe.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_format, logging.INFO, worker="up")
    with_flower = flower and settings.flower_password is not None
    if flower and not with_flower:
        console.print(
            "Flower not started: set IMGPIPE_FLOWER_PASSWORD or IMGPIPE_FLOWER_PASSWORD_FILE "
            "to enable it (basic auth)."
        )
    roles = ("orchestrator", "cpu", "ingest", "api") if api else ("orchestrator", "cpu", "ingest")
    stack = Stack(
        settings,
        workers=roles,
        flower=with_flower,
        metrics_port=_up_metrics_port(settings),
        metrics_required=settings.metrics_port is not None,
    )
    try:
        with stack:
            if missing := missing_model_modules():
                console.print(
                    f"no model worker: {' and '.join(missing)} not installed here "
                    f"({escape(install_hint(missing))}); model stages wait for one on another host"
                )
            for dev in device if not missing else []:
                stack.add_gpu_worker(dev)
            console.print(
                f"imgpipe up: data in {settings.resolved_data_dir}; logs in {stack.log_dir}"
            )
            console.print(f"broker {redact_url(settings.effective_broker_url)}")
            console.print(f"database {redact_url(settings.effective_database_url)}")
            if stack.metrics_url:
                console.print(f"metrics on {stack.metrics_url}")
            elif stack.metrics_port:
                console.print(
                    f"[yellow]metrics not served:[/yellow] port {stack.metrics_port} is in use "
                    "(another imgpipe up?); set IMGPIPE_METRICS_PORT to a free port, or 0"
                )
            if api:
                console.print(
                    f"HTTP API and review console on http://{settings.api_address}:"
                    f"{settings.api_port}/console (keys: imgpipe apikey create)"
                )
            if with_flower:
                console.print(
                    f"Flower on http://{settings.flower_address}:{settings.flower_port} "
                    f"(user {settings.flower_user})"
                )
            stack.wait_ready()
            console.print("imgpipe up: ready (SIGTERM or Ctrl-C stops it)")
            while not (dead := stack.check_alive()):
                time.sleep(0.5)
            console.print(f"[red]stopping: a process exited:[/red] {', '.join(dead)}")
            raise typer.Exit(EXIT_FAILED)
    except StopRequested as stop:
        console.print(f"imgpipe up: {stop}; every process it started has stopped")


def _up_metrics_port(settings: Settings) -> int | None:
    """IMGPIPE_METRICS_PORT, or 9808 when unset; None (no metrics) when it is 0."""
    if settings.metrics_port is None:
        return DEFAULT_METRICS_PORT
    return settings.metrics_port or None


@app.command("submit")
def submit_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    pipeline: Annotated[str | None, typer.Option()] = None,
    priority: Annotated[Priority, typer.Option()] = Priority.INTERACTIVE,
    idempotency_key: Annotated[str | None, typer.Option(help="Only with one image.")] = None,
    force: Annotated[bool, typer.Option(help="Re-run even if cached results exist.")] = False,
) -> None:
    """Submit images to a running stack (`imgpipe up`); prints one job id per line."""
    from imgpipe.face.api import submit

    if idempotency_key and len(images) > 1:
        raise _fail("--idempotency-key applies to one image; submit them one by one")
    for path in images:
        try:
            result = submit(
                path, pipeline, priority=priority, idempotency_key=idempotency_key, force=force
            )
        except ImgpipeError as exc:
            raise _fail(str(exc)) from None
        typer.echo(f"{result.job_id}\t{result.status}\t{path}")


@app.command()
def results(job_id: str, json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Everything about a job: outputs, provenance, attempts, timings."""
    from imgpipe.face.api import results as get_results

    report = get_results(job_id)
    if report is None:
        raise _fail(f"no job {job_id}", 1)
    if json_out:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        render_results_table(Console(), [report], [], None, detail=True)


@app.command()
def worker(
    role: Annotated[str, typer.Argument(help="cpu or gpu")],
    device: Annotated[
        str, typer.Option(help="torch device for gpu workers: cuda:N or cpu")
    ] = "cuda:0",
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues (default: role's)")
    ] = None,
    concurrency: Annotated[int | None, typer.Option()] = None,
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run a stage worker in the foreground."""
    from imgpipe.face.workerproc import run_worker

    if role not in ("cpu", "gpu"):
        raise _fail(f"worker role must be cpu or gpu, not {role!r}")
    run_worker(
        Settings(), role, device=device if role == "gpu" else "cpu",
        queues=queues.split(",") if queues else None, concurrency=concurrency, loglevel=loglevel,
    )  # fmt: skip


@app.command()
def probe(
    role: Annotated[str, typer.Argument(help="orchestrator, cpu, gpu or ingest")],
    device: Annotated[str | None, typer.Option(help="gpu only: the worker of this device")] = None,
    timeout_s: Annotated[float, typer.Option(help="How long to wait for ping replies.")] = 5.0,
) -> None:
    """Exit 0 if this host's ROLE process answers (a container health check), 1 if not."""
    from imgpipe.face.probe import PROBE_ROLES
    from imgpipe.face.probe import probe as run_probe

    if role not in PROBE_ROLES:
        raise _fail(f"probe role must be one of {', '.join(PROBE_ROLES)}, not {role!r}")
    result = run_probe(Settings(), role, device=device, timeout_s=timeout_s)
    typer.echo(f"{'healthy' if result.healthy else 'unhealthy'}: {result.detail}")
    if not result.healthy:
        raise typer.Exit(1)


@app.command()
def orchestrator(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run the control worker (advance, submit, reaper) in the foreground."""
    from imgpipe.face.workerproc import run_worker

    run_worker(Settings(), "orchestrator", loglevel=loglevel)


cli_ops.register(app)
cli_ingest.register(app)
cli_reprocess.register(app)
cli_review.register(app)
cli_report.register(app)
cli_bench.register(app)
add_status_commands(app, console)
add_flower_command(app, console)
add_web_commands(app, console)


def main() -> None:
    try:
        with stop_on_signals():
            app()
    except ImgpipeError as exc:
        console.print(f"[red]error:[/red] {escape(redact_text(str(exc)))}")
        sys.exit(2)
    except StopRequested as stop:
        # `imgpipe up` ends here only if the signal came before its stack existed;
        # `imgpipe run` and the others: the work was cut short.
        console.print(f"{stop}; the processes this command started have stopped")
        sys.exit(stop.exit_code)
