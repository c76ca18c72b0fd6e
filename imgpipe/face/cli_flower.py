"""``imgpipe flower``: Flower for this stack, basic auth required, bound to 127.0.0.1.

The process becomes Flower (exec): a supervisor or container sees Flower's own exit
status. Its password and the broker URL reach it through its environment only
(imgpipe/face/flower.py), never its command line.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

from imgpipe.errors import ImgpipeError
from imgpipe.settings import Settings

__all__ = ["add_flower_command"]


def add_flower_command(app: typer.Typer, console: Console) -> None:
    @app.command()
    def flower(
        address: Annotated[
            str | None,
            typer.Option(
                help="Interface to listen on (default IMGPIPE_FLOWER_ADDRESS, 127.0.0.1). "
                "Flower serves /metrics without authentication: keep it private."
            ),
        ] = None,
        port: Annotated[
            int | None, typer.Option(help="Port (default IMGPIPE_FLOWER_PORT, 5555).")
        ] = None,
    ) -> None:
        """Run Flower on the stack's broker in the foreground, with basic auth
        (user IMGPIPE_FLOWER_USER, password IMGPIPE_FLOWER_PASSWORD or _PASSWORD_FILE)."""
        from imgpipe.face.flower import flower_command, flower_env
        from imgpipe.face.stack import child_env

        overrides: dict[str, object] = {}
        if address is not None:
            overrides["flower_address"] = address
        if port is not None:
            overrides["flower_port"] = port
        settings = Settings(**overrides)  # type: ignore[arg-type]
        try:
            env = child_env(settings, flower_env(settings))
        except ImgpipeError as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        console.print(
            f"Flower on http://{settings.flower_address}:{settings.flower_port} "
            f"(user {settings.flower_user})"
        )
        command = flower_command()
        os.execve(command[0], command, env)
