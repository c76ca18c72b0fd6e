"""``imgpipe serve`` (the HTTP API and review console) and ``imgpipe apikey``."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from imgpipe.settings import Settings

__all__ = ["add_web_commands"]


def add_web_commands(app: typer.Typer, console: Console) -> None:
    apikey_app = typer.Typer(help="API keys of the HTTP API.", no_args_is_help=True)
    app.add_typer(apikey_app, name="apikey")

    @app.command()
    def serve(
        address: Annotated[
            str | None, typer.Option(help="Interface (default IMGPIPE_API_ADDRESS, 127.0.0.1).")
        ] = None,
        port: Annotated[
            int | None, typer.Option(help="Port (default IMGPIPE_API_PORT, 8780).")
        ] = None,
        loglevel: Annotated[str, typer.Option()] = "info",
    ) -> None:
        """Run the HTTP API and the review console in the foreground (docs/api.md)."""
        from imgpipe.face.web.server import serve as run_server

        settings = Settings()
        updates = {k: v for k, v in (("api_address", address), ("api_port", port)) if v is not None}
        if updates:
            settings = settings.model_copy(update=updates)
        run_server(settings, log_level=loglevel.lower())

    @apikey_app.command("create")
    def apikey_create(
        name: Annotated[
            str, typer.Option(help="Who holds it; a review key's name is the reviewer.")
        ],
        scope: Annotated[
            list[str], typer.Option(help="submit, read or review; repeat for several.")
        ],
    ) -> None:
        """Create a key and print its token once (only its sha256 is stored)."""
        from db.apikeys import create_key, parse_scopes

        settings = Settings()
        token, info = create_key(settings.effective_database_url, name, parse_scopes(scope))
        console.print(
            f"API key {info.id} for {info.name} (scopes {', '.join(info.scopes)}); the token "
            "is printed once, on standard output: keep it now"
        )
        typer.echo(token)

    @apikey_app.command("list")
    def apikey_list(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Every key: id, name, scopes, the token's first characters, created, revoked."""
        from db.apikeys import list_keys

        keys = list_keys(Settings().effective_database_url)
        if json_out:
            typer.echo(json.dumps([
                {"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": list(k.scopes),
                 "created_at": k.created_at.isoformat(),
                 "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
                for k in keys
            ], indent=2))  # fmt: skip
            return
        table = Table("id", "name", "scopes", "token starts", "created", "revoked")
        for k in keys:
            table.add_row(
                str(k.id), k.name, ",".join(k.scopes), k.prefix + "...",
                k.created_at.isoformat(timespec="seconds"),
                k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "",
            )  # fmt: skip
        Console().print(table)

    @apikey_app.command("revoke")
    def apikey_revoke(
        key_id: Annotated[int, typer.Argument(help="The id `apikey list` shows.")],
    ) -> None:
        """Revoke a key: every request with it is refused from now on."""
        from db.apikeys import revoke_key

        info = revoke_key(Settings().effective_database_url, key_id)
        assert info.revoked_at is not None
        console.print(
            f"API key {info.id} ({info.name}, {info.prefix}...) revoked at "
            f"{info.revoked_at.isoformat(timespec='seconds')}"
        )
