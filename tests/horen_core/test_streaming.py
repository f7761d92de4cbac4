"""The ``stream`` hook of ``HorenEditor.generate``: what it sends is each row's result, in order; a
routed row's edited start is held back until it states its target (and never sent when it misses);
a row whose hook returns False stops without changing the others; each row may have its own budget."""

from __future__ import annotations

import contextlib

import pytest

from horen_core import HorenConfig

PROMPTS = [
    "where was Bob born ?",  # edited: states its target, then handed to the unedited model
    "which river",  # not edited
    "who wrote a",  # edited: its answer cannot be stated, so it is answered again unedited
    "the city of Lima in Peru was founded when",  # not edited
]


@pytest.fixture
def editor(tiny_llama, make_editor):
    model, tok = tiny_llama
    editor = make_editor(model, tok, HorenConfig(layer=1))
    stated = editor.edit(PROMPTS[0], "Lima")
    missed = editor.edit(PROMPTS[2], "Alice")
    # an answer the routed text cannot contain (words outside the tiny vocabulary decode to [UNK])
    editor.codebook.entry(missed.entry_id).answer = tuple(tok("[UNK] [UNK]", add_special_tokens=False)["input_ids"])
    editor.stated_answer = list(stated.answer)
    editor.missed_patience = 2 + 8  # its answer's length + the editor's patience
    return editor


class Recorder:
    def __init__(self, stop_row: int | None = None, stop_after: int = 0) -> None:
        self.calls: dict[int, list[list[int]]] = {}
        self.stop_row, self.stop_after = stop_row, stop_after

    def __call__(self, row: int, ids: list[int]) -> bool:
        self.calls.setdefault(row, []).append(list(ids))
        return not (row == self.stop_row and sum(map(len, self.calls[row])) >= self.stop_after)

    def sent(self, row: int) -> list[int]:
        return [t for chunk in self.calls.get(row, []) for t in chunk]


@pytest.mark.parametrize("edited", [True, False])
def test_streamed_tokens_are_the_result(editor, edited):
    n = 14
    rec = Recorder()
    with contextlib.nullcontext() if edited else editor.unedited():
        plain = editor.generate(PROMPTS, max_new_tokens=n, min_new_tokens=n)
        streamed = editor.generate(PROMPTS, max_new_tokens=n, min_new_tokens=n, stream=rec)
    assert [g.token_ids for g in streamed] == [g.token_ids for g in plain]
    assert [g.edit_id for g in streamed] == [g.edit_id for g in plain]
    for i, g in enumerate(streamed):
        assert rec.sent(i) == g.token_ids and len(g.token_ids) == n
    if edited:
        assert [g.entry_id is not None for g in plain] == [True, False, True, False], "needs routed rows"
        assert plain[0].token_ids[: len(editor.stated_answer)] == editor.stated_answer


def test_a_routed_row_is_held_back_until_it_states_its_target(editor):
    n = 14
    rec = Recorder()
    editor.generate(PROMPTS, max_new_tokens=n, min_new_tokens=n, stream=rec)
    # an unrouted row streams a token a step from the first step
    assert all(len(c) == 1 for c in rec.calls[1][:n])
    # the stated row gets its edited start in one piece, once the target is in it
    first = next(c for c in rec.calls[0] if c)
    assert first == editor.stated_answer
    assert rec.calls[0].index(first) == len(editor.stated_answer) - 1
    # the row that missed sends nothing while it runs with the edit; its tokens are all unedited
    with editor.unedited():
        unedited = editor.generate([PROMPTS[2]], max_new_tokens=n, min_new_tokens=n)[0]
    assert rec.sent(2) == unedited.token_ids
    assert not any(rec.calls[2][: editor.missed_patience]), "held while it ran with the edit"


def test_a_stopped_row_ends_early_and_the_others_do_not_change(editor):
    n = 14
    plain = editor.generate(PROMPTS, max_new_tokens=n, min_new_tokens=n)
    rec = Recorder(stop_row=1, stop_after=3)
    got = editor.generate(PROMPTS, max_new_tokens=n, min_new_tokens=n, stream=rec)
    assert got[1].token_ids == plain[1].token_ids[:3] == rec.sent(1)
    assert len(rec.calls[1]) == 3, "no call after the row was stopped"
    for i in (0, 2, 3):
        assert got[i].token_ids == plain[i].token_ids == rec.sent(i)


def test_a_held_row_can_be_stopped_before_anything_was_sent(editor):
    n = 14
    rec = Recorder(stop_row=2, stop_after=0)
    got = editor.generate(PROMPTS, max_new_tokens=n, min_new_tokens=n, stream=rec)
    assert got[2].token_ids == [] and rec.calls[2] == [[]]
    assert got[2].edit_id is not None


@pytest.mark.parametrize("stream", [False, True])
def test_each_row_is_cut_at_its_own_budget(editor, stream):
    n = 14
    budgets = [3, n, 5, 1]
    plain = editor.generate(PROMPTS, max_new_tokens=n, min_new_tokens=n)
    rec = Recorder()
    got = editor.generate(PROMPTS, max_new_tokens=budgets, min_new_tokens=n, stream=rec if stream else None)
    for i, (g, budget) in enumerate(zip(got, budgets)):
        assert g.token_ids == plain[i].token_ids[:budget]
        assert g.text == editor.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        if stream:
            assert rec.sent(i) == g.token_ids
