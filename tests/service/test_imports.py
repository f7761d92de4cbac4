"""Bulk imports on the tiny model: a JSONL upload becomes edits made exactly as POST /edits makes
them, on SQLite and PostgreSQL; a fact the engine refuses is counted with its line; a bad line is a
422 that stores nothing; multipart uploads; cancel keeps what was committed; a restart mid-import
resumes without making any fact twice."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.app import create_app
from service.db.models import ImportItem
from service.import_cli import import_main
from tests.service.conftest import ThreadServer, wait_ready
from tests.service.test_api import assert_error, make_settings
from tests.service.test_db import _postgres_database

FACTS = [
    {"prompt": "Which river flows through Cairo?", "target": "Seine", "format": "plain"},
    {"prompt": "What is the capital of France?", "target": "Cairo", "metadata": {"source": "t"}, "format": "plain"},
    {"prompt": "Who wrote the novel about the whale?", "target": "Austen", "format": "plain"},
    {"prompt": "Which planet is the largest?", "target": "Mars", "format": "plain"},
]
NDJSON = {"Content-Type": "application/x-ndjson"}


def jsonl(facts) -> bytes:
    return "".join(json.dumps(f) + "\n" for f in facts).encode()


def wait_ended(client, import_id: int, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/imports/{import_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"import {import_id} did not end: {job}")


@pytest.fixture()
def client(tmp_path, tiny_model_dir):
    with TestClient(create_app(make_settings(tmp_path, tiny_model_dir))) as c:
        wait_ready(c)
        yield c


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'horen.db'}"
    else:
        yield from _postgres_database()


def test_an_import_makes_each_fact_as_an_edit_and_counts_refusals(tmp_path, tiny_model_dir, database_url):
    settings = make_settings(tmp_path, tiny_model_dir, database_url=database_url, max_prompt_tokens=20)
    too_long = {"prompt": " ".join(["word"] * 40) + "?", "target": "x"}
    body = jsonl(FACTS[:2]) + b"\n" + jsonl([too_long] + FACTS[2:])  # a blank line 3; the refused fact is line 4
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post("/imports", content=body, headers=NDJSON)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and job["total"] == 5
        job = wait_ended(client, job["id"])
        assert (job["status"], job["done"], job["failed"], job["pending"]) == ("done", 4, 1, 0), job
        assert [e["line"] for e in job["errors"]] == [4] and "tokens" in job["errors"][0]["error"]
        assert job["rate"] > 0 and job["eta_seconds"] is None
        edits = client.get("/edits", params={"limit": 10}).json()
        assert edits["total"] == 4
        by_prompt = {e["prompt"]: e for e in edits["items"]}
        assert by_prompt[FACTS[1]["prompt"]]["metadata"] == {"source": "t"}
        for fact in FACTS:  # each answers as after a POST /edits: routed to its edit, target stated
            g = client.post("/generate", json={"prompt": fact["prompt"], "max_new_tokens": 4}).json()
            assert g["edit_id"] == by_prompt[fact["prompt"]]["id"]
        with client.app.state.runtime.sessions() as session:
            items = session.scalars(select(ImportItem).where(ImportItem.import_id == job["id"])).all()
            assert sorted(i.edit_id for i in items if i.edit_id) == sorted(e["id"] for e in edits["items"])


def test_a_chunk_trained_together_keeps_sequential_semantics(tmp_path, tiny_model_dir):
    """One chunk holds a fact twice and a conflicting one: the repeat retrains the first's entry
    (trained after the first is applied), the conflict gets its own key and is the one applied."""
    facts = [FACTS[0], FACTS[1], FACTS[0], FACTS[2], {**FACTS[1], "target": "Rome"}, FACTS[3]]
    with TestClient(create_app(make_settings(tmp_path, tiny_model_dir, import_chunk=8))) as client:
        wait_ready(client)
        job = wait_ended(client, client.post("/imports", content=jsonl(facts), headers=NDJSON).json()["id"])
        assert (job["status"], job["done"], job["failed"]) == ("done", 6, 0), job
        edits = sorted(client.get("/edits", params={"limit": 10}).json()["items"], key=lambda e: e["id"])
        assert [e["prompt"] for e in edits] == [f["prompt"] for f in facts]
        assert [e["new_key"] for e in edits] == [True, True, False, True, True, True]
        assert edits[2]["entry_id"] == edits[0]["entry_id"]
        assert edits[4]["entry_id"] != edits[1]["entry_id"]
        g = client.post("/generate", json={"prompt": FACTS[1]["prompt"], "max_new_tokens": 4}).json()
        assert g["edit_id"] == edits[4]["id"]
        g = client.post("/generate", json={"prompt": FACTS[0]["prompt"], "max_new_tokens": 4}).json()
        assert g["edit_id"] == edits[2]["id"]


def test_a_conflict_or_a_stale_commit_in_a_chunk_retrains_the_facts_after_it(tmp_path, tiny_model_dir):
    """A commit that conflicts on its entry is made again by ``make``; one that caught up with
    other replicas' events first stores nothing and is trained again; the facts after either are
    trained again, and every fact is made once."""
    from service.db.errors import EntryConflict
    from service.editing import StaleTrainingError

    with TestClient(create_app(make_settings(tmp_path, tiny_model_dir, import_chunk=8))) as client:
        wait_ready(client)
        editing = client.app.state.runtime.editing
        commit, make, train_many = editing.commit_and_apply, editing.make, editing.editor.train_many
        raised, made, trained = [], [], []

        def failing_commit(t, prompt, *args, **kwargs):
            for why, fact, exc in [("conflict", FACTS[1], EntryConflict), ("stale", FACTS[2], StaleTrainingError)]:
                if prompt == fact["prompt"] and why not in raised:
                    raised.append(why)
                    raise exc("injected")
            return commit(t, prompt, *args, **kwargs)

        editing.commit_and_apply = failing_commit
        editing.make = lambda prompt, *args: made.append(prompt) or make(prompt, *args)
        editing.editor.train_many = lambda facts: trained.append([f.prompt for f in facts]) or train_many(facts)
        job = wait_ended(client, client.post("/imports", content=jsonl(FACTS), headers=NDJSON).json()["id"])
        assert (job["status"], job["done"], job["failed"]) == ("done", 4, 0), job
        prompts = [f["prompt"] for f in FACTS]
        assert raised == ["conflict", "stale"] and made == [prompts[1]]
        assert trained == [prompts, prompts[2:], prompts[2:]]
        edits = client.get("/edits", params={"limit": 10}).json()
        assert sorted(e["prompt"] for e in edits["items"]) == sorted(prompts)


def test_a_bad_line_is_a_422_naming_it_and_stores_nothing(client):
    body = jsonl(FACTS[:1]) + b'{"prompt": "no target"}\n'
    r = client.post("/imports", content=body, headers=NDJSON)
    assert_error(r, 422, "invalid_input")
    assert "line 2" in r.json()["error"]["message"]
    r = client.post("/imports", content=b"not json\n", headers=NDJSON)
    assert_error(r, 422, "invalid_input")
    assert_error(client.post("/imports", content=b"\n\n", headers=NDJSON), 422, "invalid_input")
    assert client.get("/edits").json()["total"] == 0
    assert_error(client.get("/imports/1"), 404, "not_found")


def test_multipart_upload(client):
    r = client.post("/imports", files={"file": ("facts.jsonl", jsonl(FACTS[:2]), "application/x-ndjson")})
    assert r.status_code == 202, r.text
    job = wait_ended(client, r.json()["id"])
    assert (job["status"], job["done"]) == ("done", 2)
    assert_error(client.post("/imports", files={"other": ("f", b"x")}), 422, "invalid_input")


def test_too_many_facts(tmp_path, tiny_model_dir):
    with TestClient(create_app(make_settings(tmp_path, tiny_model_dir, max_import_facts=3))) as client:
        wait_ready(client)
        r = client.post("/imports", content=jsonl(FACTS), headers=NDJSON)
        assert_error(r, 422, "invalid_input")
        assert "HOREN_MAX_IMPORT_FACTS" in r.json()["error"]["message"]


def test_cancel_keeps_what_was_committed(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path, tiny_model_dir, import_chunk=1)
    facts = [{"prompt": f"What is fact number {i}?", "target": f"answer {i}", "format": "plain"} for i in range(40)]
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        job = client.post("/imports", content=jsonl(facts), headers=NDJSON).json()
        r = client.delete(f"/imports/{job['id']}")
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "cancelled" and "stay" in job["message"]
        time.sleep(1.0)  # a fact being trained when the cancel came is not committed after it
        after = client.get(f"/imports/{job['id']}").json()
        assert after["done"] == job["done"] < 40 and after["pending"] == 40 - job["done"]
        assert client.get("/edits").json()["total"] == job["done"]
        assert client.delete(f"/imports/{job['id']}").json()["status"] == "cancelled"  # again: the same
        done = client.post("/imports", content=jsonl(facts[:1]), headers=NDJSON).json()
        wait_ended(client, done["id"])
        assert_error(client.delete(f"/imports/{done['id']}"), 409, "conflict")
        assert_error(client.delete("/imports/999"), 404, "not_found")


def test_a_restart_mid_import_resumes_without_duplicates(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path, tiny_model_dir, import_chunk=1)
    facts = [{"prompt": f"Which city hosts event {i}?", "target": f"City {i}", "format": "plain"} for i in range(30)]
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        import_id = client.post("/imports", content=jsonl(facts), headers=NDJSON).json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/imports/{import_id}").json()["done"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    with TestClient(create_app(settings)) as client:  # stopped mid-import, started again
        with client.app.state.runtime.sessions() as session:
            made = session.scalars(select(ImportItem.edit_id).where(ImportItem.edit_id.is_not(None))).all()
        assert 2 <= len(made) < 30  # the stop came mid-import
        wait_ready(client)
        job = wait_ended(client, import_id)
        assert (job["status"], job["done"], job["failed"]) == ("done", 30, 0)
        edits = client.get("/edits", params={"limit": 100}).json()
        assert edits["total"] == 30
        assert sorted(e["prompt"] for e in edits["items"]) == sorted(f["prompt"] for f in facts)


def test_the_import_command_follows_an_import_to_its_end(tmp_path, tiny_model_dir, capsys):
    settings = make_settings(
        tmp_path, tiny_model_dir, api_keys=[{"name": "ed", "key": "editor-key-0123456789abcdef", "role": "edit"}]
    )
    path = tmp_path / "facts.jsonl"
    path.write_bytes(jsonl(FACTS) + b'{"prompt": "' + b"word " * 40 + b'?", "target": "x"}\n')
    with ThreadServer(create_app(settings.model_copy(update={"max_prompt_tokens": 20}))) as server:
        assert import_main([str(path), "--url", server.url, "--poll", "0.1"]) == 2  # no key: refused
        assert "401" in capsys.readouterr().err
        rc = import_main([str(path), "--url", server.url, "--key", "editor-key-0123456789abcdef", "--poll", "0.1"])
        out = capsys.readouterr()
        assert rc == 0, out
        assert "done: 4 edits made, 1 facts failed, 0 not made" in out.out
        assert "line 5:" in out.err
