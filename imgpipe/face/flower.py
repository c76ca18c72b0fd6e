"""Flower for ``imgpipe up``: configured through its environment, never its command line.

Flower reads every option from ``FLOWER_<OPTION>`` variables and the ``celery`` command
reads its broker from ``BROKER_URL``, so the basic-auth password and a broker URL with
credentials stay out of ``ps`` and ``/proc/PID/cmdline`` (readable by every user of the
machine); a process's environment is readable only by its own user and root.

Flower 2.2.0 serves ``/metrics`` (Prometheus) without authentication even with basic
auth on, so it listens on ``flower_address`` (127.0.0.1 unless told otherwise);
docs/operations.md says how to keep it private in a deployment.
"""

from __future__ import annotations

import sys

from imgpipe.errors import ConfigError
from imgpipe.settings import Settings

__all__ = ["flower_command", "flower_env"]


def flower_command() -> list[str]:
    """Flower's command line: nothing secret on it (see ``flower_env``)."""
    return [sys.executable, "-m", "celery", "flower"]


def flower_env(settings: Settings) -> dict[str, str]:
    """Variables that configure Flower for ``settings`` (added to the child's environment)."""
    if settings.flower_password is None:
        raise ConfigError(
            "Flower needs a basic-auth password: set IMGPIPE_FLOWER_PASSWORD or "
            "IMGPIPE_FLOWER_PASSWORD_FILE"
        )
    password = settings.flower_password.get_secret_value()
    if "," in password or "," in settings.flower_user or ":" in settings.flower_user:
        raise ConfigError(
            "Flower's user may contain neither ',' nor ':' and its password no ',' (Flower "
            "splits FLOWER_BASIC_AUTH on commas); choose another IMGPIPE_FLOWER_PASSWORD"
        )
    return {
        "BROKER_URL": settings.effective_broker_url,
        "FLOWER_BASIC_AUTH": f"{settings.flower_user}:{password}",
        "FLOWER_ADDRESS": settings.flower_address,
        "FLOWER_PORT": str(settings.flower_port),
        "FLOWER_DB": str(settings.resolved_data_dir / "flower.db"),
    }
