"""The official `openai` package against a real server process with the real model and API keys:
chat and completions, streaming and not, an edit made through POST /edits answered in chat,
`edits: false` giving the unedited answer, and keys refused or never written to the server's log."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = [pytest.mark.server, pytest.mark.real_model]

openai = pytest.importorskip("openai")

# a ZsRE record (tests/fixtures/zsre_small.json) with its real answer as the target
QUESTION = "Which family does Ramalinaceae belong to?"
TARGET = "Lecanorales"
READ_KEY = "e2e-read-key-0123456789abcdef"
EDIT_KEY = "e2e-edit-key-0123456789abcdef"


def content(stream) -> str:
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_openai_client_chat_and_completions_with_an_edit(make_server, tmp_path, monkeypatch):
    keys = [{"name": "reader", "key": READ_KEY, "role": "read"}, {"name": "editor", "key": EDIT_KEY, "role": "edit"}]
    monkeypatch.setenv("HOREN_API_KEYS", json.dumps(keys))
    server = make_server(f"sqlite:///{tmp_path / 'horen.db'}").start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=READ_KEY, max_retries=0, timeout=300)
    (model,) = client.models.list().data
    messages = [{"role": "user", "content": QUESTION}]
    ask = {"model": model.id, "messages": messages, "max_tokens": 24, "temperature": 0}

    before = client.chat.completions.create(**ask)
    assert before.choices[0].model_extra["edit_id"] is None and TARGET not in before.choices[0].message.content

    with httpx.Client(base_url=server.url, timeout=300) as c:
        assert c.post("/edits", json={"prompt": QUESTION, "target": TARGET}).status_code == 401
        r = c.post(
            "/edits", json={"prompt": QUESTION, "target": TARGET}, headers={"Authorization": f"Bearer {READ_KEY}"}
        )
        assert r.status_code == 403
        r = c.post(
            "/edits", json={"prompt": QUESTION, "target": TARGET}, headers={"Authorization": f"Bearer {EDIT_KEY}"}
        )
        assert r.status_code == 201, r.text
        edit = r.json()
        assert edit["created_by"] == "editor"

    after = client.chat.completions.create(**ask)
    answer = after.choices[0].message.content
    assert TARGET in answer and after.choices[0].model_extra["edit_id"] == edit["id"]
    assert after.usage.prompt_tokens > 0 and after.usage.completion_tokens > 0
    assert content(client.chat.completions.create(**ask, stream=True)) == answer

    unedited = client.chat.completions.create(**ask, extra_body={"edits": False})
    assert unedited.choices[0].message.content == before.choices[0].message.content
    assert unedited.choices[0].model_extra["edit_id"] is None

    done = client.completions.create(model=model.id, prompt=QUESTION, max_tokens=12, temperature=0)
    assert done.choices[0].text.strip().startswith(TARGET) and done.choices[0].model_extra["edit_id"] == edit["id"]
    streamed = client.completions.create(model=model.id, prompt=QUESTION, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text

    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**ask)
    server.stop()
    log = server.log_path.read_text()
    assert READ_KEY not in log and EDIT_KEY not in log
