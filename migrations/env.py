"""Alembic environment for SQLite and PostgreSQL (batch mode on SQLite, which cannot ALTER most things).

URL: the config's sqlalchemy.url (set by `upgrade_database`), else the service's own
`Settings().resolved_database_url()` (HOREN_DATABASE_URL, or the SQLite file in HOREN_DATA_DIR).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from service.db.models import Base
from service.db.session import make_engine
from service.settings import Settings

config = context.config
if config.config_file_name is not None:  # the CLI; in-process upgrades keep the app's logging
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    return Settings().resolved_database_url()


def configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller (e.g. a test) passed its own connection
        configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
