"""An edit's subject through the API: stored, reported, applied to routing, and kept across a restart."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import wait_ready
from tests.service.test_api import make_settings

PROMPT = "Which river flows through Cairo?"


def test_subject_is_stored_gates_routing_and_survives_a_restart(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path, tiny_model_dir)
    ask = {"prompt": PROMPT, "max_new_tokens": 4}
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        unedited = c.post("/generate", json=ask).json()
        inferred = c.post("/edits", json={"prompt": PROMPT, "target": "Paris"}).json()
        assert inferred["subject"] == "Cairo"
        assert c.post("/generate", json=ask).json()["edit_id"] == inferred["id"]
        c.post(f"/admin/edits/{inferred['id']}/rollback", headers={"Authorization": "Bearer s3cret-token"})
        gated = c.post("/edits", json={"prompt": PROMPT, "target": "Paris", "subject": "Giza"}).json()
        assert gated["subject"] == "Giza" and c.get(f"/edits/{gated['id']}").json()["subject"] == "Giza"
        assert c.post("/generate", json=ask).json() == unedited  # the prompt does not name Giza
        bad = c.post("/edits", json={"prompt": PROMPT, "target": "Paris", "subject": "x" * 501})
        assert bad.status_code == 422
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.post("/generate", json=ask).json() == unedited
        anywhere = c.post("/edits", json={"prompt": PROMPT, "target": "Rome", "subject": ""}).json()
        assert anywhere["subject"] == ""
        assert c.post("/generate", json=ask).json()["edit_id"] == anywhere["id"]
