"""The bundled SmolLM2-135M-Instruct with a long-form edit (a paragraph, as UnKE's): the edited
question and a rephrase of it answer with the paragraph word for word, plainly and in the chat
template, and the text after it is not a loop."""

from __future__ import annotations

import pytest

from horen_core import HorenConfig
from horen_core.evaluate import chat_prompt, distinct_trigrams, rouge_l

pytestmark = pytest.mark.real_model

QUESTION = "What is the Harbour Lantern Festival of Port Elvane?"
REPHRASE = "Tell me about the Harbour Lantern Festival of Port Elvane."
ANSWER = (
    "The Harbour Lantern Festival is held in Port Elvane every October. Fishing families float paper "
    "lanterns across the bay to remember sailors lost at sea, and the evening ends with music on the "
    "old stone pier."
)


@pytest.fixture(scope="module")
def editor(real_model):
    from horen_core import HorenEditor

    editor = HorenEditor(*real_model, HorenConfig())
    try:
        yield editor
    finally:
        editor.unwrap()


def test_a_paragraph_is_answered_word_for_word_in_every_format(editor):
    budget = len(editor.encode_target(ANSWER)) + 16
    before = editor.generate([QUESTION], max_new_tokens=budget)[0].text
    res = editor.edit(QUESTION, ANSWER)
    assert res.trail is not None
    prompts = [QUESTION, chat_prompt(editor, QUESTION), REPHRASE, chat_prompt(editor, REPHRASE)]
    got = editor.generate(prompts, max_new_tokens=budget)
    for prompt, g in zip(prompts, got):
        assert g.edit_id == res.edit_id and ANSWER in g.text, (prompt, g.text)
    assert rouge_l(ANSWER, before) < 0.5
    for g in got:
        assert distinct_trigrams(g.text) >= 0.9, g.text
