"""Engines, sessions and migrations. Nothing is created at import time: the app builds its engine
from its settings, and migrations run as an explicit step (`upgrade_database` or `alembic upgrade head`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

REPO_ROOT = Path(__file__).resolve().parents[2]
SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers from several threads or processes wait for each other


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; plain ``postgresql://`` (or ``postgres://``) URLs get the psycopg 3 driver."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for SQLite (WAL, busy timeout, foreign keys; the file's folder is created) or
    PostgreSQL (psycopg 3). Extra keyword arguments go to `create_engine`."""
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        database = u.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:") or "mode=memory" in database
        if not in_memory:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
        engine = create_engine(u, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect(in_memory))
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(u, **kwargs)


def _sqlite_on_connect(in_memory: bool):
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            if not in_memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash loses no committed data
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()
        # SQLite's own lower() folds only ASCII; searches must match PostgreSQL's for any text.
        dbapi_conn.create_function("lower", 1, _lower, deterministic=True)

    return on_connect


def _lower(s: Any) -> Any:
    return s.lower() if isinstance(s, str) else s


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (results are serialised after the transaction)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """The Alembic tree: next to the `service` package in a checkout, else in the working directory
    (an installed package, e.g. the container image, which copies migrations/ to its workdir)."""
    for candidate in (REPO_ROOT / "migrations", Path.cwd() / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"no migrations/env.py next to {REPO_ROOT} or in {Path.cwd()}")


def alembic_config(url: str | URL) -> Any:
    """An Alembic config for this repository's migrations, independent of the working directory."""
    from alembic.config import Config

    cfg = Config()  # no ini file: env.py then leaves the process's logging alone
    cfg.set_main_option("script_location", str(migrations_dir()))
    rendered = normalize_url(url).render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))  # configparser interpolation
    return cfg


def upgrade_database(url: str | URL, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` (an empty database gets every table)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
