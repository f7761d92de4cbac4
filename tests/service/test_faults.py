"""No input reaches a 500, faults become clear answers: the inputs schemathesis found, a read-only
or full SQLite database (503 database_unavailable, nothing half-written, automatic recovery), a
model that fails to load, and every limit with its 413/422/429, on the tiny model."""

from __future__ import annotations

import asyncio
import subprocess

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from service.app import create_app
from tests.service.conftest import wait_ready
from tests.service.test_api import assert_error, make_settings

PROMPT = "Which river flows through Cairo?"


@pytest.fixture()
def client(tmp_path, tiny_model_dir):
    with TestClient(create_app(make_settings(tmp_path, tiny_model_dir))) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(
    "path",
    ["/edits?offset=280075277305244029026304", "/edits/99999999999999999999", "/edits/0", "/admin/audit?offset=1e30"],
)
def test_out_of_range_ids_and_offsets_are_422(client, path):
    r = client.get(path, headers={"Authorization": "Bearer s3cret-token"})
    assert_error(r, 422, "validation_error")


def test_largest_offset_and_id_answer_normally(client):
    assert client.get("/edits", params={"offset": 2**63 - 1}).json() == {"items": [], "total": 0}
    assert_error(client.get(f"/edits/{2**31 - 1}"), 404, "not_found")


@pytest.mark.parametrize("temperature", [3.7e-86, 1e-300, 5e-324, 0.0009])
def test_temperature_too_small_for_a_distribution_is_greedy(client, temperature):
    greedy = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4}).json()
    r = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4, "temperature": temperature})
    assert r.status_code == 200, r.text
    assert r.json() == greedy


def test_whitespace_only_and_nul_text_rejected_by_the_schema(client):
    for target in ["\u3000", "\x1c", "\ufeff", "a\x00b"]:
        assert_error(client.post("/edits", json={"prompt": PROMPT, "target": target}), 422, "validation_error")
    assert_error(client.get("/edits", params={"q": "a\x00"}), 422, "validation_error")
    body = b'{"prompt": "\\ud800 hi", "target": "x"}'  # a lone surrogate
    r = client.post("/edits", content=body, headers={"content-type": "application/json"})
    assert_error(r, 422, "validation_error")
    assert client.get("/edits").json()["total"] == 0


def test_405_has_an_allow_header(client):
    r = client.delete("/edits")
    assert_error(r, 405, "method_not_allowed")
    assert set(r.headers["Allow"].replace(" ", "").split(",")) == {"GET", "POST"}


def test_openapi_declares_errors_limits_and_links(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/edits"]["post"]
    for status in ("401", "403", "409", "413", "422", "429", "503"):
        ref = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorOut")
    assert "Retry-After" in post["responses"]["503"]["headers"]
    assert "GetEdit" in post["responses"]["201"]["links"]
    assert "404" in spec["paths"]["/edits/{edit_id}"]["get"]["responses"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("OpenAIErrorOut")
    params = {p["name"]: p["schema"] for p in spec["paths"]["/edits"]["get"]["parameters"]}
    assert params["offset"]["maximum"] == 2**63 - 1
    models = spec["components"]["schemas"]
    assert models["GenerateRequest"]["properties"]["max_new_tokens"]["maximum"] == 512
    assert "pattern" in models["EditCreate"]["properties"]["target"]
    assert "text/plain; version=0.0.4" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


# ---- the database failing ---------------------------------------------------------------------
def _break_sqlite(runtime, pragma: str):
    """Every new connection of the runtime's database engine runs ``pragma`` (;-separated; the pool is emptied so that all do)."""

    def on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        for statement in pragma.split(";"):
            cur.execute(statement)
        cur.close()

    event.listen(runtime.db_engine, "connect", on_connect)
    runtime.db_engine.dispose()
    return lambda: (event.remove(runtime.db_engine, "connect", on_connect), runtime.db_engine.dispose())


@pytest.mark.parametrize(
    "pragma",
    ["PRAGMA query_only=ON", "FULL"],
    ids=["read-only", "full-disk"],
)
def test_unwritable_sqlite_answers_503_writes_nothing_and_recovers(tmp_path, tiny_model_dir, pragma):
    data = tmp_path / "data"
    data.mkdir()
    if pragma == "FULL":
        _mount_small_tmpfs(data)
    try:
        with TestClient(create_app(make_settings(data, tiny_model_dir))) as client:
            wait_ready(client)
            _unwritable(client, pragma, data)
    finally:
        if pragma == "FULL":
            subprocess.run(["umount", "-l", str(data)], check=False)


def _mount_small_tmpfs(path) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mounting one is not permitted here: {r.stderr!r}")


def _fill(path) -> None:
    f = open(path / "filler", "wb", buffering=0)
    try:
        while f.write(b"\1" * 65536):
            pass
    except OSError:
        pass  # the disk is full
    finally:
        f.close()


def _unwritable(client, pragma, data) -> None:
    runtime = client.app.state.runtime
    kept = client.post("/edits", json={"prompt": "What is the capital of France?", "target": "Nile"}).json()
    before = client.get("/edits").json()
    if pragma == "FULL":
        _fill(data)
        mend = lambda: (data / "filler").unlink()  # noqa: E731
    else:
        mend = _break_sqlite(runtime, pragma)
    try:
        r = client.post("/edits", json={"prompt": PROMPT, "target": "Paris"})
        assert_error(r, 503, "database_unavailable")
        assert r.headers["Retry-After"] == "2"
        assert "sqlite" not in r.text.lower() and "pragma" not in r.text.lower()
        r = client.post("/edits/batch", json={"edits": [{"prompt": PROMPT, "target": "Paris"}]})
        assert_error(r, 503, "database_unavailable")
        # answered from memory meanwhile
        g = client.post("/generate", json={"prompt": "What is the capital of France?", "max_new_tokens": 2})
        assert g.status_code == 200 and g.json()["edit_id"] == kept["id"]
        assert client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).json()["edit_id"] is None
        assert client.get("/readyz").status_code == 200  # it still serves generation and reads
    finally:
        mend()
    assert client.get("/edits").json() == before  # nothing half-written
    r = client.post("/edits", json={"prompt": PROMPT, "target": "Paris"})
    assert r.status_code == 201, r.text
    assert client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).json()["edit_id"] == r.json()["id"]


def test_unreadable_database_is_503_on_reads_and_readyz(client, tmp_path):
    runtime = client.app.state.runtime
    client.post("/edits", json={"prompt": "What is the capital of France?", "target": "Nile"})
    mend = _break_sqlite(runtime, f"ATTACH DATABASE '{tmp_path}/no/such/dir/x.db' AS gone")
    try:
        for path in ("/edits", "/edits/1"):
            assert_error(client.get(path), 503, "database_unavailable")
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["detail"]["reason"] == "database unavailable"
        assert "Retry-After" in r.headers
        assert client.post("/generate", json={"prompt": "What is the capital of France?"}).status_code == 200
    finally:
        mend()
    assert client.get("/readyz").status_code == 200
    assert client.get("/edits").json()["total"] == 1


def test_model_that_fails_to_load_is_a_503_with_the_reason(tmp_path):
    s = make_settings(tmp_path, tmp_path / "no-such-model")
    with TestClient(create_app(s)) as c:
        for _ in range(200):
            r = c.get("/readyz")
            if "failed" in r.text:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert r.status_code == 503 and "the model failed to load" in r.json()["detail"]["reason"]
        assert c.get("/healthz").status_code == 200
        assert_error(c.post("/generate", json={"prompt": "hi"}), 503, "not_ready")


def test_unexpected_error_is_500_without_internals(client, monkeypatch):
    runtime = client.app.state.runtime

    def boom(*_a, **_k):
        raise RuntimeError("secret detail at /srv/host:5432")

    monkeypatch.setattr(runtime, "in_sync", boom)
    monkeypatch.setattr(runtime, "submit", boom)
    plain = TestClient(client.app, raise_server_exceptions=False)  # the fixture's runtime, no second lifespan
    r = plain.post("/generate", json={"prompt": "hi"})
    assert_error(r, 500, "internal")
    assert "secret" not in r.text and "RuntimeError" not in r.text


# ---- limits -----------------------------------------------------------------------------------
def test_limits_answer_413_and_422_with_the_numbers(tmp_path, tiny_model_dir):
    s = make_settings(
        tmp_path,
        tiny_model_dir,
        max_body_bytes=4096,
        max_prompt_tokens=12,
        max_target_tokens=3,
        max_metadata_bytes=100,
        max_metadata_depth=3,
        max_batch_edits=2,
    )
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        r = c.post("/edits", json={"prompt": PROMPT, "target": "x", "metadata": {"pad": "y" * 5000}})
        assert_error(r, 413, "body_too_large")
        assert "4096" in r.json()["error"]["message"]

        def chunks():
            yield b'{"prompt": "hi", "target": "x", "metadata": {"pad": "'
            for _ in range(10):
                yield b"z" * 1000
            yield b'"}}'

        r = c.post("/edits", content=chunks(), headers={"content-type": "application/json"})  # no Content-Length
        assert_error(r, 413, "body_too_large")
        long = "the quick brown fox jumps over the lazy dog " * 3
        r = c.post("/edits", json={"prompt": long, "target": "x"})
        assert_error(r, 422, "invalid_input")
        assert "the limit is 12 (HOREN_MAX_PROMPT_TOKENS)" in r.json()["error"]["message"]
        assert_error(c.post("/generate", json={"prompt": long, "max_new_tokens": 2}), 422, "invalid_input")
        r = c.post("/edits", json={"prompt": PROMPT, "target": "Herman Melville wrote the whale"})
        assert_error(r, 422, "invalid_input")
        assert "the limit is 3 (HOREN_MAX_TARGET_TOKENS)" in r.json()["error"]["message"]
        r = c.post("/edits", json={"prompt": PROMPT, "target": "x", "metadata": {"a": "b" * 200}})
        assert_error(r, 422, "invalid_input")
        assert "HOREN_MAX_METADATA_BYTES" in r.json()["error"]["message"]
        r = c.post("/edits", json={"prompt": PROMPT, "target": "x", "metadata": {"a": {"b": {"c": {"d": 1}}}}})
        assert_error(r, 422, "invalid_input")
        assert "HOREN_MAX_METADATA_DEPTH" in r.json()["error"]["message"]
        r = c.post("/edits", json={"prompt": PROMPT, "target": "x", "metadata": {"a": "\x00"}})
        assert_error(r, 422, "invalid_input")
        batch = {"edits": [{"prompt": PROMPT, "target": "x"}] * 3}
        assert_error(c.post("/edits/batch", json=batch), 422, "invalid_input")
        assert c.get("/edits").json()["total"] == 0
        ok = c.post("/edits", json={"prompt": PROMPT, "target": "Paris", "metadata": {"a": {"b": 1}}})
        assert ok.status_code == 201, ok.text


def test_per_client_concurrency_answers_429(tmp_path, tiny_model_dir):
    import threading

    from service.jobs import SyncJob
    from tests.service.conftest import ThreadServer

    s = make_settings(tmp_path, tiny_model_dir, max_client_concurrency=2)
    app = create_app(s)
    with ThreadServer(app) as srv:
        runtime = app.state.runtime
        gate = threading.Event()
        runtime.replication.sync = lambda: gate.wait(30)  # a job that holds the device thread until released
        runtime.submit(SyncJob())

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                body = {"prompt": PROMPT, "max_new_tokens": 1}
                held = [asyncio.create_task(c.post("/generate", json=body)) for _ in range(2)]
                await asyncio.sleep(0.5)  # both in flight, waiting for the engine
                third = await c.post("/generate", json=body)
                v1 = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
                probe = await c.get("/readyz")
                gate.set()
                return [third, v1, probe, *await asyncio.gather(*held)]

        try:
            third, v1, probe, *held = asyncio.run(burst())
        finally:
            gate.set()
    assert third.status_code == 429 and third.headers["Retry-After"] == "1"
    assert third.json()["error"]["type"] == "too_many_requests"
    assert v1.status_code == 429 and v1.json()["error"]["code"] == "too_many_requests"  # OpenAI's shape
    assert probe.status_code in (200, 503)  # probes are never refused
    assert [r.status_code for r in held] == [200, 200]


def test_metadata_counts_nesting_of_lists_too():
    from service.api.routes import check_metadata
    from service.settings import Settings

    s = Settings(max_metadata_depth=2)
    check_metadata({"a": [1, 2]}, s)
    with pytest.raises(Exception, match="deeper than 2"):
        check_metadata({"a": [[1]]}, s)
    deep: dict = {}
    node = deep
    for _ in range(5000):  # deeper than Python's recursion limit: still a clean refusal
        node["x"] = {}
        node = node["x"]
    with pytest.raises(Exception, match="deeper"):
        check_metadata(deep, s)
