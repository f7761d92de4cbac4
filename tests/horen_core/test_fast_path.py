"""The fast training path (layers above the edited one run on a cached hidden state) computes the same
logits and gradients as a full-model forward with the value injected; the reference procedure runs
the full model for exactly ``max_steps`` steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from horen_core import HorenConfig
from horen_core.layer import InjectPlan, activate
from horen_core.training import question_contexts

PROMPT = "who wrote the capital of France is"
TARGET = "Alice Bob Carol"


def case(editor):
    prompt_ids = editor.encode_prompt(PROMPT)
    target_ids = editor.encode_target(TARGET)
    ids = torch.tensor([prompt_ids + target_ids[:-1]])
    return ids, len(prompt_ids) - 1, target_ids


def full_logits(editor, ids, p, m, value):
    plan = InjectPlan(editor.layer, positions=torch.tensor([p]), values=value[None])
    with activate(plan):
        return editor.model(input_ids=ids).logits[0, p : p + m]


def some_value(editor, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(editor.codebook.value_dim, generator=g) * 3


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_upper_logits_equal_full_model_logits(tiny_model, make_editor, layer):
    editor = make_editor(*tiny_model, HorenConfig(layer=layer))
    assert editor.adapter.supports_fast_path
    ids, p, target = case(editor)
    m = len(target)
    hidden = editor.trainer.lower_pass(ids)["h"]
    value = some_value(editor)
    onehot = torch.zeros(1, ids.shape[1], 1)
    onehot[0, p] = 1
    fast = editor.adapter.upper_logits(hidden + onehot * value, slice(p, p + m))[0]
    full = full_logits(editor, ids, p, m, value)
    assert fast.shape == full.shape == (m, editor.model.config.vocab_size)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    # the injected value matters, so equality above is not vacuous
    assert not torch.allclose(full, full_logits(editor, ids, p, m, torch.zeros_like(value)), atol=1e-3)


def test_training_step_forward_and_gradient_equal_full_model(tiny_model, make_editor):
    """The per-step function edit() trains with (prefix-cached where the model allows) against the
    full model: same logits, same loss gradient with respect to the value."""
    editor = make_editor(*tiny_model, HorenConfig(layer=1))
    ids, p, target = case(editor)
    m = len(target)
    hidden = editor.trainer.lower_pass(ids)["h"]
    step = editor.trainer.forwards.step(ids[0].tolist(), p, p, m, hidden)
    tgt = torch.tensor(target)
    for seed in range(2):
        v_fast = some_value(editor, seed).requires_grad_(True)
        v_full = some_value(editor, seed).requires_grad_(True)
        fast, full = step(v_fast), full_logits(editor, ids, p, m, v_full)
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
        F.cross_entropy(fast, tgt).backward()
        F.cross_entropy(full, tgt).backward()
        torch.testing.assert_close(v_fast.grad, v_full.grad, atol=1e-5, rtol=1e-4)
        assert v_fast.grad.abs().sum() > 0


def test_lower_pass_captures_the_edited_layer_input(tiny_model, make_editor):
    editor = make_editor(*tiny_model, HorenConfig(layer=1))
    ids, _, _ = case(editor)
    seen = {}

    def hook(_module, inputs, _output):
        seen["x"] = inputs[0]

    handle = editor.layer.base_layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            editor.model(input_ids=ids)
    finally:
        handle.remove()
    torch.testing.assert_close(editor.trainer.lower_pass(ids)["x"], seen["x"])


def count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


def test_reference_procedure_runs_exactly_max_steps_on_the_full_model(tiny_llama, make_editor):
    model, tok = tiny_llama
    # stop_loss is huge, so the early stop would fire as soon as greedy decoding matches: it must not
    cfg = HorenConfig(layer=1, reference_procedure=True, lr=1.0, max_steps=7, stop_loss=1e9)
    editor = make_editor(model, tok, cfg)
    opt_steps = []
    opt_handle = register_optimizer_step_post_hook(lambda *_: opt_steps.append(1))
    embeds, emb_handle = count_calls(model.get_input_embeddings())
    try:
        res = editor.edit("the capital of France is", "Rome")
    finally:
        opt_handle.remove()
        emb_handle.remove()
    assert res.steps == 7
    assert len(opt_steps) == 7
    assert len(embeds) >= 7 + 1, "every reference step is a full-model forward"


def test_default_procedure_stops_early_and_runs_the_lower_layers_once(tiny_llama, make_editor):
    model, tok = tiny_llama
    editor = make_editor(model, tok, HorenConfig(layer=1, max_steps=50, stop_loss=1e9))
    opt_steps = []
    opt_handle = register_optimizer_step_post_hook(lambda *_: opt_steps.append(1))
    embeds, emb_handle = count_calls(model.get_input_embeddings())
    try:
        res = editor.edit("the capital of France is", "Rome")
    finally:
        opt_handle.remove()
        emb_handle.remove()
    assert res.steps == len(opt_steps) < 50
    assert len(embeds) == 1, "the layers below the edited one run once per edit"
    assert editor.generate(["the capital of France is"], max_new_tokens=1)[0].token_ids == list(res.answer)


def test_batched_contexts_equal_separate_passes(tiny_model, make_editor):
    """The plain and chat contexts of one edit trained in one batched pass over the layers above
    (prefixes left-padded, suffixes right-padded) give each context's own logits and gradients."""
    import copy

    from tests.horen_core.test_prompting import CHATML

    model, tok = tiny_model
    tok = copy.deepcopy(tok)
    tok.chat_template = CHATML
    editor = make_editor(model, tok, HorenConfig(layer=1))
    contexts = question_contexts(
        editor.tokens, editor.chat, editor.config, "who wrote the capital of France is", "Alice Bob"
    )
    assert len(contexts) == 2 and len(contexts[0].rendered.ids) != len(contexts[1].rendered.ids)
    for c in contexts:
        editor.trainer.prepare(c)
    spans = [(c.rendered.end - 1, len(c.rendered.ids) - 1, len(c.target)) for c in contexts]
    batched = editor.trainer.forwards.batched(contexts, spans)
    singles = [editor.trainer.forwards.step(c.ids, p, f, m, c.hidden) for c, (p, f, m) in zip(contexts, spans)]
    v_b = some_value(editor).requires_grad_(True)
    v_s = some_value(editor).requires_grad_(True)
    got, ref = batched(v_b), [f(v_s) for f in singles]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    sum(F.cross_entropy(a, torch.tensor(c.target)) for a, c in zip(got, contexts)).backward()
    sum(F.cross_entropy(b, torch.tensor(c.target)) for b, c in zip(ref, contexts)).backward()
    torch.testing.assert_close(v_b.grad, v_s.grad, atol=1e-5, rtol=1e-4)
    assert v_b.grad.abs().sum() > 0
