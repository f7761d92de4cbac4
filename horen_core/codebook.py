"""The HoReN codebook: unit keys, value vectors, the answer each entry was trained for, and
which edits own it.

Each entry has a stack of versions, one per edit that created or retrained it. The entry's value is
that of its newest live version and its key the unit mean of its live versions' queries (just the
creator's query while it has one owner), so rolling back any one edit restores exactly what the
remaining edits produced. To keep memory near the raw size of the key and value vectors, the live
key and value sit in contiguous matrices (the ones retrieval reads); versions store copies only for
entries with several owners (their queries, and the values that newer edits shadow).

Not thread-safe on its own: the editor serialises mutation and reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from horen_core.errors import CorruptStateError, UnknownEditError
from horen_core.hugepages import advise_tensor

_GROW_ROWS = 1024  # capacity grows by fixed chunks, so slack stays below one chunk
# the entry id -> row table is kept while ids stay below SLACK x rows + MIN
_ROW_TABLE_SLACK = 4
_ROW_TABLE_MIN = 1 << 16


def _row_table_fits(top_id: int, rows: int) -> bool:
    """Whether entry ids up to ``top_id`` are dense enough over ``rows`` rows for a row table."""
    return top_id < _ROW_TABLE_SLACK * (rows + 1) + _ROW_TABLE_MIN


@dataclass
class EntryVersion:
    edit_id: int
    key: torch.Tensor | None = None  # stored only when this version's key is not the live key
    value: torch.Tensor | None = None  # stored only when this version's value is not the live value


@dataclass
class Entry:
    entry_id: int
    answer: tuple[int, ...]
    versions: list[EntryVersion] = field(default_factory=list)


@dataclass(frozen=True)
class CodebookChange:
    """What one add, retrain or rollback did; enough for a caller to mirror it."""

    edit_id: int
    entry_id: int
    kind: str  # "created" | "retrained" | "removed_entry" | "restored"


class _Rows:
    """The live keys and values in contiguous matrices (the ones retrieval reads), grown by fixed
    chunks, and the map between rows and entry ids: a dict, and for ``rows_of`` a tensor indexed by
    entry id while the ids stay dense."""

    def __init__(self, key_dim: int, value_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.key_dim, self.value_dim, self.device, self.dtype = key_dim, value_dim, device, dtype
        self.key_buf = torch.empty(0, key_dim, device=device, dtype=dtype)  # [capacity, dk]
        self.value_buf = torch.empty(0, value_dim, device=device, dtype=dtype)
        self.size = 0
        self.entry_at: list[int] = []  # row -> entry_id
        self.row_of: dict[int, int] = {}  # entry_id -> row
        # the same map as a tensor indexed by entry id (-1: none); None once the ids grow far past
        # the number of rows (they were given, not allocated), and the dict serves
        self.table: torch.Tensor | None = torch.empty(0, dtype=torch.int64)
        self._ids: torch.Tensor | None = None  # cache of ``ids``, reset on change

    @property
    def keys(self) -> torch.Tensor:
        return self.key_buf[: self.size]

    @property
    def values(self) -> torch.Tensor:
        return self.value_buf[: self.size]

    def ids(self) -> torch.Tensor:
        """[N] entry id of each row."""
        if self._ids is None or self._ids.shape[0] != self.size:
            self._ids = torch.tensor(self.entry_at, dtype=torch.int64, device=self.device)
        return self._ids

    def rows_of(self, entry_ids: torch.Tensor) -> torch.Tensor:
        table = self.table
        if table is None:
            get = self.row_of.get
            return torch.tensor([get(e, -1) for e in entry_ids.reshape(-1).tolist()], dtype=torch.int64).view_as(
                entry_ids
            )
        if table.shape[0] == 0:
            return torch.full_like(entry_ids, -1)
        # numpy: a few hundred ids per routed query, where torch's per-call overhead is most of the
        # cost (0.03 vs 0.08-0.11 ms for 512 ids among 1M entries)
        ids, rows = entry_ids.to(torch.int64).numpy(), table.numpy()
        known = (ids >= 0) & (ids < len(rows))
        return torch.from_numpy(np.where(known, rows[np.where(known, ids, 0)], -1))

    def _set(self, entry_id: int, row: int) -> None:
        """Record ``entry_id`` at ``row`` (-1: gone) in the table, growing or dropping it."""
        table = self.table
        if table is None:
            return
        if entry_id < 0:
            self.table = None
            return
        if entry_id >= table.shape[0]:
            if row < 0:
                return
            if not _row_table_fits(entry_id, self.size):
                self.table = None  # sparse ids: a table would be mostly holes
                return
            grown = torch.full((max(entry_id + 1, 2 * table.shape[0]),), -1, dtype=torch.int64)
            grown[: table.shape[0]] = table
            self.table = table = grown
        table[entry_id] = row

    def ensure_capacity(self, rows: int) -> None:
        if rows <= self.key_buf.shape[0]:
            return
        cap = ((rows + _GROW_ROWS - 1) // _GROW_ROWS) * _GROW_ROWS
        keys = torch.empty(cap, self.key_dim, device=self.device, dtype=self.dtype)
        advise_tensor(keys)  # routing reads scattered rows: huge pages, asked for before the first write
        keys[self.size :].zero_()
        values = torch.zeros(cap, self.value_dim, device=self.device, dtype=self.dtype)
        keys[: self.size] = self.key_buf[: self.size]
        values[: self.size] = self.value_buf[: self.size]
        self.key_buf, self.value_buf = keys, values

    def append(self, entry_ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows after the last for these entries (keys and values already checked)."""
        n = len(entry_ids)
        self.ensure_capacity(self.size + n)
        start = self.size
        self.key_buf[start : start + n] = keys
        self.value_buf[start : start + n] = values
        for i, entry_id in enumerate(entry_ids):
            self.size = start + i + 1  # before _set, which decides from the size whether a table fits
            self.entry_at.append(entry_id)
            self.row_of[entry_id] = start + i
            self._set(entry_id, start + i)
        self._ids = None

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place."""
        last = self.size - 1
        entry_id = self.entry_at[row]
        if row != last:
            moved = self.entry_at[last]
            self.key_buf[row] = self.key_buf[last]
            self.value_buf[row] = self.value_buf[last]
            self.entry_at[row] = moved
            self.row_of[moved] = row
            self._set(moved, row)
        self.entry_at.pop()
        del self.row_of[entry_id]
        self._set(entry_id, -1)
        self.size -= 1
        self._ids = None

    def filled(self, entry_ids: Sequence[int], keys: torch.Tensor, values: torch.Tensor, table: bool = True) -> _Rows:
        """New rows holding these entries, in this order (keys and values already checked); with a
        row table when ``table`` and the ids are dense enough."""
        out = _Rows(self.key_dim, self.value_dim, self.device, self.dtype)
        n = len(entry_ids)
        out.ensure_capacity(n)
        out.key_buf[:n] = keys.to(self.device, self.dtype)
        out.value_buf[:n] = values.to(self.device, self.dtype)
        out.size = n
        out.entry_at = [int(e) for e in entry_ids]
        out.row_of = {e: r for r, e in enumerate(out.entry_at)}
        top = max(out.entry_at, default=-1)
        if not table or min(out.entry_at, default=0) < 0 or not _row_table_fits(top, n):
            out.table = None
        else:
            out.table = torch.full((top + 1,), -1, dtype=torch.int64)
            out.table[torch.tensor(out.entry_at, dtype=torch.int64)] = torch.arange(n)
        return out

    def nbytes(self) -> int:
        return (
            self.key_buf.numel() * self.key_buf.element_size() + self.value_buf.numel() * self.value_buf.element_size()
        )


class _CodebookFiles:
    """A codebook's state as plain tensors, and safetensors files of it."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors describing the whole codebook (ordered by row)."""
        return _state_of(self)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace this codebook's contents; validates shapes and finiteness first."""
        self.__dict__.update(_from_state(self, state).__dict__)

    def save(
        self, path: str | Path, metadata: dict[str, str] | None = None, extra: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write the state (and ``extra`` tensors beside it, which ``load`` ignores) as safetensors."""
        meta = {"horen_codebook": "1", **(metadata or {})}
        tensors = {**(extra or {}), **self.state_dict()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

    @staticmethod
    def read_metadata(path: str | Path) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})

    def load(self, path: str | Path) -> None:
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise CorruptStateError(f"cannot read codebook file {path}: {exc}") from exc
        self.load_state_dict(state)

    def describe(self) -> str:
        return json.dumps({"entries": len(self), "edits": len(self._edit_entry)})


class Codebook(_CodebookFiles):
    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.device = torch.device(device)
        self.dtype = dtype
        self._rows = _Rows(key_dim, value_dim, self.device, dtype)
        self._entries: dict[int, Entry] = {}
        self._edit_entry: dict[int, int] = {}  # edit_id -> entry_id
        self._next_entry_id = 1
        self.generation = 0  # bumped on every change; lets derived indexes know they are stale

    # ---- read side -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._rows.size

    @property
    def keys(self) -> torch.Tensor:
        return self._rows.keys

    @property
    def values(self) -> torch.Tensor:
        return self._rows.values

    @property
    def row_entry_ids(self) -> torch.Tensor:
        """[N] entry id of each row; newer entries have larger ids (used to break exact ties)."""
        return self._rows.ids()

    def entry_id_at(self, row: int) -> int:
        return self._rows.entry_at[row]

    def row_of(self, entry_id: int) -> int:
        return self._rows.row_of[entry_id]

    def rows_of(self, entry_ids: torch.Tensor) -> torch.Tensor:
        """Rows of these entries (any shape, on the CPU), -1 for ids not (or no longer) in the codebook."""
        return self._rows.rows_of(entry_ids)

    def has_entry(self, entry_id: int) -> bool:
        return entry_id in self._entries

    def entry(self, entry_id: int) -> Entry:
        return self._entries[entry_id]

    def entry_of_edit(self, edit_id: int) -> int | None:
        return self._edit_entry.get(edit_id)

    def owner_edit(self, entry_id: int) -> int:
        """The newest live edit of an entry: the one whose value is applied."""
        return self._entries[entry_id].versions[-1].edit_id

    def edit_ids(self) -> list[int]:
        return sorted(self._edit_entry)

    def nbytes(self) -> int:
        """Bytes held by tensors, live matrices at capacity plus stored versions."""
        versions = [t for e in self._entries.values() for v in e.versions for t in (v.key, v.value) if t is not None]
        return self._rows.nbytes() + sum(t.numel() * t.element_size() for t in versions)

    def subset(self, entry_ids: Sequence[int]) -> Codebook:
        """A scratch codebook holding copies of these entries only (same entry ids, keys, values,
        answers and versions, in this codebook's row order) and the same next entry id, so entries
        added to it get the ids this codebook would give them. Changing it leaves this one alone."""
        return _subset_of(self, entry_ids)

    # ---- write side ------------------------------------------------------------------------
    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows in all (a replay that knows its size): adds up to there copy
        nothing. Capacity otherwise grows by ``_GROW_ROWS``, copying the matrices each time."""
        self._rows.ensure_capacity(rows)

    def _prep(self, t: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        t = t.detach().reshape(-1).to(device=self.device, dtype=self.dtype)
        if t.numel() != dim:
            raise CorruptStateError(f"{what} has {t.numel()} elements, expected {dim}")
        if not torch.isfinite(t).all():
            raise CorruptStateError(f"{what} contains NaN or infinity")
        return t

    def add(
        self,
        edit_id: int,
        key: torch.Tensor,
        value: torch.Tensor,
        answer: tuple[int, ...] | list[int],
        entry_id: int | None = None,
    ) -> CodebookChange:
        """Create a new entry owned by ``edit_id``. ``entry_id`` is given when replaying a log."""
        if edit_id in self._edit_entry:
            raise CorruptStateError(f"edit {edit_id} is already in the codebook")
        key = torch.nn.functional.normalize(self._prep(key, self.key_dim, "key"), dim=0)
        value = self._prep(value, self.value_dim, "value")
        if entry_id is None:
            entry_id = self._next_entry_id
        if entry_id in self._entries:
            raise CorruptStateError(f"entry {entry_id} already exists")
        return self._append([edit_id], [entry_id], key[None], value[None], [tuple(int(t) for t in answer)])[0]

    def add_many(
        self,
        edit_ids: Sequence[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        answers: Sequence[Sequence[int]],
        entry_ids: Sequence[int],
    ) -> list[CodebookChange]:
        """``add`` of many new entries at once (a log replay): the same state and changes as adding
        them one by one in this order, with the checks and the copy into the matrices done once for
        all (10,000 entries one by one: 1.2 s under the profiler; 100,000 at once: 2.4 s without it).
        Nothing changes if any of them is rejected."""
        keys, values, answers = _checked_many(self, edit_ids, keys, values, answers, entry_ids)
        if not answers:
            return []
        return self._append(edit_ids, entry_ids, torch.nn.functional.normalize(keys, dim=1), values, answers)

    def _append(
        self,
        edit_ids: Sequence[int],
        entry_ids: Sequence[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        answers: Sequence[tuple[int, ...]],
    ) -> list[CodebookChange]:
        """Rows after the last for new entries, already checked (unit keys): what ``add`` and
        ``add_many`` share."""
        self._rows.append(entry_ids, keys, values)
        changes = []
        for i, (edit_id, entry_id) in enumerate(zip(edit_ids, entry_ids)):
            self._entries[entry_id] = Entry(entry_id, answers[i], [EntryVersion(edit_id)])
            self._edit_entry[edit_id] = entry_id
            changes.append(CodebookChange(edit_id, entry_id, "created"))
        self._next_entry_id = max(self._next_entry_id, max(entry_ids) + 1)
        self.generation += len(edit_ids)
        return changes

    def retrain(self, edit_id: int, entry_id: int, key: torch.Tensor, value: torch.Tensor) -> CodebookChange:
        """Push a new value for an existing entry; ``key`` is this edit's own query, kept for rollback."""
        if edit_id in self._edit_entry:
            raise CorruptStateError(f"edit {edit_id} is already in the codebook")
        entry = self._entries.get(entry_id)
        if entry is None:
            raise CorruptStateError(f"entry {entry_id} does not exist")
        key = torch.nn.functional.normalize(self._prep(key, self.key_dim, "key"), dim=0)
        value = self._prep(value, self.value_dim, "value")
        row = self._rows.row_of[entry_id]
        entry.versions[-1].value = self._rows.value_buf[row].clone()  # the shadowed value
        if len(entry.versions) == 1:
            entry.versions[0].key = self._rows.key_buf[row].clone()  # the creator's own query, kept from now on
        entry.versions.append(EntryVersion(edit_id, key=key.clone()))
        self._rows.key_buf[row] = _centroid(entry)
        self._rows.value_buf[row] = value
        self._edit_entry[edit_id] = entry_id
        self.generation += 1
        return CodebookChange(edit_id, entry_id, "retrained")

    def rollback(self, edit_id: int) -> CodebookChange:
        """Remove one edit's version; the entry goes when no version remains."""
        entry_id = self._edit_entry.pop(edit_id, None)
        if entry_id is None:
            raise UnknownEditError(f"edit {edit_id} is not in the codebook")
        entry = self._entries[entry_id]
        pos = next(i for i, v in enumerate(entry.versions) if v.edit_id == edit_id)
        row = self._rows.row_of[entry_id]
        self.generation += 1
        if len(entry.versions) == 1:
            self._rows.remove(row)
            del self._entries[entry_id]
            return CodebookChange(edit_id, entry_id, "removed_entry")
        removed = entry.versions.pop(pos)
        if pos == len(entry.versions):  # it was the newest: its predecessor's value comes back
            newest = entry.versions[-1]
            self._rows.value_buf[row] = newest.value
            newest.value = None
        if len(entry.versions) == 1:  # one owner left: its own query is the key again, exactly
            only = entry.versions[0]
            self._rows.key_buf[row] = only.key
            only.key = None
        else:
            self._rows.key_buf[row] = _centroid(entry)
        del removed
        return CodebookChange(edit_id, entry_id, "restored")


def _state_of(cb: Codebook) -> dict[str, torch.Tensor]:
    """``Codebook.state_dict``."""
    n = len(cb)
    answers: list[int] = []
    answer_offsets = [0]
    ver_entry, ver_edit, ver_key_idx, ver_value_idx = [], [], [], []
    extra_keys: list[torch.Tensor] = []
    extra_values: list[torch.Tensor] = []
    for row in range(n):
        entry = cb._entries[cb._rows.entry_at[row]]
        answers.extend(entry.answer)
        answer_offsets.append(len(answers))
        for v in entry.versions:
            ver_entry.append(entry.entry_id)
            ver_edit.append(v.edit_id)
            if v.key is not None:
                ver_key_idx.append(len(extra_keys))
                extra_keys.append(v.key)
            else:
                ver_key_idx.append(-1)
            if v.value is not None:
                ver_value_idx.append(len(extra_values))
                extra_values.append(v.value)
            else:
                ver_value_idx.append(-1)

    def stack(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
        if not ts:
            return torch.zeros(0, dim, dtype=cb.dtype)
        return torch.stack([t.cpu() for t in ts])

    return {
        "keys": cb.keys.detach().cpu().clone(),
        "values": cb.values.detach().cpu().clone(),
        "entry_ids": torch.tensor(cb._rows.entry_at, dtype=torch.int64),
        "answers": torch.tensor(answers, dtype=torch.int64),
        "answer_offsets": torch.tensor(answer_offsets, dtype=torch.int64),
        "version_entry": torch.tensor(ver_entry, dtype=torch.int64),
        "version_edit": torch.tensor(ver_edit, dtype=torch.int64),
        "version_key_index": torch.tensor(ver_key_idx, dtype=torch.int64),
        "version_value_index": torch.tensor(ver_value_idx, dtype=torch.int64),
        "version_keys": stack(extra_keys, cb.key_dim),
        "version_values": stack(extra_values, cb.value_dim),
        "next_entry_id": torch.tensor([cb._next_entry_id], dtype=torch.int64),
    }


def _from_state(cb: Codebook, state: dict[str, torch.Tensor]) -> Codebook:
    """A new codebook like ``cb`` holding ``state`` (``Codebook.load_state_dict``), validated first."""
    try:
        keys, values = state["keys"], state["values"]
        entry_ids = state["entry_ids"].tolist()
        answers = state["answers"].tolist()
        offsets = state["answer_offsets"].tolist()
        ver_entry = state["version_entry"].tolist()
        ver_edit = state["version_edit"].tolist()
        ver_key_idx = state["version_key_index"].tolist()
        ver_value_idx = state["version_value_index"].tolist()
        vkeys, vvalues = state["version_keys"], state["version_values"]
        next_entry_id = int(state["next_entry_id"][0])
    except (KeyError, IndexError) as exc:
        raise CorruptStateError(f"codebook state is missing {exc}") from exc
    n = len(entry_ids)
    if keys.shape != (n, cb.key_dim) or values.shape != (n, cb.value_dim):
        raise CorruptStateError(
            f"codebook shapes {tuple(keys.shape)}/{tuple(values.shape)} do not match "
            f"key_dim={cb.key_dim}, value_dim={cb.value_dim}"
        )
    if len(offsets) != n + 1 or len(set(entry_ids)) != n:
        raise CorruptStateError("codebook answer offsets or entry ids are inconsistent")
    for name in ("keys", "values", "version_keys", "version_values"):
        if not torch.isfinite(state[name]).all():
            raise CorruptStateError(f"codebook tensor {name!r} contains NaN or infinity")
    if not (len(ver_entry) == len(ver_edit) == len(ver_key_idx) == len(ver_value_idx)):
        raise CorruptStateError("codebook version arrays have different lengths")
    if offsets[0] != 0 or any(a > b for a, b in zip(offsets, offsets[1:])) or offsets[-1] != len(answers):
        raise CorruptStateError("codebook answer offsets are not increasing within the answers")
    if any(not offsets[r] < offsets[r + 1] for r in range(n)):
        raise CorruptStateError("codebook entry without an answer")
    if any(not -1 <= i < vkeys.shape[0] for i in ver_key_idx) or any(
        not -1 <= i < vvalues.shape[0] for i in ver_value_idx
    ):
        raise CorruptStateError("codebook version index out of range")
    if (
        vkeys.dim() != 2
        or vvalues.dim() != 2
        or (vkeys.numel() and vkeys.shape[1] != cb.key_dim)
        or (vvalues.numel() and vvalues.shape[1] != cb.value_dim)
    ):
        raise CorruptStateError("codebook version tensors have the wrong shape")

    fresh = Codebook(cb.key_dim, cb.value_dim, cb.device, cb.dtype)
    fresh._rows = fresh._rows.filled(entry_ids, keys, values)
    for r, e in enumerate(entry_ids):
        fresh._entries[e] = Entry(e, tuple(answers[offsets[r] : offsets[r + 1]]))
    for e, ed, ki, vi in zip(ver_entry, ver_edit, ver_key_idx, ver_value_idx):
        if e not in fresh._entries or ed in fresh._edit_entry:
            raise CorruptStateError(f"codebook version (entry {e}, edit {ed}) is inconsistent")
        k = vkeys[ki].to(fresh.device, fresh.dtype) if ki >= 0 else None
        v = vvalues[vi].to(fresh.device, fresh.dtype) if vi >= 0 else None
        fresh._entries[e].versions.append(EntryVersion(ed, k, v))
        fresh._edit_entry[ed] = e
    if any(not entry.versions for entry in fresh._entries.values()):
        raise CorruptStateError("codebook entry without any owning edit")
    fresh._next_entry_id = max(next_entry_id, max(entry_ids, default=0) + 1)
    fresh.generation = cb.generation + 1
    return fresh


def _subset_of(cb: Codebook, entry_ids: Sequence[int]) -> Codebook:
    """``Codebook.subset``."""
    out = Codebook(cb.key_dim, cb.value_dim, cb.device, cb.dtype)
    rows = sorted(cb._rows.row_of[int(e)] for e in {int(e) for e in entry_ids} if e in cb._entries)
    pick = torch.tensor(rows, dtype=torch.int64, device=cb.device)
    ids = [cb._rows.entry_at[r] for r in rows]
    # no row table: the dict serves, a scratch codebook is small
    out._rows = cb._rows.filled(
        ids, cb._rows.key_buf.index_select(0, pick), cb._rows.value_buf.index_select(0, pick), table=False
    )
    for e in ids:
        entry = cb._entries[e]
        versions = [EntryVersion(v.edit_id, v.key, v.value) for v in entry.versions]
        out._entries[e] = Entry(e, entry.answer, versions)
        for v in versions:
            out._edit_entry[v.edit_id] = e
    out._next_entry_id = cb._next_entry_id
    return out


def _checked_many(cb: Codebook, edit_ids, keys, values, answers, entry_ids):
    """``Codebook.add_many``'s checks: its keys, values and answers as the codebook stores them."""
    n = len(edit_ids)
    if not (n == len(answers) == len(entry_ids) == keys.shape[0] == values.shape[0]):
        raise CorruptStateError("add_many: edit ids, keys, values, answers and entry ids differ in number")
    if n == 0:
        return keys, values, []
    if len(set(edit_ids)) != n or any(e in cb._edit_entry for e in edit_ids):
        raise CorruptStateError("add_many: an edit is repeated or already in the codebook")
    if len(set(entry_ids)) != n or any(e in cb._entries for e in entry_ids):
        raise CorruptStateError("add_many: an entry is repeated or already exists")
    if keys.dim() != 2 or keys.shape[1] != cb.key_dim or values.dim() != 2 or values.shape[1] != cb.value_dim:
        raise CorruptStateError(
            f"add_many: keys {tuple(keys.shape)} and values {tuple(values.shape)} do not fit"
            f" dimensions {cb.key_dim} and {cb.value_dim}"
        )
    answers = [tuple(int(t) for t in a) for a in answers]
    keys = keys.detach().to(device=cb.device, dtype=cb.dtype)
    values = values.detach().to(device=cb.device, dtype=cb.dtype)
    if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
        raise CorruptStateError("add_many: a key or value contains NaN or infinity")
    return keys, values, answers


def _centroid(entry: Entry) -> torch.Tensor:
    """The key of an entry with several owners: the unit mean of their queries, so it sits between
    the paraphrases that share one answer."""
    return torch.nn.functional.normalize(torch.stack([v.key for v in entry.versions]).sum(dim=0), dim=0)
