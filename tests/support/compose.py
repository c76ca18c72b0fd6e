"""Reading compose/docker-compose.yml (and its S3 overlay) the way docker compose does
for what the tests need: services with YAML anchors merged, their commands, the
variables each container gets, dependencies and health checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
import yaml

__all__ = [
    "COMPOSE_DIR",
    "ComposeService",
    "imgpipe_command",
    "load_compose",
    "unescape",
]

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"


def unescape(value: str) -> str:
    """Compose's ``$$`` is a literal ``$``."""
    return value.replace("$$", "$")


@dataclass
class ComposeService:
    name: str
    raw: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> list[str]:
        command = self.raw.get("command", [])
        return [command] if isinstance(command, str) else list(command)

    @property
    def image(self) -> str:
        return str(self.raw.get("image", ""))

    @property
    def is_imgpipe(self) -> bool:
        return self.image.startswith("imgpipe:")

    @property
    def depends_on(self) -> dict[str, dict[str, Any]]:
        deps = self.raw.get("depends_on", {})
        return {d: {} for d in deps} if isinstance(deps, list) else dict(deps)

    @property
    def healthcheck(self) -> dict[str, Any] | None:
        check = self.raw.get("healthcheck")
        return None if check is None or check.get("disable") else dict(check)

    @property
    def secrets(self) -> list[str]:
        return [s if isinstance(s, str) else s["source"] for s in self.raw.get("secrets", [])]


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _as_env(environment: Any) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in (environment or {}).items()}


def load_compose(*overlays: str) -> tuple[dict[str, Any], dict[str, ComposeService]]:
    """The parsed base file, and each service with the environment its container gets
    (env_file, then environment; overlays merged in order, environment per variable and
    secrets by name, as compose merges them)."""
    base = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    services = {}
    for name, raw in base["services"].items():
        env: dict[str, str] = {}
        for env_file in raw.get("env_file", []):
            env.update(_env_file(COMPOSE_DIR / env_file))
        env.update(_as_env(raw.get("environment")))
        services[name] = ComposeService(name, dict(raw), env)
    for overlay in overlays:
        extra = yaml.safe_load((COMPOSE_DIR / overlay).read_text())
        for name, raw in extra["services"].items():
            service = services[name]
            service.env.update(_as_env(raw.get("environment")))
            secrets = list(dict.fromkeys([*service.secrets, *raw.get("secrets", [])]))
            service.raw = {**service.raw, "secrets": secrets}
        base.setdefault("secrets", {}).update(extra.get("secrets", {}))
    return base, services


def imgpipe_command(args: list[str]) -> Any:
    """The CLI command that ``imgpipe ARGS`` runs, after Typer's click parsed ARGS as it
    would at run time (unknown commands, options or bad values raise its usage errors)."""
    from imgpipe.face.cli import app

    if not args or args[0] != "imgpipe":
        raise AssertionError(f"not an imgpipe command: {args}")
    command: Any = typer.main.get_command(app)
    rest = args[1:]
    path = ["imgpipe"]
    while isinstance(getattr(command, "commands", None), dict):
        if not rest or rest[0] not in command.commands:
            raise AssertionError(f"{' '.join(path)} has no subcommand {rest[:1]}: {args}")
        path.append(rest[0])
        command = command.commands[rest[0]]
        rest = rest[1:]
    command.make_context(" ".join(path), list(rest))
    return command
