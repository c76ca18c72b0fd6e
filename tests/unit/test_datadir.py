"""The default data dir (imgpipe/datadir.py): the same stack from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from imgpipe.datadir import default_data_dir, nearest_local_data_dir, user_data_dir
from imgpipe.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_the_nearest_dot_imgpipe_above_the_current_directory_is_used(tmp_path: Path) -> None:
    (tmp_path / "project" / ".imgpipe").mkdir(parents=True)
    deep = tmp_path / "project" / "src" / "a" / "b"
    deep.mkdir(parents=True)
    assert nearest_local_data_dir(deep) == tmp_path / "project" / ".imgpipe"
    assert default_data_dir(deep, {}) == tmp_path / "project" / ".imgpipe"
    (deep / ".imgpipe").mkdir()
    assert default_data_dir(deep, {}) == deep / ".imgpipe", "the nearest one wins"


def test_without_one_the_per_user_data_dir_is_used(tmp_path: Path) -> None:
    if nearest_local_data_dir(tmp_path) is not None:
        pytest.fail(f"a .imgpipe/ above {tmp_path} makes this test meaningless; remove it")
    assert default_data_dir(tmp_path, {"XDG_DATA_HOME": "/srv/xdg"}) == Path("/srv/xdg/imgpipe")
    home_default = Path.home() / ".local" / "share" / "imgpipe"
    assert default_data_dir(tmp_path, {}) == home_default
    assert user_data_dir({"XDG_DATA_HOME": "relative/ignored"}) == home_default


def test_settings_use_it_unless_imgpipe_data_dir_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".imgpipe").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.delenv("IMGPIPE_DATA_DIR", raising=False)
    assert Settings().resolved_data_dir == tmp_path / ".imgpipe"
    monkeypatch.setenv("IMGPIPE_DATA_DIR", str(tmp_path / "elsewhere"))
    assert Settings().resolved_data_dir == tmp_path / "elsewhere"


def _imgpipe(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgpipe", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_status_from_a_subdirectory_reads_the_stack_of_the_project(tmp_path: Path) -> None:
    """`imgpipe db upgrade` in the project, then `imgpipe status` from a subdirectory
    looks at the same SQLite database (it used to make a new, empty .imgpipe/ there)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("IMGPIPE_") and k not in ("BROKER_URL", "RESULT_BACKEND")
    }
    env["PYTHONPATH"] = str(REPO)
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    project = tmp_path / "project"
    (project / ".imgpipe").mkdir(parents=True)
    upgraded = _imgpipe(["db", "upgrade"], project, env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (project / ".imgpipe" / "imgpipe.db").exists()
    sub = project / "photos" / "2026"
    sub.mkdir(parents=True)
    job_id = str(uuid.uuid4())
    status = _imgpipe(["status", job_id], sub, env)
    assert status.returncode == 1, status.stderr
    assert f"no job {job_id}" in status.stderr
    assert not (sub / ".imgpipe").exists()
    assert not (tmp_path / "xdg").exists()
