"""``imgpipe bench``: the benchmark as a command (the logic lives in imgpipe/face/bench/)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from imgpipe.face.cli_console import console

__all__ = ["bench", "register", "render_bench"]


def bench(
    images: Annotated[int, typer.Option(min=1, help="Jobs submitted at once.")] = 200,
    pipeline: Annotated[str, typer.Option(help="Pipeline name or .toml path.")] = "full",
    stages: Annotated[
        str,
        typer.Option(
            help="'pipeline': the pipeline's own stages on the samples; 'noop': the noop "
            "pipeline (full's DAG, no-op stages) on 16 px PNGs, plus a Celery canvas."
        ),
    ] = "pipeline",
    device: Annotated[str, typer.Option(help="Device of the model worker.")] = "cpu",
    database_url: Annotated[
        str | None, typer.Option(help="Default: SQLite in a temp data dir.")
    ] = None,
    broker_url: Annotated[
        str | None, typer.Option(help="Default: an embedded redis-server in a temp dir.")
    ] = None,
    image: Annotated[
        list[Path] | None, typer.Option(help="Input image (repeatable); default: samples.")
    ] = None,
    latency_jobs: Annotated[
        int, typer.Option(min=1, help="Jobs run one at a time for latency.")
    ] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Throughput and latency through the stack vs in-process and canvas baselines,
    measured in the same run (docs/benchmarks.md)."""
    from imgpipe.face.bench import BenchConfig, run_bench

    if stages not in ("pipeline", "noop"):
        raise typer.BadParameter("must be 'pipeline' or 'noop'", param_hint="--stages")
    config = BenchConfig(
        images=images,
        pipeline=pipeline,
        noop=stages == "noop",
        device=device,
        database_url=database_url,
        broker_url=broker_url,
        image_paths=tuple(image or ()),
        latency_jobs=latency_jobs,
        command=shlex.join(["imgpipe", *sys.argv[1:]]),
    )
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
        transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("benchmarking", total=None)

        def step(what: str) -> None:  # a new phase: the bar starts over
            bar.update(task, description=f"benchmarking: {what}", completed=0, total=None)

        def jobs_done(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = run_bench(config, step, jobs_done)
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_bench(Console(), report)


def register(app: typer.Typer) -> None:
    """Add these commands to the ``imgpipe`` app."""
    app.command()(bench)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pair(figures: dict[str, Any] | None) -> str:
    figures = figures or {}
    return f"{_fmt(figures.get('p50'), 2)} / {_fmt(figures.get('p95'), 2)}"


def render_bench(out: Console, report: dict[str, Any]) -> None:
    machine, config = report["machine"], report["config"]
    out.print(
        f"[bold]imgpipe bench[/] {report['date']}  {config['pipeline']} x {config['images']}  "
        f"{machine['device_name']} ({machine['cpu_count']} cpus), {config['database']}, "
        f"{config['broker']}"
    )
    ours = report["imgpipe"]
    baselines = report["baselines"]
    summary = Table("figure", "value", title="Through the stack")
    summary.add_row("images/s (throughput phase)", _fmt(ours["throughput"]["images_per_s"]))
    summary.add_row(
        "CPU ms per job, workers + broker (throughput phase)",
        _fmt(ours["throughput"].get("cpu_ms_per_job")),
    )
    for phase in ("latency", "throughput"):
        e2e = ours[phase]["e2e_ms"]
        summary.add_row(
            f"e2e ms p50/p95/p99 ({phase})",
            f"{_fmt(e2e['p50'])} / {_fmt(e2e['p95'])} / {_fmt(e2e['p99'])}",
        )
        summary.add_row(
            f"overhead ms p50/p95 vs sum of compute ({phase})",
            _pair(ours[phase]["overhead_vs_sum_compute_ms"]),
        )
    for name, mib in ours["rss_mib"].items():
        summary.add_row(f"RSS MiB: {name}", _fmt(mib, 0))
    if ours["gpu"] is not None:
        gpu = ours["gpu"]
        summary.add_row("GPU utilisation % mean/max", f"{gpu['utilization_pct_mean']} / "
                        f"{gpu['utilization_pct_max']}")  # fmt: skip
        summary.add_row("GPU memory used MiB max", _fmt(gpu["memory_used_mib_max"], 0))
    out.print(summary)
    stages = Table(
        "stage", "compute", "load", "queue wait", "bookkeeping", "hop", "bookkeeping+hop",
        title="Per stage, ms p50 / p95 (latency phase: one job at a time)",
    )  # fmt: skip
    for name, s in ours["latency"]["stages"].items():
        stages.add_row(
            name, *(_pair(s[k]) for k in ("compute_ms", "load_ms", "queue_wait_ms",
                                          "bookkeeping_ms", "hop_ms", "bookkeeping_plus_hop_ms"))
        )  # fmt: skip
    out.print(stages)
    base = Table("baseline", "figure", "ratio (imgpipe / baseline)", title="Baselines, same run")
    seq = baselines["in_process_sequential"]
    ratios = report["ratios"]
    base.add_row(
        "in-process sequential", f"{_fmt(seq['images_per_s'])} img/s, p50 {_fmt(seq['p50_ms'])} ms",
        f"{_fmt(ratios['throughput_vs_in_process_sequential'], 2)}x img/s, "
        f"{_fmt(ratios['latency_p50_vs_in_process_sequential'], 2)}x p50",
    )  # fmt: skip
    batched = baselines["in_process_batched"]
    if batched is not None:
        base.add_row(
            "in-process batched, model stages",
            f"{_fmt(batched['model_stages_images_per_s'])} img/s",
            f"{_fmt(ratios['throughput_vs_in_process_batched_model_stages'], 2)}x img/s",
        )
    canvas = baselines["celery_canvas"]
    if canvas is not None:
        base.add_row(
            f"Celery canvas {canvas['shape']}",
            f"{_fmt(canvas['throughput']['dags_per_s'])} DAGs/s, "
            f"p50 {_fmt(canvas['latency']['e2e_ms']['p50'])} ms",
            f"{_fmt(ratios['throughput_vs_celery_canvas'], 2)}x DAGs/s, "
            f"{_fmt(ratios['latency_p50_vs_celery_canvas'], 2)}x p50",
        )
        base.add_row(
            "  CPU per DAG, worker + broker",
            f"{_fmt(canvas['throughput'].get('cpu_ms_per_dag'))} ms",
            f"{_fmt(ratios['cpu_per_job_vs_celery_canvas'], 2)}x",
        )
    out.print(base)
    targets = Table("target", "value", "goal", "met", title="Targets (issue 8)")
    for t in report["targets"]:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[t["met"]]
        targets.add_row(t["target"], _fmt(t["value"], 2), t["goal"], met)
    out.print(targets)
