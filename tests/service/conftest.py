"""Fixtures for service tests: a tiny random model saved as a local HF folder (so the service loads
it exactly like a real one) and apps built with their own settings."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from bench.common import build_tiny_model_dir

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-chat"), chat=True)


def wait_ready(client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"service not ready: {r.status_code} {r.text}")


def first_archived_edit(archive: bytes) -> dict:
    """The first line of a codebook archive's edits.jsonl."""
    import io
    import json
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return json.loads(tar.extractfile("edits.jsonl").readline())


def import_codebook(client, archive: bytes, headers: dict, applied) -> int:
    """POST ``archive`` to /admin/import-codebook and wait until the engine has applied its first
    edit (``applied(edit_id)`` true); returns that edit's id here."""
    imported = client.post(
        "/admin/import-codebook", content=archive, headers={**headers, "content-type": "application/x-tar"}
    )
    assert imported.status_code in (200, 201), imported.text
    new_id = imported.json()["first_id"]
    for _ in range(100):  # the engine applies the import from the event log
        if applied(new_id):
            break
        client.get("/readyz")
    return new_id


class ThreadServer:
    """An app served by uvicorn on a free loopback port, in a thread of this process (so a test can
    reach its runtime), with logging left to the test's handlers."""

    def __init__(self, app) -> None:
        import socket

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("the threaded server did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
