"""Alembic environment: the URL comes from the config (set by db.migrate) or IMGPIPE_*."""

from __future__ import annotations

from alembic import context

from db.engine import make_engine, normalize_url
from db.models import Base
from imgpipe.settings import Settings

config = context.config
url = config.get_main_option("sqlalchemy.url") or Settings().effective_database_url
url = normalize_url(url)
target_metadata = Base.metadata


def run_offline() -> None:
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
