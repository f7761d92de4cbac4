"""Editing on tiny models: an edit changes what its prompt generates, rollback restores exactly what
was there before, conflicting edits get their own key, ``train`` + ``apply`` mirror ``edit()``, and
a saved codebook reloads into identical routing and outputs."""

from __future__ import annotations

import pytest
import torch

from horen_core import CorruptStateError, HorenConfig, UnknownEditError
from horen_core.layer import HorenLayer

CFG = HorenConfig(layer=1, max_steps=20)
PROMPT = "the capital of France is"
OTHER = ["who wrote", "the river in Cairo is", "Alice plays"]


def gen(editor, prompts, n=4):
    return [(g.token_ids, g.entry_id, g.edit_id) for g in editor.generate(prompts, max_new_tokens=n)]


@pytest.fixture
def editor(tiny_model, make_editor):
    return make_editor(*tiny_model, CFG)


def test_edit_makes_the_prompt_generate_the_target(editor):
    before = editor.generate([PROMPT], max_new_tokens=1)[0]
    target = "Rome" if before.text != "Rome" else "Oslo"
    res = editor.edit(PROMPT, target)
    assert res.created and res.entry_id is not None and len(editor.codebook) == 1
    assert res.answer == tuple(editor.encode_target(target))
    assert torch.allclose(res.key.norm(), torch.tensor(1.0))
    after = editor.generate([PROMPT], max_new_tokens=1)[0]
    assert after.text == target
    assert (after.entry_id, after.edit_id) == (res.entry_id, res.edit_id)
    assert after.score == pytest.approx(1.0, abs=1e-5)


def test_rollback_of_created_entry_restores_unedited_outputs(editor):
    prompts = [PROMPT, *OTHER]
    before = gen(editor, prompts)
    res = editor.edit(PROMPT, "Rome")
    assert gen(editor, prompts)[0] != before[0]
    change = editor.rollback(res.edit_id)
    assert change.kind == "removed_entry"
    assert len(editor.codebook) == 0
    assert gen(editor, prompts) == before
    with pytest.raises(UnknownEditError):
        editor.rollback(res.edit_id)


def test_rollback_of_retrained_entry_restores_first_value(editor):
    first = editor.edit(PROMPT, "Rome")
    after_first = gen(editor, [PROMPT, *OTHER])
    value_first = editor.codebook.values[0].clone()
    assert torch.equal(value_first, first.value)

    second = editor.edit(PROMPT, "Rome")  # same prompt, same answer: the entry is retrained
    assert not second.created and second.entry_id == first.entry_id
    assert len(editor.codebook) == 1
    assert editor.codebook.owner_edit(first.entry_id) == second.edit_id
    assert not torch.equal(editor.codebook.values[0], value_first), "retraining continued from the value"
    assert gen(editor, [PROMPT])[0][2] == second.edit_id

    assert editor.rollback(second.edit_id).kind == "restored"
    assert torch.equal(editor.codebook.values[0], value_first)
    assert gen(editor, [PROMPT, *OTHER]) == after_first


def test_conflicting_edit_gets_its_own_key(editor):
    a = editor.edit(PROMPT, "Rome")
    b = editor.edit(PROMPT, "Oslo")
    assert b.created and b.entry_id != a.entry_id
    assert len(editor.codebook) == 2
    assert editor.codebook.entry(a.entry_id).answer != editor.codebook.entry(b.entry_id).answer
    # rolling back the conflicting edit leaves the first one intact
    editor.rollback(b.edit_id)
    assert gen(editor, [PROMPT])[0][1:] == (a.entry_id, a.edit_id)
    assert editor.generate([PROMPT], max_new_tokens=1)[0].text == "Rome"


def test_conflicting_edit_is_the_one_applied(tiny_llama, make_editor):
    editor = make_editor(*tiny_llama, CFG)
    editor.edit(PROMPT, "Rome")
    b = editor.edit(PROMPT, "Oslo")
    out = editor.generate([PROMPT], max_new_tokens=1)[0]
    assert (out.entry_id, out.edit_id) == (b.entry_id, b.edit_id)
    assert out.text == "Oslo"


def test_edit_ids_are_fresh_and_explicit_ids_are_honoured(editor):
    a = editor.edit(PROMPT, "Rome")
    b = editor.edit("who wrote", "Alice", edit_id=40)
    c = editor.edit("Alice plays", "chess")
    assert b.edit_id == 40 and c.edit_id > 40 and a.edit_id < 40
    assert editor.codebook.edit_ids() == sorted([a.edit_id, 40, c.edit_id])


def test_train_leaves_codebook_unchanged(editor):
    editor.edit("who wrote", "Alice")
    before_state = editor.codebook.state_dict()
    before_gen = gen(editor, [PROMPT, "who wrote"])
    generation = editor.codebook.generation
    res = editor.train(PROMPT, "Rome")
    assert res.created and res.entry_id is None
    assert editor.codebook.generation == generation
    for k, v in editor.codebook.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    assert gen(editor, [PROMPT, "who wrote"]) == before_gen


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_then_apply_mirrors_edit_exactly(arch, tiny_factory, tiny_tokenizer, make_editor):
    """Two replicas with the same model: one edits in place, the other trains and then applies the
    result under the id and entry the first gave it (as a database would). Their codebooks end up
    bit-identical, for a new entry and a retrain."""
    a = make_editor(tiny_factory(arch), tiny_tokenizer, CFG)
    b = make_editor(tiny_factory(arch), tiny_tokenizer, CFG)
    for prompt, target in [(PROMPT, "Rome"), ("who wrote", "Alice"), (PROMPT, "Rome")]:
        ra = a.edit(prompt, target)
        rb = b.train(prompt, target)
        assert (rb.created, rb.answer, rb.steps) == (ra.created, ra.answer, ra.steps)
        assert torch.equal(ra.value, rb.value) and torch.equal(ra.key, rb.key)
        assert rb.entry_id == (None if rb.created else ra.entry_id)
        change = b.apply(ra.edit_id, rb, entry_id=ra.entry_id)
        assert change.entry_id == ra.entry_id
        assert change.kind == ("created" if ra.created else "retrained")
        sa, sb = a.codebook.state_dict(), b.codebook.state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    prompts = [PROMPT, "who wrote", *OTHER]
    assert gen(a, prompts) == gen(b, prompts)


def test_apply_versions_replays_a_log_like_apply_version_one_by_one(tiny_factory, tiny_tokenizer, make_editor):
    """A replay in one call (new entries in runs, a retrain of an entry created in the same call,
    one of an entry created before it) leaves the codebook bit-identical to one call per edit."""
    src = make_editor(tiny_factory(), tiny_tokenizer, CFG)
    log = []
    for prompt, target in [
        ("who wrote", "Alice"),
        (PROMPT, "Rome"),
        (OTHER[1], "Oslo"),
        (PROMPT, "Rome"),
        ("who wrote", "Alice"),
    ]:
        r = src.train(prompt, target)
        edit_id = len(log) + 1
        entry = r.entry_id if r.entry_id is not None else edit_id
        src.apply_version(edit_id, entry, r.key, r.value, r.answer)
        log.append((edit_id, entry, r.key, r.value, r.answer))
    assert len({e for _, e, *_ in log}) < len(log)  # the log holds a retrain
    one = make_editor(tiny_factory(), tiny_tokenizer, CFG)
    for edit_id, entry, key, value, answer in log:
        one.apply_version(edit_id, entry, key, value, answer)
    many = make_editor(tiny_factory(), tiny_tokenizer, CFG)
    many.apply_version(*log[0])
    changes = many.apply_versions(
        [e for e, *_ in log[1:]],
        [en for _, en, *_ in log[1:]],
        torch.stack([k for _, _, k, _, _ in log[1:]]),
        torch.stack([v for *_, v, _ in log[1:]]),
        [a for *_, a in log[1:]],
    )
    assert [c.kind for c in changes] == ["created", "created", "retrained", "retrained"]
    sa, sb = one.codebook.state_dict(), many.codebook.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert many.edit(OTHER[2], "Lima").edit_id == one.edit(OTHER[2], "Lima").edit_id  # next ids alike


def test_apply_version_rejects_a_retrain_with_another_answer(editor):
    res = editor.edit(PROMPT, "Rome")
    with pytest.raises(CorruptStateError):
        editor.apply_version(99, res.entry_id, res.key, res.value, editor.encode_target("Oslo"))


def test_save_load_gives_identical_routing_and_outputs(tiny_model, make_editor, tmp_path):
    model, tok = tiny_model
    editor = make_editor(model, tok, CFG)
    for prompt, target in [(PROMPT, "Rome"), ("who wrote", "Alice"), (PROMPT, "Rome"), ("Alice plays", "chess")]:
        editor.edit(prompt, target)
    editor.rollback(2)
    prompts = [PROMPT, "who wrote", "Alice plays", *OTHER]
    expected = editor.generate(prompts, max_new_tokens=4)
    path = tmp_path / "codebook.safetensors"
    editor.save(path)

    editor.unwrap()  # a fresh editor on the same model, as after a restart
    fresh = make_editor(model, tok, CFG)
    fresh.load(path)
    got = fresh.generate(prompts, max_new_tokens=4)
    assert [(g.token_ids, g.entry_id, g.edit_id, g.score) for g in got] == [
        (g.token_ids, g.entry_id, g.edit_id, g.score) for g in expected
    ]
    # new edit ids continue after the loaded ones
    assert fresh.edit("Bob plays", "golf").edit_id > max(editor.codebook.edit_ids())


def test_load_rejects_a_codebook_of_another_model_or_layer(tiny_factory, tiny_tokenizer, make_editor, tmp_path):
    model = tiny_factory("llama", seed=0)
    editor = make_editor(model, tiny_tokenizer, CFG)
    editor.edit(PROMPT, "Rome")
    path = tmp_path / "codebook.safetensors"
    editor.save(path)
    editor.unwrap()

    other_weights = make_editor(tiny_factory("llama", seed=1), tiny_tokenizer, CFG)
    with pytest.raises(CorruptStateError, match="model"):
        other_weights.load(path)
    assert len(other_weights.codebook) == 0
    other_layer = make_editor(model, tiny_tokenizer, HorenConfig(layer=2))
    with pytest.raises(CorruptStateError, match="module"):
        other_layer.load(path)
    assert len(other_layer.codebook) == 0


def test_load_of_a_damaged_file_raises_corrupt_state(tiny_llama, make_editor, tmp_path):
    editor = make_editor(*tiny_llama, CFG)
    editor.edit(PROMPT, "Rome")
    path = tmp_path / "codebook.safetensors"
    editor.save(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptStateError):
        editor.load(path)


def test_unwrap_puts_the_original_module_back(tiny_model, make_editor):
    model, tok = tiny_model
    editor = make_editor(model, tok, CFG)
    path = editor.adapter.module_path
    base = editor.layer.base_layer
    assert isinstance(model.get_submodule(path), HorenLayer)
    editor.unwrap()
    assert model.get_submodule(path) is base


def test_no_plan_means_the_wrapped_model_is_the_original(tiny_model, make_editor):
    model, tok = tiny_model
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    editor = make_editor(model, tok, CFG)
    editor.edit(PROMPT, "Rome")
    with torch.no_grad():
        wrapped = model(input_ids=ids).logits
    assert torch.equal(plain, wrapped)
    with editor.unedited():
        unedited = editor.generate([PROMPT], max_new_tokens=3)[0]
    editor.unwrap()
    direct = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert unedited.token_ids == direct[0, ids.shape[1] :].tolist()


def test_edit_leaves_no_gradient_state_behind(tiny_model, make_editor):
    model, tok = tiny_model
    editor = make_editor(model, tok, CFG)
    res = editor.edit(PROMPT, "Rome")
    assert not res.value.requires_grad and res.value.grad_fn is None
    assert not editor.codebook.values.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_edit_on_an_unfrozen_model_leaves_no_parameter_gradients(tiny_llama, make_editor):
    model, tok = tiny_llama
    for p in model.parameters():
        p.requires_grad_(True)
    editor = make_editor(model, tok, CFG)
    editor.edit(PROMPT, "Rome")
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
