"""API keys and roles: every route allowed and refused for each role, the open modes without keys
(loopback: as before; another interface: no anonymous edits), keys stored by sha256 through the
admin routes, who did what in the edit log and the audit, and no key in the logs or the audit."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.app import create_app
from service.db.models import ApiKey
from tests.service.conftest import wait_ready
from tests.service.test_api import TOKEN, assert_error, auth, make_settings

KEYS = {
    "reader": ("read", "reader-key-0123456789abcdef"),
    "editor": ("edit", "editor-key-0123456789abcdef"),
    "boss": ("admin", "boss-key-0123456789abcdef"),
}
QUESTION = "Which river flows through Cairo?"


def api_keys() -> list[dict]:
    return [{"name": n, "key": k, "role": r} for n, (r, k) in KEYS.items()]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_chat_model_dir):
    """One app with the three keys and the admin token, and an edit to act on."""
    tmp = tmp_path_factory.mktemp("auth")
    s = make_settings(tmp, tiny_chat_model_dir, api_keys=api_keys())
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        r = c.post("/edits", json={"prompt": QUESTION, "target": "Paris"}, headers=auth(KEYS["editor"][1]))
        assert r.status_code == 201, r.text
        c.edit_id = r.json()["id"]
        yield c


# (method, path, body, role needed); {edit} is the edit made by the fixture
ROUTES = [
    ("get", "/edits", None, "read"),
    ("get", "/edits/{edit}", None, "read"),
    ("post", "/generate", {"prompt": QUESTION, "max_new_tokens": 1}, "read"),
    ("get", "/v1/models", None, "read"),
    ("post", "/v1/completions", {"prompt": QUESTION, "max_tokens": 1}, "read"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, "read"),
    ("post", "/edits", {"prompt": "Who wrote the novel?", "target": "Nile"}, "edit"),
    ("post", "/edits/batch", {"edits": [{"prompt": "Who wrote the novel?", "target": "Nile"}]}, "edit"),
    ("post", "/admin/edits/999999/rollback", None, "admin"),
    ("get", "/admin/audit", None, "admin"),
    ("get", "/admin/keys", None, "admin"),
    ("post", "/admin/keys", {"name": "made-{caller}", "role": "read"}, "admin"),
    ("delete", "/admin/keys/999999", None, "admin"),
]
CALLERS = {"nobody": None, "wrong": None, "reader": "read", "editor": "edit", "boss": "admin"}  # caller -> role
ORDER = ["read", "edit", "admin"]


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize(("method", "path", "body", "needed"), ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_each_role_is_allowed_and_refused_on_each_route(keyed, caller, method, path, body, needed):
    headers = {}
    if caller == "wrong":
        headers = auth("not-a-key-0123456789")
    elif caller != "nobody":
        headers = auth(KEYS[caller][1])
    kwargs = {"headers": headers}
    if body is not None:
        kwargs["json"] = json.loads(json.dumps(body).replace("{caller}", caller))
    r = keyed.request(method.upper(), path.format(edit=keyed.edit_id), **kwargs)
    openai = path.startswith("/v1/")
    role = CALLERS[caller]
    if role is None:
        assert r.status_code == 401, r.text
        kind = r.json()["error"]["code" if openai else "type"]
        assert kind == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
    elif ORDER.index(role) < ORDER.index(needed):
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code" if openai else "type"] == "forbidden"
    else:
        # allowed: whatever the route answers, it is not an auth error (the 404s are unknown ids)
        assert r.status_code in (200, 201, 204, 404), r.text
        if r.status_code == 404:
            assert path.endswith("999999") or path.endswith("999999/rollback")


def test_open_routes_need_no_key(keyed):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert keyed.get(path).status_code == 200


def test_the_admin_token_is_the_admin_key_named_admin(keyed):
    e = keyed.post("/edits", json={"prompt": "The quick brown fox?", "target": "dog"}, headers=auth(TOKEN)).json()
    assert e["created_by"] == "admin"
    r = keyed.post(f"/admin/edits/{e['id']}/rollback", headers=auth(TOKEN))
    assert r.status_code == 200 and r.json()["rolled_back_by"] == "admin"


def test_stored_keys_are_made_listed_used_and_deleted(keyed):
    boss = auth(KEYS["boss"][1])
    r = keyed.post("/admin/keys", json={"name": "ci-bot", "role": "edit"}, headers=boss)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["name"] == "ci-bot" and made["role"] == "edit" and made["created_by"] == "boss"
    key = made["key"]
    listed = keyed.get("/admin/keys", headers=boss).json()["items"]
    assert key not in json.dumps(listed)
    assert {(k["name"], k["source"]) for k in listed} >= {("ci-bot", "database"), ("admin", "settings")}
    # stored by its sha256 only
    with keyed.app.state.runtime.sessions() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.name == "ci-bot")).one()
        assert row.key_sha256 == hashlib.sha256(key.encode()).hexdigest() and key not in row.key_sha256
    e = keyed.post("/edits", json={"prompt": "Who wrote the whale?", "target": "Oslo"}, headers=auth(key))
    assert e.status_code == 201 and e.json()["created_by"] == "ci-bot"
    assert_error(keyed.get("/admin/audit", headers=auth(key)), 403, "forbidden")
    assert_error(keyed.post("/admin/keys", json={"name": "ci-bot", "role": "read"}, headers=boss), 409, "conflict")
    assert_error(keyed.post("/admin/keys", json={"name": "reader", "role": "read"}, headers=boss), 409, "conflict")
    assert keyed.delete(f"/admin/keys/{made['id']}", headers=boss).status_code == 204
    assert_error(keyed.get("/edits", headers=auth(key)), 401, "unauthorized")
    assert_error(keyed.delete(f"/admin/keys/{made['id']}", headers=boss), 404, "not_found")


def test_audit_lists_who_did_what_filtered_and_paged(keyed):
    boss, editor = auth(KEYS["boss"][1]), auth(KEYS["editor"][1])
    a = keyed.post("/edits", json={"prompt": "What is the capital of France?", "target": "Nile"}, headers=editor).json()
    keyed.post(f"/admin/edits/{a['id']}/rollback", headers=boss)
    everything = keyed.get("/admin/audit", headers=boss, params={"limit": 1000}).json()
    assert everything["total"] == len(everything["items"]) >= 3
    newest = everything["items"][0]
    assert (newest["kind"], newest["edit_id"], newest["actor"]) == ("rollback", a["id"], "boss")
    assert newest["prompt"] == "What is the capital of France?"
    ids = [x["id"] for x in everything["items"]]
    assert ids == sorted(ids, reverse=True)
    mine = keyed.get("/admin/audit", headers=boss, params={"actor": "editor", "kind": "edit"}).json()
    assert mine["total"] >= 2 and all(x["actor"] == "editor" and x["kind"] == "edit" for x in mine["items"])
    assert keyed.get("/admin/audit", headers=boss, params={"actor": "nobody-at-all"}).json()["total"] == 0
    page = keyed.get("/admin/audit", headers=boss, params={"limit": 1, "offset": 1}).json()
    assert page["total"] == everything["total"] and [x["id"] for x in page["items"]] == ids[1:2]
    at = newest["at"]
    since = keyed.get("/admin/audit", headers=boss, params={"since": at}).json()
    assert newest["id"] in [x["id"] for x in since["items"]]
    until = keyed.get("/admin/audit", headers=boss, params={"until": at}).json()
    assert newest["id"] not in [x["id"] for x in until["items"]]
    assert_error(keyed.get("/admin/audit", headers=boss, params={"kind": "delete"}), 422, "validation_error")
    assert keyed.get(f"/edits/{a['id']}", headers=boss).json()["created_by"] == "editor"


def test_keys_never_appear_in_logs_or_the_audit(tmp_path, tiny_model_dir, caplog):
    secret = [k for _, k in KEYS.values()] + [TOKEN]
    caplog.set_level(logging.DEBUG)
    s = make_settings(tmp_path, tiny_model_dir, api_keys=api_keys())
    assert not any(k in repr(s) or k in str(s.model_dump()) for k in secret[:3])
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        boss = auth(KEYS["boss"][1])
        made = c.post("/admin/keys", json={"name": "temp", "role": "edit"}, headers=boss).json()["key"]
        secret.append(made)
        e = c.post("/edits", json={"prompt": QUESTION, "target": "Paris"}, headers=auth(made)).json()
        c.post(f"/admin/edits/{e['id']}/rollback", headers=auth(TOKEN))
        c.post("/edits", json={"prompt": QUESTION, "target": "Paris"}, headers=auth("wrong-" + made))
        c.post("/generate", json={"prompt": "hi", "max_new_tokens": 1}, headers=auth(KEYS["reader"][1]))
        audit = json.dumps(c.get("/admin/audit", headers=boss).json())
        edits = json.dumps(c.get("/edits", headers=boss).json())
        keys = json.dumps(c.get("/admin/keys", headers=boss).json())
    assert "temp" in audit and "admin" in audit
    logs = caplog.text + " ".join(str(r.args) for r in caplog.records)
    assert len(caplog.records) > 0
    for k in secret:
        assert k not in logs and k not in audit and k not in edits and k not in keys


def test_without_keys_on_loopback_the_service_is_open_as_before(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO)
    s = make_settings(tmp_path, tiny_model_dir, admin_token="")
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        assert "no API keys configured" in caplog.text and "open" in caplog.text
        e = c.post("/edits", json={"prompt": QUESTION, "target": "Paris"}, headers=auth("sk-anything"))
        assert e.status_code == 201 and e.json()["created_by"] is None
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
        assert_error(c.post(f"/admin/edits/{e.json()['id']}/rollback"), 403, "admin_disabled")


def test_without_keys_on_another_interface_edits_are_refused(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO)
    s = make_settings(tmp_path, tiny_model_dir, host="0.0.0.0")
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        assert "edits are refused" in caplog.text
        r = c.post("/edits", json={"prompt": QUESTION, "target": "Paris"})
        assert_error(r, 403, "edits_disabled")
        assert "HOREN_API_KEYS" in r.json()["error"]["message"]
        assert_error(
            c.post("/edits/batch", json={"edits": [{"prompt": QUESTION, "target": "x"}]}), 403, "edits_disabled"
        )
        assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 1}).status_code == 200
        assert c.get("/edits").json()["total"] == 0
        # the admin token still edits, and is recorded
        ok = c.post("/edits", json={"prompt": QUESTION, "target": "Paris"}, headers=auth(TOKEN))
        assert ok.status_code == 201 and ok.json()["created_by"] == "admin"


def test_a_stored_key_closes_an_open_service(tmp_path, tiny_model_dir):
    s = make_settings(tmp_path, tiny_model_dir)
    with TestClient(create_app(s)) as c:
        wait_ready(c)
        assert c.get("/edits").status_code == 200
        key = c.post("/admin/keys", json={"name": "first", "role": "read"}, headers=auth(TOKEN)).json()["key"]
        assert_error(c.get("/edits"), 401, "unauthorized")
        assert c.get("/edits", headers=auth(key)).status_code == 200
        assert_error(c.post("/edits", json={"prompt": QUESTION, "target": "x"}, headers=auth(key)), 403, "forbidden")
