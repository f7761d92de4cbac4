"""The relation gate: its features leave the subject out, a fitted map separates what it was fitted
to separate, gate files are checked, and an editor routes a prompt to a gated edit only when its
relation vector is close enough, keeping each edit's vector through rollback, replay and save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from horen_core import HorenConfig
from horen_core.errors import CorruptStateError
from horen_core.gate import RelationGate, fit, gate_features, subject_mask

PROMPT, TARGET = "Bob plays the instrument piano and the sport", "chess"


def test_subject_mask_marks_the_subjects_tokens_or_none(tiny_llama):
    _, tok = tiny_llama
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    mask = subject_mask(ids, "instrument piano", tok)
    picked = tok.decode([t for t, m in zip(ids, mask.tolist()) if m])
    assert picked.strip() == "instrument piano" and int(mask.sum()) < len(ids)
    assert not subject_mask(ids, "piano instrument", tok).any()
    assert not subject_mask(ids, "", tok).any()


def test_features_leave_the_subjects_tokens_out_of_the_mean():
    x = torch.randn(6, 16)
    subject = torch.tensor([False, True, True, False, False, False])
    other = x.clone()
    other[1:3] += 100  # another subject's activations
    a, b = gate_features(x, subject), gate_features(other, subject)
    assert a.shape == (32,)
    assert torch.allclose(a, b)
    assert not torch.allclose(
        gate_features(x, torch.zeros(6, dtype=torch.bool)), gate_features(other, torch.zeros(6, dtype=torch.bool))
    )


def test_fit_learns_to_ignore_a_shared_direction_and_keep_the_relation():
    g = torch.Generator().manual_seed(0)
    relations = torch.randn(6, 32, generator=g)
    subjects = torch.randn(40, 32, generator=g) * 3  # the subject dominates every raw vector

    def sample(s, r):
        return subjects[s] + relations[r] + 0.1 * torch.randn(32, generator=g)

    pairs = []
    for s in range(40):
        r, other = s % 6, (s + 1) % 6
        pairs.append((sample(s, r), sample(s, r), 1))
        pairs.append((sample(s, r), sample(s, other), 0))
    a = torch.stack([p[0] for p in pairs])
    b = torch.stack([p[1] for p in pairs])
    same = torch.tensor([p[2] for p in pairs])
    raw = F.cosine_similarity(a, b)
    assert raw[same == 0].mean() > 0.8  # without the map both kinds look alike
    weight, mean = fit(a, b, same, rank=8, epochs=300)
    gate = RelationGate(weight, mean, 0.0)
    cos = (gate.embed(a) * gate.embed(b)).sum(-1)
    assert cos[same == 1].min() > cos[same == 0].max()


def test_gate_files_round_trip_and_refuse_another_model(tmp_path):
    gate = RelationGate(torch.randn(8, 4), torch.randn(8), 0.42)
    path = tmp_path / "g.safetensors"
    gate.save(path, "abc")
    back = RelationGate.load(path, "abc")
    assert back.threshold == 0.42 and torch.equal(back.weight, gate.weight)
    with pytest.raises(CorruptStateError):
        RelationGate.load(path, "another")
    (tmp_path / "bad.safetensors").write_bytes(b"not a gate")
    with pytest.raises(CorruptStateError):
        RelationGate.load(tmp_path / "bad.safetensors")
    assert RelationGate.shipped("no-such-model") is None


@pytest.fixture
def gated(tiny_llama, make_editor):
    editor = make_editor(*tiny_llama, HorenConfig(layer=1, max_steps=60, lr=0.5, stop_loss=1.0))
    dk = editor.codebook.key_dim
    weight = torch.randn(2 * dk, 16, generator=torch.Generator().manual_seed(0))
    editor.set_gate(RelationGate(weight, torch.zeros(2 * dk), -1.0))
    return editor


def test_a_prompt_reaches_a_gated_edit_only_when_its_relation_is_close(gated):
    res = gated.edit(PROMPT, TARGET, subject="")
    assert res.gate is not None and res.gate.shape == (16,)
    assert gated.generate([PROMPT], max_new_tokens=2)[0].edit_id == res.edit_id
    gated.gate.threshold = 1.5  # no cosine clears it: the edit is kept but never reached
    got = gated.generate([PROMPT], max_new_tokens=2)[0]
    assert got.edit_id is None and got.entry_id is None
    gated.set_gate(None)  # without a gate the edit routes on its key again
    assert gated.generate([PROMPT], max_new_tokens=2)[0].edit_id == res.edit_id


def test_an_edit_made_before_the_gate_is_not_gated(tiny_llama, make_editor):
    editor = make_editor(*tiny_llama, HorenConfig(layer=1, max_steps=60, lr=0.5, stop_loss=1.0))
    res = editor.edit(PROMPT, TARGET, subject="")
    assert res.gate is None
    dk = editor.codebook.key_dim
    editor.set_gate(RelationGate(torch.randn(2 * dk, 16), torch.zeros(2 * dk), 1.5))
    assert editor.generate([PROMPT], max_new_tokens=2)[0].edit_id == res.edit_id


def test_relation_vectors_follow_rollback_replay_and_save(gated, tmp_path, tiny_llama, make_editor):
    a = gated.edit(PROMPT, TARGET, subject="")
    b = gated.edit("the capital of France is", "Rome", subject="")
    assert set(gated.store.gates) == {a.edit_id, b.edit_id}
    gated.rollback(b.edit_id)
    assert set(gated.store.gates) == {a.edit_id}
    path = tmp_path / "cb.safetensors"
    gated.save(path)
    gated.unwrap()

    other = make_editor(*tiny_llama, HorenConfig(layer=1, max_steps=60, lr=0.5, stop_loss=1.0))
    other.load(path)
    assert torch.allclose(other.store.gates[a.edit_id].cpu(), a.gate)
    other.unwrap()

    third = make_editor(*tiny_llama, HorenConfig(layer=1, max_steps=60, lr=0.5, stop_loss=1.0))
    third.apply_versions([a.edit_id], [a.edit_id], a.key[None], a.value[None], [a.answer], [""], [a.gate])
    assert torch.allclose(third.store.gates[a.edit_id].cpu(), a.gate)


def test_a_prompt_below_the_threshold_is_routed_only_through_both_gates(tiny_llama, make_editor):
    cfg = HorenConfig(layer=1, max_steps=60, lr=0.5, stop_loss=1.0, threshold=1.0, subject_threshold=-1.0)
    editor = make_editor(*tiny_llama, cfg)
    dk = editor.codebook.key_dim
    editor.set_gate(RelationGate(torch.randn(2 * dk, 16), torch.zeros(2 * dk), -1.0))
    near = "Bob plays the instrument piano and the"  # the key's cosine is below 1.0
    named = editor.edit(PROMPT, TARGET, subject="Bob")
    got = editor.generate([near], max_new_tokens=2)[0]
    assert got.score < 1.0 and got.edit_id == named.edit_id
    editor.rollback(named.edit_id)
    anywhere = editor.edit(PROMPT, TARGET, subject="")  # no subject to name: the full threshold holds
    assert editor.generate([near], max_new_tokens=2)[0].edit_id is None
    editor.rollback(anywhere.edit_id)
    editor.set_gate(None)
    ungated = editor.edit(PROMPT, TARGET, subject="Bob")  # no relation vector: the full threshold holds
    assert ungated.gate is None
    assert editor.generate([near], max_new_tokens=2)[0].edit_id is None


def test_the_configured_gate_threshold_replaces_the_fitted_one(tiny_llama, make_editor):
    editor = make_editor(*tiny_llama, HorenConfig(layer=1, gate_threshold=0.25))
    dk = editor.codebook.key_dim
    editor.set_gate(RelationGate(torch.randn(2 * dk, 16), torch.zeros(2 * dk), 0.9))
    assert editor.gate.threshold == 0.25
