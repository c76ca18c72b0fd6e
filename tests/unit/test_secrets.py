"""Credentials: redacted wherever a URL is shown, read from files, never on argv."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgpipe.errors import ConfigError
from imgpipe.face.flower import flower_command, flower_env
from imgpipe.redact import redact_text, redact_url
from imgpipe.settings import Settings

SECRET = "s3cret-Pw"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{SECRET}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (f"rediss://user:{SECRET}@host:6380/1", "rediss://user:***@host:6380/1"),
        (f"postgresql+psycopg://u:{SECRET}@w@h/db", "postgresql+psycopg://u:***@h/db"),
        (f"redis://h/0?password={SECRET}&ssl=1", "redis://h/0?password=***&ssl=1"),
        ("redis+socket:///tmp/d/redis.sock", "redis+socket:///tmp/d/redis.sock"),
        ("sqlite:////tmp/d/imgpipe.db", "sqlite:////tmp/d/imgpipe.db"),
        ("redis://user@host/0", "redis://user@host/0"),
    ],
)
def test_redact_url_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_hides_passwords_of_urls_quoted_in_a_message() -> None:
    text = f"cannot reach redis://:{SECRET}@h:1/0 (and http://h:8080/x is fine)"
    assert redact_text(text) == "cannot reach redis://:***@h:1/0 (and http://h:8080/x is fine)"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("BROKER_URL", "DATABASE_URL", "FLOWER_PASSWORD", "WEBHOOK_SECRET"):
        monkeypatch.delenv(f"IMGPIPE_{name}", raising=False)
        monkeypatch.delenv(f"IMGPIPE_{name}_FILE", raising=False)
    return monkeypatch


def test_secrets_come_from_files_and_stay_out_of_repr(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "pw").write_text(f"{SECRET}\n")
    (tmp_path / "broker").write_text(f"redis://:{SECRET}@h:1/0")
    clean_env.setenv("IMGPIPE_FLOWER_PASSWORD_FILE", str(tmp_path / "pw"))
    clean_env.setenv("IMGPIPE_BROKER_URL_FILE", str(tmp_path / "broker"))
    settings = Settings()
    assert settings.flower_password is not None
    assert settings.flower_password.get_secret_value() == SECRET
    assert settings.effective_broker_url == f"redis://:{SECRET}@h:1/0"
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    env = settings.to_env()  # what children get: the values themselves, in their environment
    assert env["IMGPIPE_FLOWER_PASSWORD"] == SECRET
    assert env["IMGPIPE_BROKER_URL"] == f"redis://:{SECRET}@h:1/0"


def test_a_secret_set_twice_or_unreadable_is_a_config_error(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "pw").write_text(SECRET)
    clean_env.setenv("IMGPIPE_FLOWER_PASSWORD_FILE", str(tmp_path / "pw"))
    clean_env.setenv("IMGPIPE_FLOWER_PASSWORD", SECRET)
    with pytest.raises(ConfigError, match="keep one"):
        Settings()
    clean_env.delenv("IMGPIPE_FLOWER_PASSWORD")
    clean_env.setenv("IMGPIPE_FLOWER_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read it"):
        Settings()


def test_flower_gets_credentials_through_its_environment_only(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, broker_url=f"redis://:{SECRET}@h:1/0", flower_password=SECRET
    )
    assert not any(SECRET in arg for arg in flower_command())
    env = flower_env(settings)
    assert env["FLOWER_BASIC_AUTH"] == f"admin:{SECRET}"
    assert env["BROKER_URL"] == f"redis://:{SECRET}@h:1/0"
    assert env["FLOWER_ADDRESS"] == "127.0.0.1"
    with pytest.raises(ConfigError, match="no ','"):
        flower_env(
            settings.model_copy(
                update={"flower_password": Settings(flower_password="a,b").flower_password}
            )
        )
