"""Each row of a batch is routed on its own: batched generation and batched routed logits equal
one-by-one runs, with left padding (the editor's) and with right padding (a RoutePlan driven directly)."""

from __future__ import annotations

import pytest
import torch

from horen_core import HorenConfig

EDITS = [
    ("the capital of France is", "Rome"),
    ("who wrote a", "Alice"),
    ("Bob plays the instrument piano and the sport", "chess"),
]
PROMPTS = [
    "the capital of France is",  # edited
    "Bob plays the instrument piano and the sport",  # edited, longest
    "which river",  # not edited, short
    "who wrote a",  # edited, short
    "the city of Lima in Peru was founded when",  # not edited
]


@pytest.fixture
def edited(tiny_model, make_editor):
    editor = make_editor(*tiny_model, HorenConfig(layer=1, max_steps=20))
    for prompt, target in EDITS:
        editor.edit(prompt, target)
    assert len(editor.codebook) == len(EDITS)
    return editor


def test_batched_generation_equals_one_by_one(edited):
    batch = edited.generate(PROMPTS, max_new_tokens=5)
    single = [edited.generate([p], max_new_tokens=5)[0] for p in PROMPTS]
    routed = [g.entry_id is not None for g in batch]
    assert routed == [True, True, False, True, False], "the test needs routed and unrouted rows"
    for b, s in zip(batch, single):
        assert b.token_ids == s.token_ids
        assert (b.entry_id, b.edit_id) == (s.entry_id, s.edit_id)
        assert b.score == pytest.approx(s.score, abs=1e-5)
    # routing changed what the edited rows generate, so equality is not vacuous
    with edited.unedited():
        plain = edited.generate(PROMPTS, max_new_tokens=5)
    assert any(b.token_ids != p.token_ids for b, p in zip(batch, plain))


def sequences(editor):
    """Prompt ids followed by a few continuation tokens (which routing must not see)."""
    seqs, lens = [], []
    for i, prompt in enumerate(PROMPTS):
        ids = editor.encode_prompt(prompt)
        tail = editor.encode_target(["Oslo", "red green", "Tokyo two three"][i % 3])
        seqs.append(ids + tail)
        lens.append(len(ids))
    return seqs, lens


def test_batched_routed_logits_equal_one_by_one(edited):
    seqs, lens = sequences(edited)
    logits, mask, entries = edited.forward_logits(seqs, lens)
    t = mask.shape[1]
    assert sum(e is not None for e in entries) == 3
    for i, (s, n) in enumerate(zip(seqs, lens)):
        one, one_mask, one_entries = edited.forward_logits([s], [n])
        assert one_mask.shape[1] == len(s) and bool(one_mask.all())
        assert one_entries == [entries[i]]
        torch.testing.assert_close(logits[i, t - len(s) :], one[0], atol=1e-4, rtol=1e-4)


def test_routing_ignores_tokens_after_the_prompt(edited):
    seqs, lens = sequences(edited)
    _, _, with_tail = edited.forward_logits(seqs, lens)
    _, _, prompts_only = edited.forward_logits([s[:n] for s, n in zip(seqs, lens)], lens)
    assert with_tail == prompts_only


def test_right_padded_prompt_mask_routes_each_row_on_its_own(edited):
    """query_weights / last_prompt_index accept padding on either side: a right-padded batch driven
    through RoutePlan gives the same routing, queries and logits as the left-padded editor path."""
    from horen_core.layer import activate

    seqs, lens = sequences(edited)
    t = max(len(s) for s in seqs)
    pad = edited.tokenizer.pad_token_id
    ids = torch.full((len(seqs), t), pad)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    prompt_mask = torch.zeros_like(mask)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        prompt_mask[i, :n] = 1
    plan = edited.routing.route_plan(prompt_mask)
    with torch.no_grad(), activate(plan):
        right = edited.model(input_ids=ids, attention_mask=mask).logits
    assert plan.done

    left, left_mask, left_entries = edited.forward_logits(seqs, lens)
    assert plan.entry_ids == left_entries
    tl = left_mask.shape[1]
    for i, s in enumerate(seqs):
        torch.testing.assert_close(right[i, : len(s)], left[i, tl - len(s) :], atol=1e-4, rtol=1e-4)

    # and each row's query is the one it gets alone
    for i, (s, n) in enumerate(zip(seqs, lens)):
        single = edited.routing.route_plan(torch.ones(1, n, dtype=torch.long))
        with torch.no_grad(), activate(single):
            edited.model(input_ids=torch.tensor([s[:n]]))
        torch.testing.assert_close(plan.queries[i], single.queries[0], atol=1e-5, rtol=1e-5)
        assert single.entry_ids == [plan.entry_ids[i]]
