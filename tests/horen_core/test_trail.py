"""Long-form edits on tiny models: an answer of more than twelve words gets a trail (a value at
each of its tokens) and is then written word for word, in generation, greedy decoding and teacher
forcing alike; the trail is added only while the text follows the answer, travels with the edit
through rollback, save/load, log replay and batched training, and short answers get none."""

from __future__ import annotations

import pytest
import torch

from horen_core import HorenConfig
from horen_core.evaluate import teacher_forced
from horen_core.generation import _OnTrack
from horen_core.layer import RoutePlan, activate
from tests.horen_core.test_train_many import apply_in_order, assert_same_edit, pair  # noqa: F401 (a fixture)

# a tiny random model's logits are flat (its loss stays high): a small step, a fixed number of steps
CFG = HorenConfig(layer=1, lr=1.0, max_steps=30)
PROMPT = "the capital of France is"
# 20 words, every one in the tiny tokenizer's vocabulary
LONG = "Rome a Paris in Italy was the city where Alice wrote the one red river of Lima in Peru born"
OTHER = ["who wrote", "Alice plays", "the river in Cairo is"]


def words(editor, prompt, n):
    return editor.generate([prompt], max_new_tokens=n)[0].text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_long_form_edit_is_written_word_for_word(arch, tiny_factory, tiny_tokenizer, make_editor):
    """llama trains on the layers above the edit (fast path), gpt2 on the full model."""
    editor = make_editor(tiny_factory(arch), tiny_tokenizer, CFG)
    before = words(editor, PROMPT, 24)
    res = editor.edit(PROMPT, LONG)
    answer = editor.encode_target(LONG)
    assert res.trail is not None and res.trail.shape == (len(answer) - 1, editor.codebook.value_dim)
    assert words(editor, PROMPT, 24).startswith(LONG) and not before.startswith(LONG)
    assert editor.greedy([editor.encode_prompt(PROMPT)], len(answer))[0] == answer
    assert teacher_forced(editor, [PROMPT], [answer]) == [1.0]
    editor.rollback(res.edit_id)
    assert not editor.store.trails and words(editor, PROMPT, 24) == before


def test_a_short_answer_or_a_disabled_trail_gives_a_vector(tiny_factory, tiny_tokenizer, make_editor):
    editor = make_editor(tiny_factory("llama"), tiny_tokenizer, CFG)
    assert editor.edit(PROMPT, "Rome").trail is None
    off = make_editor(tiny_factory("llama"), tiny_tokenizer, HorenConfig(**{**CFG.to_dict(), "answer_trail": False}))
    res = off.edit("who wrote", LONG)
    assert res.trail is None and res.value.shape == (off.codebook.value_dim,)


def test_the_trail_goes_in_only_while_the_row_follows_the_answer(tiny_llama, make_editor):
    """Decode step k adds trail row k to a row in ``on_track``; a row that left it gets nothing."""
    editor = make_editor(*tiny_llama, CFG)
    trail = torch.randn(3, editor.codebook.value_dim)
    plan = RoutePlan(editor.layer, torch.ones(2, 4, dtype=torch.long), None, "last_token", 1.0)
    plan.done, plan.trails, plan.on_track = True, {0: trail, 1: trail}, {0}
    x, out = torch.zeros(2, 1, 8), torch.zeros(2, 1, editor.codebook.value_dim)
    with activate(plan):
        steps = [plan.apply(x, out) for _ in range(4)]
    for k, got in enumerate(steps):
        torch.testing.assert_close(got[0, 0], trail[k] if k < 3 else torch.zeros_like(trail[0]))
        assert not got[1].any()


def test_a_row_leaves_the_track_when_its_text_leaves_the_answer(tiny_llama, make_editor):
    """After every token, a row stays in ``on_track`` while its text begins its entry's answer."""
    editor = make_editor(*tiny_llama, CFG)
    res = editor.edit(PROMPT, LONG)
    answer = list(res.answer)
    prompt = editor.encode_prompt(PROMPT)
    plan = editor.decoder.plan([prompt, prompt], [len(prompt)] * 2, len(prompt))
    with activate(plan):
        editor.model(input_ids=torch.tensor([prompt, prompt]))  # the prefill routes both rows
    assert set(plan.trails) == plan.on_track == {0, 1}
    watch = _OnTrack(editor.tokenizer, editor.codebook, plan, len(prompt))
    detour = editor.tokenizer(" seven", add_special_tokens=False)["input_ids"]
    for n in range(1, 4):  # row 0 writes the answer, row 1 leaves it at its second token
        rows = [answer[:n], answer[:1] + (detour * n)[: n - 1]]
        watch(torch.tensor([prompt + r for r in rows]), None)
        assert plan.on_track == ({0, 1} if n == 1 else {0}), n
    assert editor.decoder.answer_prefix(res.entry_id, answer[:1] + detour + answer[2:]) == 1


def test_save_load_and_replay_keep_the_trail(tiny_model, make_editor, tmp_path):
    model, tok = tiny_model
    editor = make_editor(model, tok, CFG)
    edits = [editor.edit(PROMPT, LONG), editor.edit("who wrote", "Alice"), editor.edit(PROMPT, LONG)]
    assert not edits[2].created and edits[2].trail is not None
    prompts = [PROMPT, *OTHER]
    expected = [(g.token_ids, g.entry_id, g.edit_id) for g in editor.generate(prompts, max_new_tokens=24)]
    path = tmp_path / "codebook.safetensors"
    editor.save(path)
    editor.unwrap()

    loaded = make_editor(model, tok, CFG)
    loaded.load(path)
    assert [(g.token_ids, g.entry_id, g.edit_id) for g in loaded.generate(prompts, max_new_tokens=24)] == expected
    loaded.unwrap()

    replayed = make_editor(model, tok, CFG)
    replayed.apply_versions(
        [e.edit_id for e in edits],
        [e.entry_id for e in edits],
        torch.stack([e.key for e in edits]),
        torch.stack([e.value for e in edits]),
        [e.answer for e in edits],
        [e.subject for e in edits],
        [e.gate for e in edits],
        [e.trail for e in edits],
    )
    assert [(g.token_ids, g.entry_id, g.edit_id) for g in replayed.generate(prompts, max_new_tokens=24)] == expected
    replayed.rollback(edits[2].edit_id)  # the first long edit's trail is live again
    assert replayed.store.trail_of(edits[0].entry_id) is replayed.store.trails[edits[0].edit_id]


def test_batched_training_trains_a_long_form_edit_as_train_does(pair):  # noqa: F811 (the imported fixture)
    facts = [("who wrote", "Alice"), (PROMPT, LONG), ("Alice plays", "chess"), (PROMPT, LONG)]
    seq, bat = pair(HorenConfig(layer=1, lr=1.0, stop_loss=0.3, max_steps=50))
    one = [seq.edit(p, t) for p, t in facts]
    many, _ = apply_in_order(bat, facts)
    for i, (a, (b, entry_id)) in enumerate(zip(one, many)):
        assert entry_id == a.entry_id, i
        assert_same_edit(a, b, str(i))
        assert (a.trail is None) == (b.trail is None), i
        if a.trail is not None:
            torch.testing.assert_close(b.trail, a.trail)
    assert one[3].trail is not None and not one[3].created


def test_a_paragraph_streams_as_it_is_written(tiny_llama, make_editor):
    """A long-form row is never answered again, so its tokens are sent as they come, not held
    until the whole paragraph is stated; what is sent is the result."""
    editor = make_editor(*tiny_llama, CFG)
    editor.edit(PROMPT, LONG)
    calls: list[list[int]] = []
    got = editor.generate([PROMPT], max_new_tokens=24, stream=lambda row, ids: calls.append(list(ids)) or True)[0]
    assert LONG in got.text
    assert [t for c in calls for t in c] == got.token_ids
    assert calls[0] and len(calls[0]) == 1, calls[:3]  # the first token went out after the first step
