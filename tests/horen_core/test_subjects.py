"""Subjects: what is inferred from a question, and that routing needs the prompt to mention it."""

from __future__ import annotations

import pytest
import torch

from horen_core import HorenConfig
from horen_core.subjects import SubjectIndex, infer_subject, mentions, resolve_subject, rules_out


@pytest.mark.parametrize(
    "question, subject",
    [
        ("What voice type is Lola Beeth?", "Lola Beeth"),
        ("When was the inception of IAAF Combined Events Challenge?", "IAAF Combined Events Challenge"),
        ("The name of the country of citizenship of Ingrīda Amantova is", "Ingrīda Amantova"),
        ("BBC One, by", "BBC One"),
        ("Luana Walters's profession is an", "Luana Walters"),
        ("Where is Northern Suburbs Rugby Club? It is located in", "Northern Suburbs Rugby Club"),
        ("Who taught Leonardo da Vinci to paint?", "Leonardo da Vinci"),
        ("what is the boiling point of water?", None),
        ("When did it happen?", None),
        ("Which river flows through r0b 2?", None),
        ("Who won the 1998 World Cup?", "1998 World Cup"),
    ],
)
def test_infer_subject(question, subject):
    assert infer_subject(question) == subject


def test_mentions_ignores_case_and_spacing_and_empty_means_any():
    assert mentions("Lola Beeth", "where was lola   beeth born?")
    assert not mentions("Lola Beeth", "Where was Lola Beet born?")
    assert mentions("", "anything")
    assert not mentions("Berg Municipality", "In Sundbyberg Municipality, the language is")
    assert not mentions("Paris", "A Parisian in Rome") and mentions("Paris", "Paris's mayor")
    assert mentions("Sleater-Kinney", "Is sleater-kinney from Canada?")
    assert mentions("Rubén Acosta", "The citizenship of Ruben Acosta is") and mentions("Ervin Sima", "Ervin Šima's job")
    assert mentions("Tim J Rankin", "The employer of Tim Rankin is") and mentions("Tim J. Rankin", "tim rankin")
    assert not mentions("Tim J Rankin", "The employer of Tim Jones is") and not mentions("J Rankin", "Rankin")
    assert resolve_subject("What voice type is Lola Beeth?", None) == "Lola Beeth"
    assert resolve_subject("What voice type is Lola Beeth?", "  Beeth ") == "Beeth"
    assert resolve_subject("what is it?", None) == ""


CFG = HorenConfig(layer=1, max_steps=40, lr=0.5, stop_loss=1.0, chat_context=False)


def test_a_prompt_that_does_not_mention_the_subject_is_not_routed(tiny_factory, tiny_tokenizer, make_editor):
    editor = make_editor(tiny_factory("llama"), tiny_tokenizer, CFG)
    prompt = "the capital of France is"
    unedited = editor.generate([prompt], max_new_tokens=4)[0]
    gated = editor.edit(prompt, "Rome", subject="Spain")
    assert gated.subject == "Spain"
    assert editor.generate([prompt], max_new_tokens=4)[0].entry_id is None  # the key matches, the name does not
    assert editor.generate([prompt], max_new_tokens=4)[0].text == unedited.text
    editor.rollback(gated.edit_id)
    inferred = editor.edit(prompt, "Rome")
    assert inferred.subject == "France"
    routed = editor.generate([prompt], max_new_tokens=4)[0]
    assert routed.edit_id == inferred.edit_id and routed.text.strip().startswith("Rome")


def test_subjects_survive_save_and_load(tmp_path, tiny_factory, tiny_tokenizer, make_editor):
    model = tiny_factory("llama")
    a = make_editor(model, tiny_tokenizer, CFG)
    a.edit("the capital of France is", "Rome", subject="Spain")
    a.save(tmp_path / "cb.safetensors")
    b = make_editor(tiny_factory("llama"), tiny_tokenizer, CFG)
    b.load(tmp_path / "cb.safetensors")
    assert b.store.subjects == a.store.subjects == {1: "Spain"}
    assert b.generate(["the capital of France is"], max_new_tokens=4)[0].entry_id is None


def test_a_prompt_turned_down_by_its_best_entry_reads_the_next_one(tiny_factory, tiny_tokenizer, make_editor):
    """The best key may be another subject's edit: the gates turn it down and the prompt reads the
    next entry they let through (``runners_up``), not nothing."""
    editor = make_editor(tiny_factory("llama"), tiny_tokenizer, HorenConfig(**{**CFG.to_dict(), "runners_up": 4}))
    prompt = "the capital of France is"
    france = editor.edit(prompt, "Paris", subject="France")
    spain = editor.edit(prompt, "Rome", subject="Spain")  # the same key, newer: the best entry, not mentioned
    assert spain.entry_id != france.entry_id
    routed = editor.generate([prompt], max_new_tokens=4)[0]
    assert routed.edit_id == france.edit_id and routed.text.strip().startswith("Paris")
    editor.config.runners_up = 0
    editor.config.subject_lookup = False
    assert editor.generate([prompt], max_new_tokens=4)[0].entry_id is None


def test_a_prompt_reads_the_edit_it_names_when_other_keys_crowd_it_out(tiny_factory, tiny_tokenizer, make_editor):
    """Among many keys, a question's nearest are often other subjects' edits: with only its
    nearest key attended (support 1, no runners-up) the edit whose subject it names is still found
    by name (``subject_lookup``), and not without it."""
    cfg = HorenConfig(**{**CFG.to_dict(), "hopfield_support": 1, "runners_up": 0})
    editor = make_editor(tiny_factory("llama"), tiny_tokenizer, cfg)
    question = "the capital of France is"
    france = editor.edit("capital of France is", "Paris", subject="France")
    spain = editor.edit(question, "Rome", subject="Spain")  # the question's own key: nearer, not named
    assert spain.entry_id != france.entry_id
    routed = editor.generate([question], max_new_tokens=4)[0]
    assert routed.edit_id == france.edit_id and routed.text.strip().startswith("Paris")
    editor.rollback(france.edit_id)  # the index follows a rollback
    assert editor.generate([question], max_new_tokens=4)[0].entry_id is None
    editor.config.subject_lookup = False
    again = editor.edit("capital of France is", "Paris", subject="France")
    assert again.entry_id != spain.entry_id
    assert editor.generate([question], max_new_tokens=4)[0].entry_id is None


def test_subject_index_finds_names_at_word_starts_and_follows_changes():
    index = SubjectIndex({1: "Paris", 2: "New York", 3: "!!", 4: "york"})
    assert index.named("Where is paris?") == [1]
    assert index.named("A Parisian in New   York") == [2, 4]
    assert index.named("!! anything") == []
    index.add(6, "Rubén J. Acosta")
    assert index.named("Where was Ruben Acosta born?") == [6]
    index.discard(6, "Rubén J. Acosta")
    assert index.named("Where was Ruben Acosta born?") == []
    index.discard(2, "New York")
    index.add(5, "Parisian")
    assert sorted(index.named("A Parisian in New York")) == [4, 5]


@pytest.mark.parametrize(
    "text, ruled_out",
    [
        ("The occupation of Martín Solares, which is not geohasher, is", True),
        ("The occupation of Jennifer D McCabe, which is not McDonald’s, is", True),
        ("Who, other than the Geohasher, lives there?", True),
        ("Martín Solares isn't a geohasher; he is a", True),
        ("The occupation of Martín Solares is", False),
        ("Is Martín Solares a geohasher?", False),
        ("which is not geohashers", False),  # another word
    ],
)
def test_rules_out(text, ruled_out):
    target = "McDonald's" if "McDonald" in text else "geohasher"
    assert rules_out(target, text) is ruled_out
    assert not rules_out("", text)


def test_a_prompt_that_rules_the_target_out_does_not_read_the_edit(tiny_factory, tiny_tokenizer, make_editor):
    """KnowEdit's Forgetfulness prompts ask the edited relation while saying the answer is not the
    new target: the edit's value would say it anyway. Routed here on the edit's own key, so that
    only the text differs."""
    editor = make_editor(tiny_factory("llama"), tiny_tokenizer, CFG)
    edit = editor.edit("the capital of France is", "Rome", subject="France")
    query = torch.nn.functional.normalize(edit.key, dim=-1)[None]

    def routed(text: str) -> int | None:
        return editor.routing.route(query, [text])[1][0]

    assert routed("The capital of France, which is not Rome, is") is None
    assert routed("The capital of France, which is not Paris, is") == edit.entry_id
    assert routed("The capital of France is") == edit.entry_id
    editor.config.negations = False
    assert routed("The capital of France, which is not Rome, is") == edit.entry_id


def test_an_edit_without_a_subject_needs_a_closer_match(tiny_factory, tiny_tokenizer, make_editor):
    """Nothing but its key gates an edit with no subject, so it is read only from
    ``unnamed_threshold`` (0.9), where a named edit is read from ``threshold``."""
    editor = make_editor(tiny_factory("llama"), tiny_tokenizer, CFG)
    edit = editor.edit("the capital of France is", "Rome", subject="")
    key = torch.nn.functional.normalize(edit.key, dim=-1)
    other = torch.nn.functional.normalize(torch.randn(key.shape[0], generator=torch.Generator().manual_seed(0)), dim=-1)
    other = torch.nn.functional.normalize(other - (other @ key) * key, dim=-1)
    query = (0.83 * key + (1 - 0.83**2) ** 0.5 * other)[None]  # cosine 0.83 to the key
    _, entries, scores = editor.routing.route(query, ["the capital of France is"])
    assert 0.8 <= float(scores[0]) < 0.9 and entries[0] is None
    editor.config.unnamed_threshold = 0.8
    assert editor.routing.route(query, ["the capital of France is"])[1][0] == edit.entry_id
    assert editor.routing.route(key[None], ["the capital of France is"])[1][0] == edit.entry_id
