"""Reading what a stack exposes: /metrics (Prometheus text), JSON log lines, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from imgpipe.face.stack import child_env
from imgpipe.settings import Settings

__all__ = ["imgpipe_cli", "json_lines", "sample_sum", "scrape"]

REPO = Path(__file__).resolve().parents[2]


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``{sample name: [(labels, value), ...]}`` from a /metrics endpoint."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def sample_sum(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(k) == v for k, v in labels.items())
    )


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects logged in ``path``; AssertionError naming any other line."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"{path.name}: not a JSON log line: {line!r}") from None
    return records


def imgpipe_cli(
    settings: Settings, *args: str, extra_env: dict[str, str] | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m imgpipe ARGS`` for ``settings``' stack, output captured."""
    env = child_env(settings, {"PYTHONPATH": str(REPO), **(extra_env or {})})
    return subprocess.run(
        [sys.executable, "-m", "imgpipe", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
