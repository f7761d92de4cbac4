"""The bundled SmolLM2-135M-Instruct with real ZsRE facts: an edit made with a plain question
answers the same question in the chat template and the other way round, and the text after an
edited fact is not a loop; the same question about another subject is not routed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from horen_core import HorenConfig
from horen_core.evaluate import chat_prompt, distinct_trigrams

pytestmark = pytest.mark.real_model

RECORDS = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "zsre_small.json").read_text())
PLAIN = [RECORDS[i] for i in (1, 2, 3)]
CHAT = [RECORDS[i] for i in (5, 6, 7)]


@pytest.fixture(scope="module")
def chat_editor(real_model):
    from horen_core import HorenEditor

    editor = HorenEditor(*real_model, HorenConfig())
    try:
        for r in PLAIN:
            editor.edit(r["src"], r["answers"][0])  # format auto: plain text
        for r in CHAT:
            editor.edit(chat_prompt(editor, r["src"]), r["answers"][0])  # auto detects the template
        yield editor
    finally:
        editor.unwrap()


def test_a_plain_edit_answers_in_chat_and_a_chat_edit_in_plain(chat_editor):
    for r in PLAIN + CHAT:
        target = r["answers"][0]
        plain, chat = chat_editor.generate([r["src"], chat_prompt(chat_editor, r["src"])], max_new_tokens=24)
        assert target in plain.text, (r["src"], plain.text)
        assert target in chat.text, (r["src"], chat.text)
        assert plain.edit_id is not None and plain.edit_id == chat.edit_id


def test_the_text_after_an_edited_fact_is_not_a_loop(chat_editor):
    for r in PLAIN + CHAT:
        target = r["answers"][0]
        for prompt in (r["src"], chat_prompt(chat_editor, r["src"])):
            got = chat_editor.generate([prompt], max_new_tokens=32)[0]
            assert got.text.count(target) <= 2, (prompt, got.text)
            assert distinct_trigrams(got.text) >= 0.7, (prompt, got.text)


def test_the_unedited_switch_gives_the_base_model(chat_editor):
    r = PLAIN[0]
    with chat_editor.unedited():
        got = chat_editor.generate([r["src"]], max_new_tokens=8)[0]
    assert got.entry_id is None and r["answers"][0] not in got.text


def test_the_same_question_about_another_subject_keeps_its_answer(chat_editor):
    """Near names: without the subject gate these prompts route to the edits (cosine 0.84-0.98)."""
    near = {1: "Physciaceae", 2: "Call the Nurse", 3: "Volvo B10M"}
    for i, name in near.items():
        other = RECORDS[i]["src"].replace(RECORDS[i]["subject"], name)
        assert other != RECORDS[i]["src"]
        edited = chat_editor.generate([other, chat_prompt(chat_editor, other)], max_new_tokens=16)
        with chat_editor.unedited():
            unedited = chat_editor.generate([other, chat_prompt(chat_editor, other)], max_new_tokens=16)
        for got, base in zip(edited, unedited):
            assert got.edit_id is None and got.text == base.text, (other, got.text)


OTHER_RELATIONS = ("Where was {} born?", "When did {} die?", "Who owns {}?", "What is the population of {}?")


def test_another_relation_of_the_same_subject_keeps_its_answer(chat_editor):
    """The relation gate: questions about an edited subject that ask something else are answered by
    the unedited model (without the gate the key sends most of them to the edit), while the edited
    questions' rephrases still get the edit."""
    kept, asked, rephrased = 0, 0, 0
    for r in PLAIN + CHAT:
        others = [t.format(r["subject"]) for t in OTHER_RELATIONS]
        prompts = others + [chat_prompt(chat_editor, q) for q in others]
        edited = chat_editor.generate(prompts, max_new_tokens=16)
        with chat_editor.unedited():
            unedited = chat_editor.generate(prompts, max_new_tokens=16)
        kept += sum(got.edit_id is None and got.text == base.text for got, base in zip(edited, unedited))
        asked += len(prompts)
        rephrased += r["answers"][0] in chat_editor.generate([r["rephrase"]], max_new_tokens=24)[0].text
    # measured 34 of 48 at gate threshold 0.169 (without the gate: 0); the leaks are near relations ("Who owns X?")
    assert kept >= 0.6 * asked, f"{kept} of {asked} same-subject prompts of another relation kept their answer"
    assert rephrased >= len(PLAIN + CHAT) - 1


CONTEXTS = (
    "The hindwings are light ochreous-orange, with a darker band along the outer margin of each wing.",
    "My grandmother grew up in a small village by the sea and still tells stories about the fishing boats.",
)


def test_a_question_after_a_context_sentence_reads_its_edit(chat_editor):
    """Text before the question is context: the question is routed on its last sentence too (on
    the whole prompt alone, 3 of these 24 were routed)."""
    hits = 0
    for r in PLAIN + CHAT:
        for context in CONTEXTS:
            prompt = f"{context} {r['src']}"
            plain, chat = chat_editor.generate([prompt, chat_prompt(chat_editor, prompt)], max_new_tokens=24)
            hits += plain.edit_id is not None and r["answers"][0] in plain.text
            hits += chat.edit_id is not None and r["answers"][0] in chat.text
    assert hits >= 2 * len(CONTEXTS) * len(PLAIN + CHAT) - 2, hits


def test_the_bundled_model_is_one_model_however_it_is_loaded(real_model):
    """Dequantised in process or read from its converted copy: one fingerprint, so its codebooks
    and its shipped relation gate apply either way."""
    from horen_core import load_model
    from horen_core.gate import RelationGate
    from horen_core.modeling import model_fingerprint

    direct, _ = load_model(None, device="cpu", converted_dir=None)
    assert model_fingerprint(direct) == model_fingerprint(real_model[0])
    assert RelationGate.shipped(model_fingerprint(direct)) is not None
