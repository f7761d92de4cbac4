"""The HTTP API on a tiny random model and SQLite: status codes, the error shape, persistence
across restarts, rollback, and that bad input changes nothing stored."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.db.session import upgrade_database
from service.settings import Settings
from service.worker import QueueFullError
from tests.service.conftest import wait_ready

TOKEN = "s3cret-token"


def make_settings(tmp_path, model_dir, **over) -> Settings:
    url = over.pop("database_url", f"sqlite:///{tmp_path / 'horen.db'}")
    s = Settings(
        data_dir=tmp_path,
        database_url=url,
        model=str(model_dir),
        device=over.pop("device", "cpu"),
        admin_token=over.pop("admin_token", TOKEN),
        horen={"layer": 1, "max_steps": 60, "lr": 0.5, "stop_loss": 1.0},
        **over,
    )
    upgrade_database(s.resolved_database_url())
    return s


@pytest.fixture()
def settings(tmp_path, tiny_model_dir):
    return make_settings(tmp_path, tiny_model_dir)


@pytest.fixture()
def client(settings):
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_error(r, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    assert body["error"]["message"]


def test_edit_then_generate_routes_to_it(client):
    r = client.post(
        "/edits", json={"prompt": "Which river flows through Cairo?", "target": "Paris", "metadata": {"by": "t"}}
    )
    assert r.status_code == 201, r.text
    e = r.json()
    assert e["status"] == "active" and e["new_key"] is True and e["metadata"] == {"by": "t"}
    assert e["steps"] >= 1 and e["train_ms"] > 0 and e["entry_id"] == e["id"]
    g = client.post("/generate", json={"prompt": "Which river flows through Cairo?", "max_new_tokens": 4})
    assert g.status_code == 200
    assert g.json()["edit_id"] == e["id"]
    assert g.json()["text"].strip().startswith("Paris")
    assert client.get(f"/edits/{e['id']}").json()["prompt"] == "Which river flows through Cairo?"


def test_generate_without_edits_answers_as_the_unedited_model(client):
    prompt = {"prompt": "Which river flows through Cairo?", "max_new_tokens": 4}
    before = client.post("/generate", json=prompt).json()
    e = client.post("/edits", json={"prompt": prompt["prompt"], "target": "Paris", "format": "plain"}).json()
    after = client.post("/generate", json=prompt).json()
    unedited = client.post("/generate", json={**prompt, "edits": False}).json()
    assert after["edit_id"] == e["id"] and after["text"] != before["text"]
    assert unedited == {"text": before["text"], "edit_id": None}


def test_generate_reports_the_routing_score_against_the_threshold(client):
    prompt = {"prompt": "Which river flows through Cairo?", "max_new_tokens": 4}
    empty = client.post("/generate", json=prompt).json()
    # an unrouted answer carries no score, so it stays the same as keys are added
    assert empty["edit_id"] is None and "score" not in empty and "threshold" not in empty
    e = client.post("/edits", json={"prompt": prompt["prompt"], "target": "Paris", "format": "plain"}).json()
    routed = client.post("/generate", json=prompt).json()
    assert routed["edit_id"] == e["id"] and routed["threshold"] <= routed["score"] <= 1.0 + 1e-6
    other = client.post("/generate", json={**prompt, "prompt": "The quick brown fox jumps"}).json()
    assert other["edit_id"] is None and "score" not in other


def test_list_pagination_filter_search(client):
    ids = []
    for p, t in [
        ("What is the capital of France?", "Cairo"),
        ("Who wrote the novel?", "Nile"),
        ("The quick brown fox?", "dog"),
    ]:
        ids.append(client.post("/edits", json={"prompt": p, "target": t}).json()["id"])
    page = client.get("/edits", params={"limit": 2, "offset": 0}).json()
    assert page["total"] == 3 and [x["id"] for x in page["items"]] == ids[:2]
    assert [x["id"] for x in client.get("/edits", params={"limit": 2, "offset": 2}).json()["items"]] == ids[2:]
    assert client.get("/edits", params={"q": "NOVEL"}).json()["items"][0]["id"] == ids[1]
    assert client.get("/edits", params={"q": "nile"}).json()["total"] == 1
    client.post(f"/admin/edits/{ids[0]}/rollback", headers=auth())
    assert client.get("/edits", params={"status": "rolled_back"}).json()["total"] == 1
    assert client.get("/edits", params={"status": "active"}).json()["total"] == 2


def test_batch_edits_in_order(client):
    r = client.post(
        "/edits/batch",
        json={
            "edits": [
                {"prompt": "What is the capital of France?", "target": "Nile"},
                {"prompt": "Who wrote the novel about the whale?", "target": "fox"},
            ]
        },
    )
    assert r.status_code == 201, r.text
    items = r.json()["items"]
    assert len(items) == 2 and items[0]["id"] < items[1]["id"]


def test_rollback_and_idempotence(client):
    e = client.post("/edits", json={"prompt": "When was the inception of the challenge?", "target": "Cairo"}).json()
    before = client.post("/generate", json={"prompt": "When was the inception of the challenge?"}).json()
    assert before["edit_id"] == e["id"]
    r = client.post(f"/admin/edits/{e['id']}/rollback", headers=auth())
    assert r.status_code == 200 and r.json()["status"] == "rolled_back" and r.json()["rolled_back_by"] == "admin"
    again = client.post(f"/admin/edits/{e['id']}/rollback", headers=auth())
    assert again.status_code == 200 and again.json()["rolled_back_at"] == r.json()["rolled_back_at"]
    after = client.post("/generate", json={"prompt": "When was the inception of the challenge?"}).json()
    assert after["edit_id"] is None


def test_restart_answers_as_before(settings):
    prompt = "Which river flows through Cairo?"
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        e = c.post("/edits", json={"prompt": prompt, "target": "Melville"}).json()
        first = c.post("/generate", json={"prompt": prompt, "max_new_tokens": 6}).json()
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        again = c.post("/generate", json={"prompt": prompt, "max_new_tokens": 6}).json()
        assert again == first and again["edit_id"] == e["id"]
        assert c.get("/readyz").json()["status"] == "ready"


def test_restart_rebuilds_the_same_codebook_from_a_log_with_retrains_and_rollbacks(settings):
    """The replay on start (new entries in bulk, retrains and rollbacks in log order) rebuilds the
    codebook bit-identically: same rows, keys, values and versions."""
    facts = [
        ("Which river flows through Cairo?", "Melville"),
        ("Who wrote the challenge?", "Oslo"),
        ("Which river flows through Cairo?", "Melville"),  # retrains the first entry
        ("When was the inception of the bridge?", "Lima"),
        ("Who wrote the challenge?", "Oslo"),
    ]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        made = [c.post("/edits", json={"prompt": p, "target": t}).json() for p, t in facts]
        assert not made[2]["new_key"] and made[2]["entry_id"] == made[0]["entry_id"]
        for e in (made[1], made[3]):
            assert c.post(f"/admin/edits/{e['id']}/rollback", headers=auth()).status_code == 200
        before = c.app.state.runtime.editor.codebook.state_dict()
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        after = c.app.state.runtime.editor.codebook.state_dict()
    assert before.keys() == after.keys()
    # the service allocates entry ids from the database (an entry's id is its creating edit's), so
    # the codebook's own counter only follows the replayed entries: 3 here, where 5 had been seen
    for k in before.keys() - {"next_entry_id"}:
        assert torch.equal(before[k], after[k]), k
    assert int(after["next_entry_id"]) == max(e["entry_id"] for e in (made[0], made[4])) + 1


@pytest.mark.gpu
def test_service_on_cuda_edits_restarts_and_rolls_back(tmp_path, tiny_model_dir):
    """The engine with the model and codebook on the GPU, the key index in use from the first key."""
    settings = make_settings(tmp_path, tiny_model_dir, device="cuda", index_min_keys=0)
    prompts = ["Which river flows through Cairo?", "Who wrote the novel?"]
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        detail = c.get("/readyz").json()["detail"]
        assert detail["device"].startswith("cuda") and detail["codebook_device"].startswith("cuda")
        assert detail["index"] in ("gpu-flat-ip", "none-exact-on-device")
        before = c.post("/generate", json={"prompt": prompts[0], "max_new_tokens": 6}).json()
        e = c.post("/edits", json={"prompt": prompts[0], "target": "Melville"}).json()
        c.post("/edits", json={"prompt": prompts[1], "target": "Nile"})
        first = [c.post("/generate", json={"prompt": p, "max_new_tokens": 6}).json() for p in prompts]
        assert first[0]["edit_id"] == e["id"] and first[0]["text"].strip().startswith("Melville")
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert [c.post("/generate", json={"prompt": p, "max_new_tokens": 6}).json() for p in prompts] == first
        assert c.post(f"/admin/edits/{e['id']}/rollback", headers=auth()).json()["status"] == "rolled_back"
        assert c.post("/generate", json={"prompt": prompts[0], "max_new_tokens": 6}).json() == before


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "kind"),
    [
        ("post", "/edits", {"json": {"target": "x"}}, 422, "validation_error"),
        ("post", "/edits", {"json": {"prompt": "", "target": "x"}}, 422, "validation_error"),
        ("post", "/edits", {"json": {"prompt": "   ", "target": "x"}}, 422, "validation_error"),
        ("post", "/edits", {"json": {"prompt": "a", "target": ""}}, 422, "validation_error"),
        ("post", "/edits", {"json": {"prompt": 3, "target": "x"}}, 422, "validation_error"),
        ("post", "/edits", {"json": {"prompt": "a", "target": "x", "metadata": [1]}}, 422, "validation_error"),
        ("post", "/edits", {"json": {"prompt": "word " * 400, "target": "x"}}, 422, "invalid_input"),
        (
            "post",
            "/edits",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
        ),
        ("post", "/edits/batch", {"json": {"edits": []}}, 422, "validation_error"),
        ("post", "/generate", {"json": {"prompt": "hi", "max_new_tokens": 0}}, 422, "validation_error"),
        ("post", "/generate", {"json": {"prompt": "hi", "max_new_tokens": 100000}}, 422, "invalid_input"),
        ("post", "/generate", {"json": {"prompt": "hi", "temperature": -1}}, 422, "validation_error"),
        ("post", "/generate", {"json": {"prompt": "word " * 400}}, 422, "invalid_input"),
        ("post", "/generate", {"json": {"prompt": "hi", "format": "markdown"}}, 422, "validation_error"),
        # the tiny model's tokenizer has no chat template
        ("post", "/generate", {"json": {"prompt": "hi", "format": "chat"}}, 422, "invalid_input"),
        ("post", "/edits", {"json": {"prompt": "hi", "target": "x", "format": "chat"}}, 422, "invalid_input"),
        ("get", "/edits/999999", {}, 404, "not_found"),
        ("get", "/edits/abc", {}, 422, "validation_error"),
        ("get", "/edits", {"params": {"limit": 0}}, 422, "validation_error"),
        ("get", "/nowhere", {}, 404, "not_found"),
        ("post", "/admin/edits/1/rollback", {}, 401, "unauthorized"),
        ("post", "/admin/edits/1/rollback", {"headers": {"Authorization": "Bearer wrong"}}, 401, "unauthorized"),
        ("post", "/admin/edits/999999/rollback", {"headers": {"Authorization": f"Bearer {TOKEN}"}}, 404, "not_found"),
    ],
)
def test_bad_input_gets_4xx_and_changes_nothing(client, method, path, kwargs, status, kind):
    e = client.post("/edits", json={"prompt": "What is the capital of France?", "target": "Nile"}).json()
    before = client.get("/edits").json()
    r = getattr(client, method)(path, **kwargs)
    assert_error(r, status, kind)
    assert client.get("/edits").json() == before
    # the server keeps serving, with the edit still applied
    g = client.post("/generate", json={"prompt": "What is the capital of France?", "max_new_tokens": 2})
    assert g.status_code == 200 and g.json()["edit_id"] == e["id"]


def test_admin_disabled_without_token(tmp_path, tiny_model_dir):
    s = make_settings(tmp_path, tiny_model_dir, admin_token="")
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        assert_error(c.post("/admin/edits/1/rollback", headers=auth("")), 403, "admin_disabled")
        assert_error(c.post("/admin/edits/1/rollback", headers=auth("anything")), 403, "admin_disabled")


def test_full_queue_answers_503_with_retry_after(client, monkeypatch):
    runtime = client.app.state.runtime

    def full(*_a, **_k):
        raise QueueFullError("the request queue is full")

    monkeypatch.setattr(runtime, "submit", full)
    r = client.post("/generate", json={"prompt": "hi"})
    assert_error(r, 503, "overloaded")
    assert r.headers["Retry-After"] == "1"


def test_engine_queue_is_bounded(tmp_path, tiny_model_dir):
    from service.jobs import SyncJob
    from service.runtime import Runtime

    runtime = Runtime(make_settings(tmp_path, tiny_model_dir, queue_size=2))  # thread not started
    runtime.worker.submit(SyncJob())
    runtime.worker.submit(SyncJob())
    with pytest.raises(QueueFullError):
        runtime.worker.submit(SyncJob())
    runtime.db_engine.dispose()


def test_metrics_and_health(client):
    client.post("/edits", json={"prompt": "What is the capital of France?", "target": "Nile"})
    client.post("/generate", json={"prompt": "hi"})
    text = client.get("/metrics").text
    for name in (
        "horen_edits_total 1.0",
        "horen_generate_latency_seconds_bucket",
        "horen_edit_latency_seconds_count",
        "horen_codebook_entries 1.0",
        "horen_queue_depth",
        "horen_rollbacks_total",
    ):
        assert name in text
    assert client.get("/healthz").json() == {"status": "ok", "detail": {}}
    assert "/edits" in json.dumps(client.get("/openapi.json").json()["paths"])
