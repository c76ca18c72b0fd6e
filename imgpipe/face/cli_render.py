"""Rich tables for the CLI: one row per image with stage outcomes, scores, verdict, ms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["render_results_table", "stage_cell"]

_STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "dead": "red",
    "rejected": "yellow",
    "skipped": "dim",
}


def stage_cell(stage: dict[str, Any]) -> str:
    """A short human summary of one stage's outcome."""
    status = stage.get("status", "?")
    output = stage.get("output") or {}
    if status == "skipped":
        return f"skipped ({stage.get('skip_reason')})"
    if status != "succeeded":
        return f"{status}: {stage.get('error') or ''}"[:60]
    kind = stage.get("kind")
    if kind == "quality":
        flags = ",".join(output.get("flags", [])) or "ok"
        return f"{output.get('score', 0):.0f} {flags}"
    if kind == "enhance":
        ops = [a.get("op", "?") for a in output.get("applied", [])]
        return "+".join(ops) if ops else "none needed"
    if kind == "detect":
        labels: dict[str, int] = {}
        for d in output.get("detections", []):
            labels[d["label"]] = labels.get(d["label"], 0) + 1
        shown = ", ".join(f"{n}x{lab}" for lab, n in sorted(labels.items())[:3])
        return f"{output.get('count', 0)} boxes" + (f": {shown}" if shown else "")
    if kind == "moderate":
        return str(output.get("verdict"))
    if kind == "anomaly":
        flag = "ANOMALOUS" if output.get("anomalous") else "normal"
        return f"{output.get('score', 0):.3g} {flag}"
    return "ok"


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
