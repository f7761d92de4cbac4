"""Real server processes on free ports, with the real default model (or the tiny random one of
tests/service), on SQLite or PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("HOREN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TOKEN = "e2e-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self,
        db_url: str,
        data_dir: Path,
        log_path: Path,
        device: str = "cpu",
        model: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.db_url, self.data_dir, self.log_path = db_url, data_dir, log_path
        self.device, self.model = device, model  # model None: the bundled default
        self.env = dict(env or {})  # more HOREN_ settings
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> Server:
        self.port = free_port()
        env = {
            **os.environ,
            "HOREN_DATABASE_URL": self.db_url,
            "HOREN_DATA_DIR": str(self.data_dir),
            "HOREN_CONVERTED_DIR": str(REPO / ".horen" / "converted"),
            "HOREN_ADMIN_TOKEN": TOKEN,
            "HOREN_DEVICE": self.device,
            "HOREN_SYNC_INTERVAL": "0.5",
        }
        if self.model:
            env["HOREN_MODEL"] = self.model
        env.update(self.env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


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


# method settings that make the tiny model learn an edit in a fraction of a second
TINY_HOREN = '{"layer": 1, "max_steps": 60, "lr": 0.5, "stop_loss": 1.0}'


@pytest.fixture(scope="session")
def e2e_tiny_model_dir(tmp_path_factory) -> Path:
    from tests.service.conftest import build_tiny_model_dir

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
    """A PostgreSQL cluster of this test's own (tests/e2e/scratch_pg.py), free to stop and start."""
    from tests.e2e.scratch_pg import ScratchPostgres, unavailable_reason

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
