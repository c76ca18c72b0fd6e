"""The console every CLI command writes to (stderr: stdout stays for JSON output) and the
one way a command fails."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["console", "fail"]

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error (as text: ``[models]`` in a message is not markup);
    raise the result to exit with ``code``."""
    console.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(code)
