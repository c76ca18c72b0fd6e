"""Real services for tests: an embedded redis-server, a fresh database, worker processes."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from db.engine import is_sqlite, normalize_url

__all__ = ["TEST_PG_ENV", "fresh_postgres_database", "own_database", "short_tmp_dir"]

TEST_PG_ENV = "IMGPIPE_TEST_DATABASE_URL"


def short_tmp_dir(prefix: str) -> Path:
    """A temp dir with a short path: unix socket paths are limited to ~100 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """Create an empty database on the server of ``server_url``; drop it afterwards."""
    url = make_url(normalize_url(server_url))
    name = f"imgpipe_test_{uuid.uuid4().hex[:10]}"
    admin_dsn = url.set(drivername="postgresql", database=url.database or "postgres")
    admin = admin_dsn.render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        from db.engine import _engines

        for key, engine in list(_engines.items()):
            if key[1].endswith(f"/{name}"):
                engine.dispose()
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def own_database(database_url: str) -> Iterator[str]:
    """A fresh database of the same backend as ``database_url``, that no other test
    stack's reaper looks at (a shared database would let one stack's reaper re-dispatch
    another stack's stages onto its own broker)."""
    if is_sqlite(database_url):
        directory = short_tmp_dir("ipod-")
        yield f"sqlite:///{directory / 'imgpipe.db'}"
        shutil.rmtree(directory, ignore_errors=True)
    else:
        with fresh_postgres_database(os.environ[TEST_PG_ENV]) as url:
            yield url


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false")
