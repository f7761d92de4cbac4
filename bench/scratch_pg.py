"""A PostgreSQL cluster of our own, for tests and benchmarks that stop and start the database: made
with initdb in a temporary folder and run with pg_ctl as the ``postgres`` user on a free port. The
machine's own PostgreSQL is never touched."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable_reason() -> str | None:
    """Why a scratch cluster cannot be made here, or None."""
    if _bindir() is None:
        return "no /usr/lib/postgresql/*/bin/pg_ctl"
    if os.geteuid() != 0 and _whoami() != "postgres":
        return "initdb must run as the postgres user: needs root (runuser) or to be postgres"
    return None


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


class ScratchPostgres:
    def __init__(self) -> None:
        self.bin = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="horen-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        shutil.chown(self.root, "postgres", "postgres")
        os.chmod(self.root, 0o755)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def init(self) -> ScratchPostgres:
        self._as_postgres(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self, timeout: float = 60) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=on"
        self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-o", opts, "-l", self.root / "log", "-w", "start")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self._as_postgres(self.bin / "pg_isready", "-h", "127.0.0.1", "-p", str(self.port), check=False)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"scratch PostgreSQL did not start: {(self.root / 'log').read_text()[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` ends the sessions cleanly; ``immediate`` is a crash (recovery from WAL on start)."""
        self._as_postgres(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
