"""Batched training for bulk imports (``HorenEditor.train_many`` / ``edit_many``,
``ValueTrainer.train_values``): the results applied in order equal ``train`` + ``apply`` one by one
(same entries, created flags and steps; values and keys equal up to batching noise), a fact that
retrains an earlier fact of the same call waits for it (sequential semantics), a conflicting one
gets its own key, a bad fact gets its error in its slot, and the packed pass over several edits'
contexts gives each edit its own logits and gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from horen_core import Fact, HorenConfig, InvalidInputError, TrainedEdit
from horen_core.codebook import Codebook
from horen_core.training import _groups, _Packed, _Scores, question_contexts
from tests.horen_core.test_prompting import CHATML

# a tiny model whose values steer it within a few steps, so edits stop early at different steps
CFG = HorenConfig(layer=1, lr=1.0, stop_loss=0.3, max_steps=50)
FACTS = [
    ("the capital of France is", "Rome"),
    ("who wrote", "Alice"),
    ("the capital of France is", "Rome"),  # retrains the first fact's entry: waits for it
    ("Alice plays", "chess"),
    ("the capital of France is", "Oslo"),  # another answer: its own key
    ("who wrote", "Alice"),  # retrains the second fact's entry
    ("Bob plays the instrument", "piano"),
    ("the city of Lima in Peru was founded when", "two"),
    ("which river", "Nile"),
]


def steerable_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        initializer_range=0.3,  # logits big enough for one value vector to steer them
    )
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def pair(tiny_tokenizer, make_editor):
    """Two editors on two copies of one model: ``pair(config)``."""

    def make(config=CFG, tokenizer=tiny_tokenizer):
        return tuple(make_editor(steerable_llama(len(tiny_tokenizer)), tokenizer, config) for _ in range(2))

    return make


def assert_same_edit(one, many, what=""):
    """``many`` (trained, not applied) is what ``one`` trained: the same entry it retrains (None
    for a new one), answer, steps, and the same value and key up to batching noise."""
    assert (many.created, many.answer, many.steps) == (one.created, one.answer, one.steps), what
    assert many.entry_id == (None if one.created else one.entry_id), what
    scale = float(one.value.abs().max())
    torch.testing.assert_close(many.value, one.value, atol=1e-3 * scale, rtol=1e-3, msg=what)
    torch.testing.assert_close(many.key, one.key, atol=1e-5, rtol=1e-5, msg=what)


def apply_in_order(editor, facts, batch=None):
    """The contract's loop: ``train_many`` (of up to ``batch`` facts), apply what it returned in
    order, call again with the rest."""
    out, calls = [], 0
    while len(out) < len(facts):
        results = editor.train_many(facts[len(out) : len(out) + (batch or len(facts))])
        calls += 1
        assert results, "train_many returns at least its first fact"
        for r in results:
            if isinstance(r, TrainedEdit):
                edit_id = max(editor.codebook.edit_ids(), default=0) + 1
                change = editor.apply(edit_id, r)
                out.append((r, change.entry_id))
            else:
                out.append((r, None))
    return out, calls


@pytest.mark.parametrize("support,shortlist", [(32, 0), (1, 0), (32, 8)])
def test_train_many_applied_in_order_equals_train_and_apply_one_by_one(pair, support, shortlist):
    """``support`` 1 routes over a scratch copy of only the keys near the call's queries (the
    codebook outgrows support + facts), 32 over a copy of all of them; ``shortlist`` 8 scores
    8 of the vocabulary's tokens per position besides the target (0: all of them)."""
    seq, bat = pair(HorenConfig(**{**CFG.to_dict(), "hopfield_support": support, "shortlist": shortlist}))
    subsets = []
    if support == 1:  # some entries first, and 3 facts a call, so the scratch copy is a proper subset
        first = [("who wrote a", "Bob"), ("the river in Cairo is", "Nile"), ("Dave plays", "golf"), ("Erin", "Oslo")]
        for prompt, target in first:
            seq.edit(prompt, target)
            bat.edit(prompt, target)
        subset = bat.codebook.subset
        bat.codebook.subset = lambda ids: subsets.append((len(ids), len(bat.codebook))) or subset(ids)
    one = [seq.edit(p, t) for p, t in FACTS]
    many, calls = apply_in_order(bat, FACTS, batch=3 if support == 1 else None)
    if support == 1:
        assert any(n < size for n, size in subsets), subsets
    else:
        assert calls == 2, "the first retrain waits for the entry made earlier in the call (the second needs no wait)"
    for i, (a, (b, entry_id)) in enumerate(zip(one, many)):
        assert entry_id == a.entry_id, i
        assert_same_edit(a, b, str(i))
    assert len({a.steps for a in one}) >= 4, "edits stop at different steps (per-edit early stop)"
    assert [a.created for a in one] == [True, True, False, True, True, False, True, True, True]
    prompts = [p for p, _ in FACTS]
    got = [(g.token_ids, g.entry_id, g.edit_id) for g in bat.generate(prompts, max_new_tokens=2)]
    want = [(g.token_ids, g.entry_id, g.edit_id) for g in seq.generate(prompts, max_new_tokens=2)]
    assert got == want


@pytest.mark.parametrize("batched", [False, True])
def test_a_value_trained_on_shortlists_is_accepted_on_the_whole_vocabulary(pair, batched):
    """With 2 tokens per position besides the target a shortlist's verdict is often too kind; every
    value is still accepted only where the whole vocabulary's greedy decoding gives the target and
    its loss is below ``stop_loss`` (or at ``max_steps``), and the reported loss is that loss."""
    editor, _ = pair(HorenConfig(**{**CFG.to_dict(), "shortlist": 2}))
    facts = [f for f in FACTS if f[1] not in {"Oslo"}]
    results = editor.edit_many(facts) if batched else [editor.edit(p, t) for p, t in facts]
    checked = 0
    for (prompt, target), r in zip(facts, results):
        if r.steps == 0 or r.steps == CFG.max_steps:
            continue
        contexts = question_contexts(editor.tokens, editor.chat, editor.config, prompt, target)
        editor.trainer.prepare_many(contexts)
        with torch.no_grad():
            logits = editor.trainer.forwards.contexts(contexts)(r.value)
        losses = [F.cross_entropy(o.float(), torch.tensor(c.target)) for o, c in zip(logits, contexts)]
        loss = float(torch.stack(losses).mean())
        assert loss < CFG.stop_loss, (prompt, loss)
        assert all(bool((o.argmax(-1) == torch.tensor(c.target)).all()) for o, c in zip(logits, contexts)), prompt
        assert r.loss == pytest.approx(loss, rel=1e-3, abs=1e-4), prompt
        checked += 1
    assert checked >= 4


def test_a_fact_retraining_an_earlier_fact_of_the_call_retrains_its_entry_in_order(pair):
    _, editor = pair()
    fact = Fact("the capital of France is", "Rome")
    first = editor.train_many([fact, fact])
    assert len(first) == 1, "the second fact waits until the first is applied"
    change = editor.apply(1, first[0])
    (second,) = editor.train_many([fact])
    assert (second.entry_id, second.created) == (change.entry_id, False)
    # the same through edit_many, which applies as the contract says
    _, other = pair()
    a, b = other.edit_many([fact, fact])
    assert a.created and not b.created and b.entry_id == a.entry_id
    assert len(other.codebook) == 1 and other.codebook.owner_edit(a.entry_id) == b.edit_id


def test_a_fact_with_another_answer_in_the_same_call_gets_its_own_key(pair):
    _, editor = pair()
    results = editor.train_many([("the capital of France is", "Rome"), ("the capital of France is", "Oslo")])
    assert len(results) == 2 and all(r.created for r in results)
    changes = [editor.apply(i + 1, r) for i, r in enumerate(results)]
    assert changes[0].entry_id != changes[1].entry_id and len(editor.codebook) == 2
    out = editor.generate(["the capital of France is"], max_new_tokens=1)[0]
    assert out.edit_id == 2, "the later, conflicting edit is the one applied, as one by one"


def test_a_bad_fact_gets_its_error_in_its_slot_and_the_others_are_trained(pair, tiny_tokenizer):
    seq, editor = pair()
    long_prompt = " ".join(["the"] * 80)  # past the tiny model's 64 positions
    facts = [
        ("who wrote", "Alice"),
        ("", "Rome"),
        ("Alice plays", "   "),
        Fact("Bob plays the instrument", "piano", fmt="plain"),
        (long_prompt, "Rome"),
        ("which river", "Nile", "no-such-format"),
    ]
    results = editor.train_many(facts)
    assert [type(r) for r in results] == [TrainedEdit, InvalidInputError, InvalidInputError, TrainedEdit] + [
        InvalidInputError
    ] * 2
    for r, (prompt, target) in [(results[0], facts[0]), (results[3], ("Bob plays the instrument", "piano"))]:
        assert_same_edit(seq.train(prompt, target), r, prompt)
    made = editor.edit_many(facts)
    assert [isinstance(r, InvalidInputError) for r in made] == [False, True, True, False, True, True]
    assert len(editor.codebook) == 2


def test_the_packed_pass_gives_each_edit_its_own_logits_and_gradient(tiny_model, make_editor):
    """Several edits, each with a plain and a chat context, in one padded pass with one value per
    edit: each context's logits, each edit's loss and each value's gradient equal the edit's own
    batched pass (``ValueForwards.contexts``), which the fast-path tests check against the full model."""
    model, tok = tiny_model
    tok = copy.deepcopy(tok)
    tok.chat_template = CHATML
    editor = make_editor(model, tok, HorenConfig(layer=1))
    edits = [
        question_contexts(editor.tokens, editor.chat, editor.config, q, t)
        for q, t in [
            ("who wrote the capital of France is", "Alice Bob"),
            ("which river", "Nile"),
            ("Alice plays", "the golf"),
        ]
    ]
    assert all(len(cs) == 2 for cs in edits)
    editor.trainer.prepare_many([c for cs in edits for c in cs])
    caches = {id(c): editor.trainer.forwards.prefix(c) for cs in edits for c in cs}
    packed = _Packed(editor.trainer.forwards, edits, caches)
    assert len(packed.passes) > 1, "rows of unlike suffix lengths go in separate passes"
    torch.manual_seed(1)
    values = (torch.randn(len(edits), editor.codebook.value_dim) * 3).requires_grad_(True)
    scores = _Scores(editor.adapter.lm_head, packed.contexts, packed.owner_list, 0, editor.device)
    losses, solved = scores(packed.logits(values))
    losses.sum().backward()
    logits = packed.logits(values.detach()).split([len(c.target) for c in packed.contexts])
    i = 0
    for k, contexts in enumerate(edits):
        v = values.detach()[k].clone().requires_grad_(True)
        own = editor.trainer.forwards.contexts(contexts)(v)
        loss = torch.stack([F.cross_entropy(o.float(), torch.tensor(c.target)) for o, c in zip(own, contexts)]).mean()
        loss.backward()
        for o in own:
            torch.testing.assert_close(logits[i], o, atol=1e-4, rtol=1e-4)
            i += 1
        torch.testing.assert_close(losses[k], loss.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values.grad[k], v.grad, atol=1e-5, rtol=1e-4)
        ok = all(bool((o.argmax(-1) == torch.tensor(c.target)).all()) for o, c in zip(own, contexts))
        assert bool(solved[k]) == ok
    assert values.grad.abs().sum(dim=1).min() > 0


def test_rows_are_grouped_by_length_so_that_padding_stays_small():
    lengths = [3, 50, 4, 48, 3, 12, 51]
    groups = _groups(lengths, rows=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [[lengths[i] for i in g] for g in groups] == [[3, 3, 4], [12], [48, 50, 51]]
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g)
    assert [len(g) for g in _groups([5] * 7, rows=3)] == [3, 3, 1]


def test_without_the_fast_path_each_value_trains_as_train_does(tiny_tokenizer, make_editor):
    """The reference procedure has no fast path: ``train_values`` trains each edit with
    ``train_value``, so the results are exactly ``train``'s."""
    cfg = HorenConfig(layer=1, reference_procedure=True, lr=1.0, max_steps=3)
    seq = make_editor(steerable_llama(len(tiny_tokenizer)), tiny_tokenizer, cfg)
    bat = make_editor(steerable_llama(len(tiny_tokenizer)), tiny_tokenizer, cfg)
    facts = [("who wrote", "Alice"), ("Alice plays", "chess")]
    for r, (p, t) in zip(bat.train_many(facts), facts):
        one = seq.train(p, t)
        assert r.steps == one.steps == 3
        assert torch.equal(r.value, one.value) and torch.equal(r.key, one.key)


def test_a_codebook_subset_is_a_scratch_copy():
    cb = Codebook(4, 3)
    for i in range(4):
        cb.add(i + 1, torch.eye(4)[i], torch.full((3,), float(i)), [i])
    cb.retrain(9, 2, torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.ones(3))
    before = cb.state_dict()
    sub = cb.subset([4, 2, 99])
    assert sub.row_entry_ids.tolist() == [2, 4] and len(sub) == 2
    assert torch.equal(sub.keys, cb.keys[[1, 3]]) and torch.equal(sub.values, cb.values[[1, 3]])
    assert [v.edit_id for v in sub.entry(2).versions] == [2, 9] and sub.owner_edit(2) == 9
    assert sub.add(20, torch.eye(4)[0], torch.zeros(3), [7]).entry_id == 5, "the ids the codebook would give"
    sub.retrain(21, 2, torch.eye(4)[3], torch.zeros(3))
    sub.rollback(9)
    for k, v in cb.state_dict().items():
        assert torch.equal(v, before[k]), k
