"""compose/: no Docker engine runs here, so the compose file is checked structurally
against the code it runs: every command is a real `imgpipe` subcommand with valid
options, every IMGPIPE_* variable a real setting, every dependency and secret declared,
health checks everywhere, the broker and Flower configured as docs/operations.md says.
(tests/integration/test_compose_commands.py runs the same commands without Docker.)"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from imgpipe.settings import SECRET_SETTINGS, Settings
from tests.support.compose import COMPOSE_DIR, imgpipe_command, load_compose, unescape

REPO = COMPOSE_DIR.parent
SETTINGS = set(Settings.model_fields)
IMGPIPE_SERVICES = {"migrate", "orchestrator", "ingest", "cpu-worker", "gpu-worker-0"}


def _setting_of(variable: str) -> str | None:
    """The Settings field an IMGPIPE_* variable sets (``_FILE`` for the secret ones)."""
    name = variable.removeprefix("IMGPIPE_").lower()
    if name in SETTINGS:
        return name
    if name.endswith("_file") and name.removesuffix("_file") in SECRET_SETTINGS:
        return name.removesuffix("_file")
    return None


def test_the_stack_has_every_part_of_the_multi_machine_shape() -> None:
    _base, services = load_compose()
    assert set(services) == {"redis", "postgres", "flower"} | IMGPIPE_SERVICES
    for name in IMGPIPE_SERVICES:
        assert services[name].is_imgpipe, name


@pytest.mark.parametrize("overlays", [(), ("docker-compose.s3.yml",)], ids=["base", "s3"])
def test_every_imgpipe_command_is_a_real_subcommand_and_every_variable_a_setting(
    overlays: tuple[str, ...],
) -> None:
    _base, services = load_compose(*overlays)
    for service in services.values():
        if service.is_imgpipe and service.name != "flower":
            imgpipe_command(service.command)
        check = service.healthcheck
        if check is not None and check["test"][0] == "CMD" and check["test"][1] == "imgpipe":
            imgpipe_command(check["test"][1:])
        for variable in service.env:
            if variable.startswith("IMGPIPE_"):
                assert _setting_of(variable), f"{service.name}: {variable} is no imgpipe setting"
    Settings(**{_setting_of(k): v for k, v in services["orchestrator"].env.items()
                if k.startswith("IMGPIPE_") and not k.endswith("_FILE")})  # fmt: skip


def test_a_bad_command_would_be_caught() -> None:
    with pytest.raises(AssertionError, match="no subcommand"):
        imgpipe_command(["imgpipe", "wrker", "cpu"])
    with pytest.raises(Exception, match="No such option"):
        imgpipe_command(["imgpipe", "worker", "gpu", "--devise", "cuda:0"])
    assert _setting_of("IMGPIPE_BROKER_URL_FILE") == "broker_url"
    assert _setting_of("IMGPIPE_MAX_ATTEMPTS_FILE") is None
    assert _setting_of("IMGPIPE_NOT_A_SETTING") is None


def test_dependencies_exist_and_everything_waits_for_the_migration() -> None:
    base, services = load_compose()
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for service in services.values():
        for dependency, spec in service.depends_on.items():
            assert dependency in services, f"{service.name} depends on unknown {dependency}"
            assert spec.get("condition", "service_started") in conditions
    for name in IMGPIPE_SERVICES - {"migrate"}:
        deps = services[name].depends_on
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
    assert services["migrate"].command == ["imgpipe", "db", "upgrade"]
    assert services["migrate"].depends_on["postgres"]["condition"] == "service_healthy"
    assert services["migrate"].raw["restart"] == "no"
    for service in services.values():
        for secret in service.secrets:
            assert secret in base["secrets"], f"{service.name}: undeclared secret {secret}"


def test_every_long_running_service_has_a_health_check() -> None:
    _base, services = load_compose()
    for service in services.values():
        if service.name == "migrate":
            continue  # a one-shot: the others wait for it to complete
        check = service.healthcheck
        assert check is not None and check.get("test"), f"{service.name} has no health check"
        assert service.raw.get("restart") == "unless-stopped", service.name


def test_redis_keeps_the_queues_and_asks_for_a_password_kept_off_its_argv() -> None:
    _base, services = load_compose()
    script = unescape(" ".join(services["redis"].command))
    assert "--appendonly yes" in script
    assert "--maxmemory-policy noeviction" in script
    assert "requirepass" in script and "/run/secrets/redis_password" in script
    assert "--requirepass" not in script, "a password on argv is visible in ps"


def test_one_gpu_per_gpu_worker() -> None:
    _base, services = load_compose()
    gpu = services["gpu-worker-0"]
    assert gpu.command[-2:] == ["--device", "cuda:0"]
    (device,) = gpu.raw["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["device_ids"] == ["0"]
    assert "gpu" in device["capabilities"]
    assert gpu.image == "imgpipe:cuda" and gpu.raw["build"]["args"]["TORCH"] == "cuda"
    for name in IMGPIPE_SERVICES - {"gpu-worker-0"}:
        assert services[name].raw["build"]["args"]["TORCH"] == "none", "core: no torch"


def test_flower_has_basic_auth_and_publishes_only_on_the_loopback() -> None:
    _base, services = load_compose()
    flower = services["flower"]
    script = unescape(" ".join(flower.command))
    assert "exec celery flower" in script
    assert 'FLOWER_BASIC_AUTH="admin:$(cat /run/secrets/flower_password)"' in script
    assert 'BROKER_URL="$(cat /run/secrets/broker_url)"' in script
    assert flower.raw["ports"], "published for the operator's tunnel"
    for port in flower.raw["ports"]:
        assert str(port).startswith("127.0.0.1:"), f"Flower's /metrics would be public: {port}"


def test_the_dockerfile_builds_each_variant_from_real_extras() -> None:
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "ARG TORCH=none" in dockerfile
    for variant in ("none)", "cpu)", "cuda)"):
        assert variant in dockerfile
    for used in ("s3", "models,nudenet,s3"):
        assert all(e in extras for e in used.split(",")), used
        assert f'extras="{used}"' in dockerfile
    for path in ("imgpipe", "orchestrator", "db", "workers", "migrations"):
        assert f"COPY {path} ./{path}" in dockerfile


def test_init_secrets_makes_every_secret_file_private(tmp_path: Path) -> None:
    base, _services = load_compose()
    shutil.copy(COMPOSE_DIR / "init-secrets.sh", tmp_path)
    done = subprocess.run(
        ["sh", str(tmp_path / "init-secrets.sh")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    for name, spec in base["secrets"].items():
        path = tmp_path / spec["file"]
        assert path.is_file(), f"init-secrets.sh does not make {name}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name
    redis_password = (tmp_path / "secrets" / "redis_password").read_text().strip()
    assert len(redis_password) >= 32
    assert (tmp_path / "secrets" / "broker_url").read_text().strip() == (
        f"redis://:{redis_password}@redis:6379/0"
    )
    before = (tmp_path / "secrets" / "flower_password").read_text()
    subprocess.run(["sh", str(tmp_path / "init-secrets.sh")], capture_output=True, check=True)
    assert (tmp_path / "secrets" / "flower_password").read_text() == before, "kept"
