"""Log files bounded in size (copytruncate) and structured log lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from imgpipe.face.logrotate import rotate_if_large
from imgpipe.logs import resolve_format

REPO = Path(__file__).resolve().parents[2]


def test_a_file_past_its_size_is_copied_and_emptied_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cpu.log"
    with path.open("ab") as writer:  # like a child's stdout: O_APPEND
        writer.write(b"a" * 2000)
        writer.flush()
        assert rotate_if_large(path, max_bytes=1000, backups=2)
        assert path.stat().st_size == 0
        assert (tmp_path / "cpu.log.1").read_bytes() == b"a" * 2000
        writer.write(b"b" * 1500)
        writer.flush()
        assert path.read_bytes() == b"b" * 1500, "the writer continues at the new start"
        assert rotate_if_large(path, max_bytes=1000, backups=2)
    assert (tmp_path / "cpu.log.1").read_bytes() == b"b" * 1500
    assert (tmp_path / "cpu.log.2").read_bytes() == b"a" * 2000
    assert not rotate_if_large(path, max_bytes=1000, backups=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.log", "cpu.log.1", "cpu.log.2"]


def test_without_backups_the_file_is_only_emptied(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"z" * 5000)
    assert rotate_if_large(path, max_bytes=1024, backups=0)
    assert path.read_bytes() == b"" and [p.name for p in tmp_path.iterdir()] == ["x.log"]


def test_auto_log_format_is_json_off_a_terminal(tmp_path: Path) -> None:
    with (tmp_path / "f").open("w") as stream:
        assert resolve_format("auto", stream) == "json"
        assert resolve_format("console", stream) == "console"


def test_json_lines_carry_the_bound_stage_and_the_worker() -> None:
    """In a child process (logging is process-wide): a line logged inside the context of a
    stage names it; a line after the context does not."""
    code = """
import logging
from imgpipe.logs import bound_stages, configure_logging
configure_logging("json", "INFO", worker="cpu-1@host")
log = logging.getLogger("imgpipe.test")
with bound_stages([("job-1", "quality", 2, 17)]):
    log.warning("inside %s", "the stage")
with bound_stages([("job-1", "quality", 1, 17), ("job-2", "detect", 1, 18)]):
    log.info("a batch")
log.info("after")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    inside, batch, after = (json.loads(line) for line in result.stderr.splitlines())
    assert inside["event"] == "inside the stage" and inside["level"] == "warning"
    assert (inside["job_id"], inside["stage"], inside["attempt"]) == ("job-1", "quality", 2)
    assert inside["stage_run_id"] == 17 and inside["worker"] == "cpu-1@host"
    assert batch["job_ids"] == ["job-1", "job-2"] and batch["stages"] == ["detect", "quality"]
    assert "job_id" not in after and after["worker"] == "cpu-1@host"
