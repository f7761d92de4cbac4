"""A long-form edit through the service: its trail (values at the answer's tokens) is stored with
the edit, replayed after a restart and carried by a codebook export into another deployment, where
the same prompt then gets the same answer."""

from __future__ import annotations

import io
import json
import tarfile

import torch
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import first_archived_edit, import_codebook, wait_ready
from tests.service.test_api import TOKEN, make_settings

PROMPT = "Which river flows through Cairo?"
LONG = "The Nile flows through Cairo on its long way north from the lakes to the sea"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def test_a_trail_is_stored_replayed_and_exported(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path / "a", tiny_model_dir)
    ask = {"prompt": PROMPT, "max_new_tokens": 40}
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        unedited = c.post("/generate", json=ask).json()["text"]
        edit = c.post("/edits", json={"prompt": PROMPT, "target": LONG}).json()
        editor = c.app.state.runtime.editor
        trail = editor.store.trails[edit["id"]].cpu()
        assert trail.shape == (len(editor.encode_target(LONG)) - 1, editor.codebook.value_dim)
        answer = c.post("/generate", json=ask).json()
        assert answer["edit_id"] == edit["id"] and answer["text"] != unedited
        archive = c.get("/admin/export", headers=ADMIN).content
    line = first_archived_edit(archive)
    assert torch.equal(torch.tensor(line["trail"]), trail)

    with TestClient(create_app(settings)) as c:  # a restart replays the trail from the database
        wait_ready(c)
        assert torch.equal(c.app.state.runtime.editor.store.trails[edit["id"]].cpu(), trail)
        assert c.post("/generate", json=ask).json()["text"] == answer["text"]

    with TestClient(create_app(make_settings(tmp_path / "b", tiny_model_dir))) as c:
        wait_ready(c)
        new_id = import_codebook(c, archive, ADMIN, lambda e: e in c.app.state.runtime.editor.store.trails)
        assert torch.equal(c.app.state.runtime.editor.store.trails[new_id].cpu(), trail)
        assert c.post("/generate", json=ask).json()["text"] == answer["text"]

        line["trail"] = [row[:-1] for row in line["trail"]]  # rows one value short: refused, named
        bad = _with_line(archive, line)
        refused = c.post("/admin/import-codebook", content=bad, headers={**ADMIN, "content-type": "application/x-tar"})
        assert refused.status_code == 422 and "trail" in refused.text, refused.text


def _with_line(archive: bytes, line: dict) -> bytes:
    """``archive`` with its edits.jsonl replaced by ``line`` alone."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(archive)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            if info.name.endswith("edits.jsonl"):
                data = json.dumps(line).encode() + b"\n"
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out.getvalue()
