"""A relation gate through the service: HOREN_RELATION_GATE loads a gate file (refused for another
model), each edit's relation vector is stored with it, replayed after a restart, and travels in a
codebook export; the gate then keeps a prompt from an edit whose relation it does not share."""

from __future__ import annotations

import time

import torch
from fastapi.testclient import TestClient

from horen_core import HorenConfig, HorenEditor, load_model
from horen_core.gate import RelationGate
from service.app import create_app
from tests.service.conftest import first_archived_edit, import_codebook, wait_ready
from tests.service.test_api import TOKEN, make_settings

PROMPT = "Which river flows through Cairo?"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def write_gate(model_dir, path, threshold: float, fingerprint: str | None = None) -> None:
    model, tokenizer = load_model(str(model_dir), device="cpu")
    editor = HorenEditor(model, tokenizer, HorenConfig(layer=1))
    dk = editor.codebook.key_dim
    weight = torch.randn(2 * dk, 8, generator=torch.Generator().manual_seed(0))
    RelationGate(weight, torch.zeros(2 * dk), threshold).save(path, fingerprint or editor.fingerprint)


def test_relation_vectors_are_stored_replayed_and_exported(tmp_path, tiny_model_dir):
    gate_file = tmp_path / "gate.safetensors"
    write_gate(tiny_model_dir, gate_file, threshold=-1.0)
    settings = make_settings(tmp_path / "a", tiny_model_dir, relation_gate=gate_file)
    ask = {"prompt": PROMPT, "max_new_tokens": 4}
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        edit = c.post("/edits", json={"prompt": PROMPT, "target": "Paris"}).json()
        assert c.post("/generate", json=ask).json()["edit_id"] == edit["id"]
        vector = c.app.state.runtime.editor.store.gates[edit["id"]].cpu()
        archive = c.get("/admin/export", headers=ADMIN).content
    line = first_archived_edit(archive)
    assert torch.allclose(torch.tensor(line["gate"]), vector)

    with TestClient(create_app(settings)) as c:  # a restart replays the vector from the database
        wait_ready(c)
        assert torch.equal(c.app.state.runtime.editor.store.gates[edit["id"]].cpu(), vector)

    strict = tmp_path / "strict.safetensors"
    write_gate(tiny_model_dir, strict, threshold=1.5)  # same map, no prompt clears it
    other = make_settings(tmp_path / "b", tiny_model_dir, relation_gate=strict)
    with TestClient(create_app(other)) as c:
        wait_ready(c)
        unedited = c.post("/generate", json=ask).json()
        new_id = import_codebook(c, archive, ADMIN, lambda e: e in c.app.state.runtime.editor.store.gates)
        assert torch.allclose(c.app.state.runtime.editor.store.gates[new_id].cpu(), vector)
        assert c.post("/generate", json=ask).json() == unedited  # gated away: another relation


def test_a_gate_file_of_another_model_is_refused(tmp_path, tiny_model_dir):
    gate_file = tmp_path / "gate.safetensors"
    write_gate(tiny_model_dir, gate_file, threshold=0.5, fingerprint="another-model")
    settings = make_settings(tmp_path, tiny_model_dir, relation_gate=gate_file)
    with TestClient(create_app(settings)) as c:
        for _ in range(600):  # until the load has failed ("the model is still loading" before that)
            ready = c.get("/readyz")
            if "another model" in ready.text:
                break
            time.sleep(0.05)
        assert ready.status_code == 503
        assert "fitted for another model" in ready.text
