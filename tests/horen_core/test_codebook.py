"""Codebook unit tests: versions, rollback, row bookkeeping, state round trips, corrupt states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from horen_core import Codebook, CorruptStateError, HopfieldRetriever, UnknownEditError

DK, DV = 8, 6


def vec(seed: int, dim: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def unit(seed: int) -> torch.Tensor:
    return F.normalize(vec(seed, DK), dim=0)


@pytest.fixture
def cb() -> Codebook:
    return Codebook(DK, DV)


def fill(cb: Codebook, n: int, first_edit: int = 1) -> None:
    for i in range(n):
        cb.add(first_edit + i, vec(100 + i, DK), vec(200 + i, DV), [10 + i, 11])


def assert_same_state(a: Codebook, b: Codebook) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_add_normalises_key_and_stores_value_exactly(cb):
    key, value = vec(1, DK) * 7, vec(2, DV)
    change = cb.add(5, key, value, [3, 4])
    assert (change.edit_id, change.kind) == (5, "created")
    assert len(cb) == 1
    assert torch.allclose(cb.keys[0], F.normalize(key, dim=0))
    assert torch.equal(cb.values[0], value)
    assert cb.entry(change.entry_id).answer == (3, 4)
    assert cb.entry_of_edit(5) == change.entry_id
    assert cb.owner_edit(change.entry_id) == 5
    assert cb.entry_id_at(0) == change.entry_id and cb.row_of(change.entry_id) == 0


def test_add_rejects_duplicate_edit_wrong_shape_and_nan(cb):
    cb.add(1, vec(1, DK), vec(2, DV), [1])
    with pytest.raises(CorruptStateError):
        cb.add(1, vec(3, DK), vec(4, DV), [1])
    with pytest.raises(CorruptStateError):
        cb.add(2, vec(3, DK + 1), vec(4, DV), [1])
    with pytest.raises(CorruptStateError):
        cb.add(2, vec(3, DK), torch.full((DV,), float("nan")), [1])
    with pytest.raises(CorruptStateError):
        cb.add(2, torch.full((DK,), float("inf")), vec(4, DV), [1])
    assert len(cb) == 1 and cb.edit_ids() == [1]


@pytest.mark.parametrize("first_id", [1, 10**9], ids=["allocated-ids", "sparse-given-ids"])
def test_add_many_is_adding_one_by_one(first_id):
    """The same state, changes, generation and rows as sequential adds, past a capacity chunk,
    onto entries already there; then rollbacks and further adds behave alike too."""
    one, many = Codebook(DK, DV), Codebook(DK, DV)
    for c in (one, many):
        c.add(1, vec(1, DK), vec(2, DV), [7], entry_id=first_id)
    n = 1500
    edits = list(range(2, n + 2))
    entries = [first_id + 1 + 2 * i for i in range(n)]  # ids with holes
    keys = torch.stack([vec(100 + i, DK) * (1 + i % 3) for i in range(n)])
    values = torch.stack([vec(5000 + i, DV) for i in range(n)])
    answers = [[10 + i, 11] for i in range(n)]
    seq = [one.add(e, keys[i], values[i], answers[i], entry_id=entries[i]) for i, e in enumerate(edits)]
    assert many.add_many(edits, keys, values, answers, entries) == seq
    assert_same_state(one, many)
    assert one.generation == many.generation
    probe = torch.tensor([[first_id, entries[0], entries[-1], entries[-1] + 1, -1]])
    assert torch.equal(one.rows_of(probe), many.rows_of(probe))
    for c in (one, many):
        c.rollback(edits[3])
        c.add(n + 10, vec(9, DK), vec(9, DV), [1])
    assert_same_state(one, many)


def test_add_many_rejects_bad_input_and_changes_nothing(cb):
    cb.add(1, vec(1, DK), vec(2, DV), [1])
    before, gen = cb.state_dict(), cb.generation
    keys, values = torch.stack([vec(3, DK), vec(4, DK)]), torch.stack([vec(5, DV), vec(6, DV)])
    bad = [
        ([1, 3], keys, values, [[1], [2]], [10, 11]),  # edit already in the codebook
        ([2, 2], keys, values, [[1], [2]], [10, 11]),  # edit repeated
        ([2, 3], keys, values, [[1], [2]], [1, 11]),  # entry already there
        ([2, 3], keys, values, [[1], [2]], [10, 10]),  # entry repeated
        ([2, 3], keys[:, :-1], values, [[1], [2]], [10, 11]),  # wrong key dimension
        ([2, 3], keys, values.index_fill(1, torch.tensor([0]), float("nan")), [[1], [2]], [10, 11]),
        ([2, 3], keys.index_fill(1, torch.tensor([0]), float("inf")), values, [[1], [2]], [10, 11]),
        ([2, 3], keys, values, [[1]], [10, 11]),  # counts differ
        ([2, 3], keys, values, [[1], ["x"]], [10, 11]),  # an answer that is no token id
    ]
    for args in bad:
        with pytest.raises((CorruptStateError, ValueError)):
            cb.add_many(*args)
    after = cb.state_dict()
    assert cb.generation == gen and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert cb.add_many([], keys[:0], values[:0], [], []) == []


def test_retrain_then_rollback_restores_value_and_key_exactly(cb):
    fill(cb, 3)
    entry = cb.entry_of_edit(2)
    row = cb.row_of(entry)
    key0, value0 = cb.keys[row].clone(), cb.values[row].clone()
    before = cb.state_dict()

    change = cb.retrain(10, entry, vec(50, DK), vec(51, DV))
    assert change.kind == "retrained"
    assert torch.equal(cb.values[row], vec(51, DV))
    expected = F.normalize(key0 + F.normalize(vec(50, DK), dim=0), dim=0)
    assert torch.allclose(cb.keys[row], expected, atol=1e-6), "a shared entry's key is its owners' unit mean"
    assert cb.owner_edit(entry) == 10

    assert cb.rollback(10).kind == "restored"
    assert torch.equal(cb.values[row], value0)
    assert torch.equal(cb.keys[row], key0)
    assert cb.owner_edit(entry) == 2
    after = cb.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_rollback_of_oldest_version_promotes_next_key(cb):
    cb.add(1, vec(1, DK), vec(2, DV), [7])
    entry = cb.entry_of_edit(1)
    cb.retrain(2, entry, vec(3, DK), vec(4, DV))
    cb.rollback(1)
    assert len(cb) == 1
    assert torch.equal(cb.keys[0], F.normalize(vec(3, DK), dim=0))
    assert torch.equal(cb.values[0], vec(4, DV))
    assert cb.owner_edit(entry) == 2 and cb.edit_ids() == [2]
    # the promoted key is now live, so no shadow copy is left behind
    assert all(v.key is None and v.value is None for v in cb.entry(entry).versions)


def test_rollback_of_middle_version_keeps_live_state(cb):
    cb.add(1, vec(1, DK), vec(2, DV), [7])
    entry = cb.entry_of_edit(1)
    cb.retrain(2, entry, vec(3, DK), vec(4, DV))
    cb.retrain(3, entry, vec(5, DK), vec(6, DV))
    cb.rollback(2)
    assert torch.equal(cb.values[0], vec(6, DV))
    k1, k3 = F.normalize(vec(1, DK), dim=0), F.normalize(vec(5, DK), dim=0)
    assert torch.allclose(cb.keys[0], F.normalize(k1 + k3, dim=0), atol=1e-6)
    cb.rollback(3)  # now edit 1's own value and own key must come back, not edit 2's
    assert torch.equal(cb.values[0], vec(2, DV))
    assert torch.equal(cb.keys[0], k1)
    assert cb.edit_ids() == [1]


def test_rollback_of_created_entry_removes_it_and_swaps_last_row_in(cb):
    fill(cb, 4)
    last_entry = cb.entry_id_at(3)
    last_key, last_value = cb.keys[3].clone(), cb.values[3].clone()
    gone = cb.entry_of_edit(1)
    assert cb.row_of(gone) == 0

    change = cb.rollback(1)
    assert (change.kind, change.entry_id) == ("removed_entry", gone)
    assert len(cb) == 3
    assert cb.entry_id_at(0) == last_entry and cb.row_of(last_entry) == 0
    assert torch.equal(cb.keys[0], last_key) and torch.equal(cb.values[0], last_value)
    assert cb.entry_of_edit(1) is None
    with pytest.raises(KeyError):
        cb.entry(gone)
    with pytest.raises(UnknownEditError):
        cb.rollback(1)
    # the remaining rows still describe their own entries
    for row in range(len(cb)):
        entry = cb.entry_id_at(row)
        assert cb.row_of(entry) == row
        edit = cb.owner_edit(entry)
        assert torch.allclose(cb.keys[row], F.normalize(vec(100 + edit - 1, DK), dim=0))


def rows_by_dict(cb: Codebook, ids: list[int]) -> list[int]:
    return [cb.row_of(e) if e in {cb.entry_id_at(r) for r in range(len(cb))} else -1 for e in ids]


@pytest.mark.parametrize("first_id", [1, 10**9], ids=["allocated-ids", "sparse-given-ids"])
def test_rows_of_follows_adds_removals_and_reloads(first_id):
    cb = Codebook(DK, DV)
    for i in range(6):
        cb.add(i + 1, vec(100 + i, DK), vec(200 + i, DV), [10 + i], entry_id=first_id + 3 * i)
    probe = [first_id + 3 * i for i in range(7)] + [-1, 0, first_id + 1, 2**40]
    ask = torch.tensor([probe, probe[::-1]])
    assert cb.rows_of(ask).tolist() == [rows_by_dict(cb, probe), rows_by_dict(cb, probe[::-1])]
    cb.rollback(2)  # the last row moves into row 1
    cb.rollback(6)
    assert cb.rows_of(torch.tensor(probe)).tolist() == rows_by_dict(cb, probe)
    assert cb.rows_of(torch.tensor(probe)).tolist()[:6] == [0, -1, 2, 3, 1, -1]
    fresh = Codebook(DK, DV)
    fresh.load_state_dict(cb.state_dict())
    assert fresh.rows_of(torch.tensor(probe)).tolist() == rows_by_dict(cb, probe)


def test_rollback_unknown_edit_raises_typed_error(cb):
    fill(cb, 1)
    with pytest.raises(UnknownEditError):
        cb.rollback(99)
    with pytest.raises(KeyError):  # UnknownEditError is also a KeyError for plain callers
        cb.rollback(99)


def test_generation_bumps_on_every_change(cb):
    g = cb.generation
    cb.add(1, vec(1, DK), vec(2, DV), [1])
    cb.retrain(2, cb.entry_of_edit(1), vec(3, DK), vec(4, DV))
    cb.rollback(2)
    assert cb.generation == g + 3


def test_capacity_grows_past_a_chunk_and_keeps_rows(cb):
    n = 1100  # more than one growth chunk
    keys = torch.randn(n, DK, generator=torch.Generator().manual_seed(0))
    values = torch.randn(n, DV, generator=torch.Generator().manual_seed(1))
    for i in range(n):
        cb.add(i + 1, keys[i], values[i], [i])
    assert len(cb) == n
    assert torch.allclose(cb.keys, F.normalize(keys, dim=-1))
    assert torch.equal(cb.values, values)
    # no shadow copies: memory is the two matrices at capacity
    cap = cb._rows.key_buf.shape[0]
    assert n <= cap < n + 1024
    assert cb.nbytes() == cap * (DK + DV) * 4


def test_reserve_makes_room_once_for_a_replay(cb):
    n = 3000
    cb.reserve(n)
    storage = cb._rows.key_buf.data_ptr(), cb._rows.value_buf.data_ptr()
    keys = torch.randn(n, DK, generator=torch.Generator().manual_seed(0))
    for start in range(0, n, 700):  # a replay in chunks
        ids = list(range(start + 1, min(start + 700, n) + 1))
        cb.add_many(ids, keys[start : start + 700], torch.zeros(len(ids), DV), [[1]] * len(ids), ids)
    assert (cb._rows.key_buf.data_ptr(), cb._rows.value_buf.data_ptr()) == storage  # never copied
    assert len(cb) == n and torch.allclose(cb.keys, F.normalize(keys, dim=-1))
    cb.reserve(10)  # less than there is: nothing changes
    assert cb._rows.key_buf.data_ptr() == storage[0]


def build_history(cb: Codebook) -> None:
    """Entries with created, retrained (twice), rolled back and swapped rows."""
    fill(cb, 5)
    cb.retrain(6, cb.entry_of_edit(2), vec(60, DK), vec(61, DV))
    cb.retrain(7, cb.entry_of_edit(2), vec(70, DK), vec(71, DV))
    cb.retrain(8, cb.entry_of_edit(4), vec(80, DK), vec(81, DV))
    cb.rollback(1)  # swaps the last row into row 0
    cb.rollback(6)  # a middle version


def test_state_dict_round_trip_preserves_everything(cb):
    build_history(cb)
    other = Codebook(DK, DV)
    other.load_state_dict(cb.state_dict())
    assert_same_state(cb, other)
    assert other.edit_ids() == cb.edit_ids()
    for edit in cb.edit_ids():
        e = cb.entry_of_edit(edit)
        assert other.entry_of_edit(edit) == e
        assert other.row_of(e) == cb.row_of(e)
        assert other.entry(e).answer == cb.entry(e).answer
        assert other.owner_edit(e) == cb.owner_edit(e)
    # the loaded copy behaves identically from here on: rollbacks restore the same tensors
    for edit in (7, 2, 4):
        assert cb.rollback(edit) == other.rollback(edit)
        assert_same_state(cb, other)
    # and new entries get fresh ids in both
    assert cb.add(100, vec(9, DK), vec(9, DV), [1]) == other.add(100, vec(9, DK), vec(9, DV), [1])


def test_save_load_file_gives_identical_routing(cb, tmp_path):
    build_history(cb)
    path = tmp_path / "cb.safetensors"
    cb.save(path, metadata={"model": "abc"})
    assert Codebook.read_metadata(path)["model"] == "abc"
    other = Codebook(DK, DV)
    other.load(path)
    assert_same_state(cb, other)
    retriever = HopfieldRetriever(alpha=0.1, beta=20.0, steps=1, threshold=0.5)
    queries = torch.cat([cb.keys, F.normalize(torch.randn(16, DK, generator=torch.Generator().manual_seed(3)), dim=-1)])
    a, b = retriever.route(queries, cb.keys), retriever.route(queries, other.keys)
    assert torch.equal(a.rows, b.rows) and torch.equal(a.scores, b.scores)
    assert (a.rows[: len(cb)] == torch.arange(len(cb))).all(), "each key routes to its own row"


def test_load_empty_state(cb):
    build_history(cb)
    cb.load_state_dict(Codebook(DK, DV).state_dict())
    assert len(cb) == 0 and cb.edit_ids() == []
    cb.add(1, vec(1, DK), vec(1, DV), [1])
    assert len(cb) == 1


@pytest.mark.parametrize("name", ["keys", "values", "version_keys", "version_values"])
def test_nan_in_loaded_state_raises(cb, name, tmp_path):
    build_history(cb)
    state = cb.state_dict()
    assert state[name].numel() > 0
    state[name].view(-1)[0] = float("nan")
    target = Codebook(DK, DV)
    fill(target, 2)
    before = target.state_dict()
    with pytest.raises(CorruptStateError):
        target.load_state_dict(state)
    # a failed load leaves the codebook as it was
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the same through a file
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with pytest.raises(CorruptStateError):
        Codebook(DK, DV).load(path)


def test_state_with_wrong_dims_or_missing_tensor_raises(cb):
    build_history(cb)
    with pytest.raises(CorruptStateError):
        Codebook(DK + 1, DV).load_state_dict(cb.state_dict())
    with pytest.raises(CorruptStateError):
        Codebook(DK, DV + 1).load_state_dict(cb.state_dict())
    state = cb.state_dict()
    del state["answers"]
    with pytest.raises(CorruptStateError):
        Codebook(DK, DV).load_state_dict(state)
    state = cb.state_dict()
    state["entry_ids"] = state["entry_ids"][:-1]
    with pytest.raises(CorruptStateError):
        Codebook(DK, DV).load_state_dict(state)


def test_state_with_duplicate_edit_raises(cb):
    build_history(cb)
    state = cb.state_dict()
    state["version_edit"][1] = state["version_edit"][0]
    with pytest.raises(CorruptStateError):
        Codebook(DK, DV).load_state_dict(state)


def test_damaged_file_raises(tmp_path, cb):
    build_history(cb)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CorruptStateError):
        Codebook(DK, DV).load(path)


def test_state_with_out_of_range_version_index_raises_corrupt_state(cb):
    build_history(cb)
    state = cb.state_dict()
    idx = state["version_key_index"]
    idx[int((idx >= 0).nonzero()[0])] = 999
    with pytest.raises(CorruptStateError):
        Codebook(DK, DV).load_state_dict(state)


def test_saved_file_is_plain_safetensors(cb, tmp_path):
    build_history(cb)
    path = tmp_path / "cb.safetensors"
    cb.save(path)
    raw = load_file(str(path))  # no pickle involved: safetensors reads it as plain tensors
    assert torch.equal(raw["values"], cb.values)
