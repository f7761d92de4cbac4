"""End to end, as a user would: the real server process with the real model edits a fact, answers
it (and a rephrase), leaves an unrelated prompt alone, survives a restart, and rolls back."""

from __future__ import annotations

import pytest

from bench.common import TOKEN

pytestmark = [pytest.mark.server, pytest.mark.real_model]

# a ZsRE record (zsre_edit_dev.json) with a counterfactual target, and an unrelated question
PROMPT = "What voice type is Lola Beeth?"
REPHRASE = "What is the vocal range for Lola Beeth?"
TARGET = "baritone"
UNRELATED = "nq question: who sang the theme song for the fresh prince of bel air"


def gen(c, prompt: str, n: int = 8) -> dict:
    r = c.post("/generate", json={"prompt": prompt, "max_new_tokens": n})
    assert r.status_code == 200, r.text
    return r.json()


def test_edit_generate_restart_rollback(make_server, database_url):
    server = make_server(database_url).start()
    with server.client() as c:
        original = gen(c, PROMPT)
        unrelated = gen(c, UNRELATED)
        assert original["edit_id"] is None and TARGET not in original["text"]
        r = c.post("/edits", json={"prompt": PROMPT, "target": TARGET})
        assert r.status_code == 201, r.text
        edit = r.json()
        edited = gen(c, PROMPT)
        assert edited["text"].strip().startswith(TARGET) and edited["edit_id"] == edit["id"]
        reph = gen(c, REPHRASE)
        assert reph["text"].strip().startswith(TARGET) and reph["edit_id"] == edit["id"]
        assert gen(c, UNRELATED) == unrelated
    server.stop()

    server.start()
    with server.client() as c:
        assert gen(c, PROMPT) == edited
        assert gen(c, REPHRASE) == reph
        assert gen(c, UNRELATED) == unrelated
        r = c.post(f"/admin/edits/{edit['id']}/rollback", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["status"] == "rolled_back"
        assert gen(c, PROMPT) == original
        assert gen(c, UNRELATED) == unrelated
        assert c.get(f"/edits/{edit['id']}").json()["status"] == "rolled_back"
