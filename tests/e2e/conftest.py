"""Real server processes on free ports (`bench.common.Server`), with the real default model (or the
tiny random one of tests/service), on SQLite or PostgreSQL."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from bench.common import TINY_HOREN, Server, build_tiny_model_dir
from bench.scratch_pg import ScratchPostgres, unavailable_reason

PG_ADMIN = os.environ.get("HOREN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_ADMIN.replace("postgresql+psycopg", "postgresql"), connect_timeout=3).close()
        return True
    except Exception:
        return False


@pytest.fixture()
def pg_database_url():
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    if not _pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN}; start it (see README)")
    name = f"horen_e2e_{uuid.uuid4().hex[:10]}"
    admin = PG_ADMIN.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'horen.db'}"
    return request.getfixturevalue("pg_database_url")


@pytest.fixture(scope="session")
def e2e_tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("e2e-tiny"), max_positions=256, chat=True)


@pytest.fixture()
def make_tiny_server(tmp_path, e2e_tiny_model_dir):
    """Like make_server, on the tiny model; extra keyword arguments are HOREN_ settings (name=value)."""
    servers: list[Server] = []

    def factory(db_url: str, name: str = "a", **settings: str) -> Server:
        env = {"HOREN_HOREN": TINY_HOREN, **{f"HOREN_{k.upper()}": str(v) for k, v in settings.items()}}
        s = Server(
            db_url, tmp_path / f"data-{name}", tmp_path / f"server-{name}.log", model=str(e2e_tiny_model_dir), env=env
        )
        servers.append(s)
        return s

    yield factory
    for s in servers:
        s.stop(kill=True)


@pytest.fixture()
def scratch_pg():
    """A PostgreSQL cluster of this test's own (bench/scratch_pg.py), free to stop and start."""
    why = unavailable_reason()
    if why:
        pytest.skip(f"no scratch PostgreSQL: {why}")
    pg = ScratchPostgres().init()
    pg.start()
    yield pg
    pg.destroy()


@pytest.fixture()
def make_server(tmp_path):
    servers: list[Server] = []

    def factory(db_url: str, name: str = "a") -> Server:
        s = Server(db_url, tmp_path / f"data-{name}", tmp_path / f"server-{name}.log")
        servers.append(s)
        return s

    yield factory
    for s in servers:
        s.stop(kill=True)
