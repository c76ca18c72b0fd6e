"""Rich tables for the CLI: one row per image with stage outcomes, scores, verdict, ms."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from rich.table import Table

from imgpipe.errors import PermanentError
from imgpipe.stageoutputs import (
    AnomalyOutput,
    DetectOutput,
    EnhanceOutput,
    ModerateOutput,
    QualityOutput,
    read_output,
)

__all__ = ["render_results_table", "stage_cell"]

_STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "dead": "red",
    "rejected": "yellow",
    "skipped": "dim",
}


def stage_cell(stage: dict[str, Any]) -> str:
    """A short human summary of one stage's outcome (its output read by its kind's schema,
    imgpipe/stageoutputs.py)."""
    status = stage.get("status", "?")
    if status == "skipped":
        return f"skipped ({stage.get('skip_reason')})"
    if status != "succeeded":
        return f"{status}: {stage.get('error') or ''}"[:60]
    kind = str(stage.get("kind"))
    if kind not in _CELLS:
        return "ok"
    try:
        output = read_output(kind, stage.get("output") or {})
    except PermanentError:
        return "output does not match its schema"
    return _CELLS[kind](output)


def _quality_cell(output: Mapping[str, Any]) -> str:
    quality = cast(QualityOutput, output)
    return f"{quality['score']:.0f} {','.join(quality['flags']) or 'ok'}"


def _enhance_cell(output: Mapping[str, Any]) -> str:
    ops = [a["op"] for a in cast(EnhanceOutput, output)["applied"]]
    return "+".join(ops) if ops else "none needed"


def _detect_cell(output: Mapping[str, Any]) -> str:
    detect = cast(DetectOutput, output)
    labels = Counter(d["label"] for d in detect["detections"])
    shown = ", ".join(f"{n}x{lab}" for lab, n in sorted(labels.items())[:3])
    return f"{detect['count']} boxes" + (f": {shown}" if shown else "")


def _moderate_cell(output: Mapping[str, Any]) -> str:
    return cast(ModerateOutput, output)["verdict"]


def _anomaly_cell(output: Mapping[str, Any]) -> str:
    anomaly = cast(AnomalyOutput, output)
    return f"{anomaly['score']:.3g} {'ANOMALOUS' if anomaly['anomalous'] else 'normal'}"


_CELLS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "quality": _quality_cell,
    "enhance": _enhance_cell,
    "detect": _detect_cell,
    "moderate": _moderate_cell,
    "anomaly": _anomaly_cell,
}


def render_results_table(
    console: Console,
    reports: list[dict[str, Any]],
    unreadable: list[tuple[Path, str]],
    wall_s: float | None,
    *,
    detail: bool = False,
) -> None:
    stage_names: list[str] = []
    for report in reports:
        for stage in report.get("stages", []):
            if stage["stage"] not in stage_names:
                stage_names.append(stage["stage"])
    table = Table(title="imgpipe results", show_lines=detail)
    table.add_column("image")
    table.add_column("job")
    table.add_column("status")
    table.add_column("verdict")
    for name in stage_names:
        table.add_column(name)
    table.add_column("ms", justify="right")
    for report in reports:
        status = str(report.get("status"))
        shown_status = f"{status} (cached)" if report.get("cache_hit_of") else status
        stages = {s["stage"]: s for s in report.get("stages", [])}
        cells = [stage_cell(stages[n]) if n in stages else "" for n in stage_names]
        if status == "rejected":
            cells = [str(report.get("error") or "")[:80]] + [""] * (len(stage_names) - 1)
        elapsed = report.get("elapsed_ms")
        table.add_row(
            Path(str(report.get("file", report.get("job_id")))).name,
            str(report.get("job_id", ""))[:8],
            f"[{_STATUS_STYLE.get(status, 'white')}]{shown_status}[/]",
            str(report.get("verdict") or ""),
            *cells,
            f"{elapsed:.0f}" if isinstance(elapsed, float) else "",
        )
    for path, reason in unreadable:
        table.add_row(path.name, "", "[red]unreadable[/]", "", reason, *[""] * len(stage_names))
    console.print(table)
    if detail:
        for report in reports:
            for reason in report.get("reasons") or []:
                console.print(f"  reason: {reason}")
    if wall_s is not None and reports:
        console.print(f"{len(reports)} image(s) in {wall_s:.2f} s")
