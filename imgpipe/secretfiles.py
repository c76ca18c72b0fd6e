"""Secrets from files: ``IMGPIPE_<NAME>_FILE`` holds the path of a file with the value.

Docker and Kubernetes secrets, systemd credentials and vault agents all hand a process a
file; reading the value from it keeps it off command lines and out of the environment
of whatever started imgpipe. The file's content is the value, without its trailing
newline. Setting both ``IMGPIPE_<NAME>`` and ``IMGPIPE_<NAME>_FILE`` is an error: which
one wins would be a guess.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import PydanticBaseSettingsSource

from imgpipe.errors import ConfigError

__all__ = ["SECRET_SETTINGS", "SecretFilesSource", "read_secret_file"]

SECRET_SETTINGS = ("broker_url", "redis_url", "database_url", "webhook_secret", "flower_password")
"""Settings that may hold credentials: each can come from ``IMGPIPE_<NAME>_FILE``."""

ENV_PREFIX = "IMGPIPE_"


def read_secret_file(variable: str, path: str) -> str:
    """The value in the file ``path`` named by ``variable`` (trailing newline removed)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"{variable}={path}: cannot read it ({reason}); point it at a readable UTF-8 "
            "file that holds the value, or unset it"
        ) from None
    value = text.removesuffix("\n").removesuffix("\r")
    if not value:
        raise ConfigError(f"{variable}={path}: the file is empty; write the value into it")
    return value


class SecretFilesSource(PydanticBaseSettingsSource):
    """Values of ``SECRET_SETTINGS`` read from the files ``IMGPIPE_<NAME>_FILE`` name."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = f"{ENV_PREFIX}{field_name.upper()}_FILE"
        path = os.environ.get(variable)
        if field_name not in SECRET_SETTINGS or not path:
            return None, field_name, False
        direct = f"{ENV_PREFIX}{field_name.upper()}"
        if os.environ.get(direct):
            raise ConfigError(
                f"both {direct} and {variable} are set; keep one (the file keeps the secret "
                "out of the environment of whatever starts imgpipe)"
            )
        return read_secret_file(variable, path), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field_name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, field_name)
            if value is not None:
                values[key] = value
        return values
