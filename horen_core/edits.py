"""The live edits: the codebook and what is kept beside each edit in it (the subject a prompt must
name, the relation vector), changed only here so that every ``CodebookChange`` reaches the router.
Saved and loaded as one safetensors file; and the records of an edit on its way in (``Fact``,
``TrainedEdit``, ``EditResult``). Not thread-safe: callers hold the editor's lock."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open

from horen_core.codebook import Codebook, CodebookChange
from horen_core.errors import CorruptStateError
from horen_core.routing import Router
from horen_core.subjects import SubjectIndex


@dataclass(frozen=True)
class TrainedEdit:
    """An edit's trained key and value, not yet in the codebook (``HorenEditor.train``)."""

    entry_id: int | None  # the entry it retrains (its key routes there, same answer); None: a new entry
    created: bool  # a new entry (True), or a new value for the entry its key routes to
    steps: int
    loss: float
    seconds: float
    key: torch.Tensor  # this edit's query (unit), on cpu
    value: torch.Tensor  # the trained value, on cpu
    answer: tuple[int, ...]
    subject: str = ""  # the name a prompt must mention to be routed to this edit ("" = any prompt)
    gate: torch.Tensor | None = None  # the question's relation vector, on cpu (None: no relation gate)
    # a long-form edit's values at its answer's tokens [m, dv], on cpu (``training._Context``)
    trail: torch.Tensor | None = None


@dataclass(frozen=True)
class Fact:
    """One edit to make, as ``train`` takes it (``train_many``, ``edit_many``)."""

    prompt: str
    target: str
    fmt: str = "auto"
    subject: str | None = None


@dataclass(frozen=True, kw_only=True)
class EditResult(TrainedEdit):
    """An edit trained and applied (``HorenEditor.edit``): ``entry_id`` is the entry it is in."""

    edit_id: int


class EditStore:
    def __init__(self, codebook: Codebook, router: Router, device: torch.device) -> None:
        self.codebook, self.router, self.device = codebook, router, device
        self._subjects: dict[int, str] = {}  # edit id -> its subject; an entry is gated by its owner edit's
        self._named: SubjectIndex | None = None  # built from ``subjects`` when first asked
        self.gates: dict[int, torch.Tensor] = {}  # edit id -> its relation vector (see horen_core.gate)
        self.trails: dict[int, torch.Tensor] = {}  # edit id -> its values at the answer's tokens [m, dv]
        self.next_edit_id = 1

    @property
    def subjects(self) -> dict[int, str]:
        """Edit id -> its subject. Change it through the store (``add``, ``rollback``...), or assign a
        whole new dict; the index of ``named`` follows both."""
        return self._subjects

    @subjects.setter
    def subjects(self, subjects: dict[int, str]) -> None:
        self._subjects, self._named = subjects, None

    def named(self, text: str) -> list[int]:
        """The edits whose subject ``text`` mentions (``SubjectIndex.named``), live or not."""
        if self._named is None:
            self._named = SubjectIndex(self._subjects)
        return self._named.named(text)

    def _set_subject(self, edit_id: int, subject: str | None) -> None:
        old = self._subjects.pop(edit_id, None)
        if self._named is not None and old is not None:
            self._named.discard(edit_id, old)
        if subject is not None:
            self._subjects[edit_id] = subject
            if self._named is not None:
                self._named.add(edit_id, subject)

    def add(
        self,
        edit_id: int,
        key: torch.Tensor,
        value: torch.Tensor,
        answer: Sequence[int],
        subject: str,
        gate: torch.Tensor | None,
        trail: torch.Tensor | None = None,
    ) -> CodebookChange:
        """A new entry for edit ``edit_id``."""
        trail = self._checked_trail(edit_id, trail)
        change = self.codebook.add(edit_id, key, value, answer)
        self.router.apply([change])
        self._own(edit_id, subject, gate, trail)
        return change

    def _own(self, edit_id: int, subject: str, gate: torch.Tensor | None, trail: torch.Tensor | None = None) -> None:
        """What the editor keeps of an edit that is now in the codebook, beside it."""
        self.next_edit_id = max(self.next_edit_id, edit_id + 1)
        self._set_subject(edit_id, subject)
        self._set_relation(edit_id, gate)
        if trail is None:
            self.trails.pop(edit_id, None)
        else:
            self.trails[edit_id] = trail

    def _checked_trail(self, edit_id: int, trail: torch.Tensor | None) -> torch.Tensor | None:
        """``trail`` as kept ([m, dv] float32 on the codebook's device), or None for an empty one."""
        if trail is None or not trail.numel():
            return None
        dv = self.codebook.value_dim
        if trail.dim() != 2 or trail.shape[1] != dv:
            raise CorruptStateError(f"edit {edit_id}'s trail has shape {tuple(trail.shape)}, expected [m, {dv}]")
        trail = trail.detach().to(self.device, torch.float32)
        if not torch.isfinite(trail).all():
            raise CorruptStateError(f"edit {edit_id}'s trail contains NaN or infinity")
        return trail

    def trail_of(self, entry_id: int) -> torch.Tensor | None:
        """The trail of an entry's live value (its newest edit's), or None."""
        return self.trails.get(self.codebook.owner_edit(entry_id)) if self.trails else None

    def _set_relation(self, edit_id: int, gate: torch.Tensor | None) -> None:
        if gate is None:
            self.gates.pop(edit_id, None)
        else:
            self.gates[edit_id] = gate.to(self.device, torch.float32)

    def rollback(self, edit_id: int) -> CodebookChange:
        change = self.codebook.rollback(edit_id)
        self.router.apply([change])
        self._set_subject(edit_id, None)
        self.gates.pop(edit_id, None)
        self.trails.pop(edit_id, None)
        return change

    def apply_version(
        self,
        edit_id: int,
        entry_id: int,
        key: torch.Tensor,
        value: torch.Tensor,
        answer: Sequence[int],
        subject: str = "",
        gate: torch.Tensor | None = None,
        trail: torch.Tensor | None = None,
    ) -> CodebookChange:
        """Edit ``edit_id`` into entry ``entry_id``: a new entry, or a retrain of one with the same answer."""
        return self._apply_checked(
            edit_id, entry_id, key, value, answer, subject, gate, self._checked_trail(edit_id, trail)
        )

    def _apply_checked(self, edit_id, entry_id, key, value, answer, subject, gate, trail) -> CodebookChange:
        """``apply_version`` of a trail already checked (``_checked_trail``)."""
        if not self.codebook.has_entry(entry_id):
            change = self.codebook.add(edit_id, key, value, answer, entry_id=entry_id)
        elif self.codebook.entry(entry_id).answer != tuple(answer):
            raise CorruptStateError(f"edit {edit_id} retrains entry {entry_id} with another answer")
        else:
            change = self.codebook.retrain(edit_id, entry_id, key, value)
        self.router.apply([change])
        self._own(edit_id, subject, gate, trail)
        return change

    def apply_versions(
        self,
        edit_ids: Sequence[int],
        entry_ids: Sequence[int],
        keys: torch.Tensor,
        values: torch.Tensor,
        answers: Sequence[Sequence[int]],
        subjects: Sequence[str] | None = None,
        gates: Sequence[torch.Tensor | None] | None = None,
        trails: Sequence[torch.Tensor | None] | None = None,
    ) -> list[CodebookChange]:
        """``apply_version`` of many edits, in order: each run of edits that create entries goes into
        the codebook at once (``Codebook.add_many``), retrains one by one."""
        subjects = list(subjects) if subjects is not None else [""] * len(edit_ids)
        gates = list(gates) if gates is not None else [None] * len(edit_ids)
        # every trail checked before anything changes
        trails = [self._checked_trail(e, t) for e, t in zip(edit_ids, trails or [None] * len(edit_ids))]
        changes: list[CodebookChange] = []
        run: list[int] = []  # positions of consecutive edits creating entries, not yet added
        created: set[int] = set()

        def flush() -> None:
            if run:
                pick = torch.tensor(run)
                added = self.codebook.add_many(
                    [edit_ids[i] for i in run],
                    keys[pick],
                    values[pick],
                    [answers[i] for i in run],
                    [entry_ids[i] for i in run],
                )
                self.router.apply(added)
                changes.extend(added)
                for i in run:
                    self._own(edit_ids[i], subjects[i], gates[i], trails[i])
                run.clear()

        for i, entry_id in enumerate(entry_ids):
            if entry_id in created or self.codebook.has_entry(entry_id):
                flush()
                changes.append(
                    self._apply_checked(
                        edit_ids[i], entry_id, keys[i], values[i], answers[i], subjects[i], gates[i], trails[i]
                    )
                )
            else:
                run.append(i)
                created.add(entry_id)
        flush()
        return changes

    def save(self, path, identity: dict[str, str], config: dict) -> None:
        live = {str(e): self.subjects[e] for e in self.codebook.edit_ids() if self.subjects.get(e)}
        meta = {**identity, "config": _json(config), "subjects": _json(live)}
        gated = [e for e in self.codebook.edit_ids() if e in self.gates]
        extra = {}
        if gated:
            extra = {
                "gate_edit_ids": torch.tensor(gated, dtype=torch.long),
                "gate_vectors": torch.stack([self.gates[e].cpu() for e in gated]),
            }
        trailed = [e for e in self.codebook.edit_ids() if e in self.trails]
        if trailed:  # every trail's rows one after another, and how many each has
            extra["trail_edit_ids"] = torch.tensor(trailed, dtype=torch.long)
            extra["trail_rows"] = torch.tensor([len(self.trails[e]) for e in trailed], dtype=torch.long)
            extra["trail_vectors"] = torch.cat([self.trails[e].cpu() for e in trailed])
        self.codebook.save(path, metadata=meta, extra=extra)

    @staticmethod
    def read_metadata(path, identity: dict[str, str]) -> dict[str, str]:
        """A saved file's metadata, checked against ``identity`` (what the file must match)."""
        try:
            meta = Codebook.read_metadata(path)
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise CorruptStateError(f"cannot read codebook file {path}: {exc}") from exc
        for k, v in identity.items():
            if meta.get(k) != v:
                raise CorruptStateError(f"codebook belongs to another {k}: {meta.get(k)!r} != {v!r}")
        return meta

    def load(self, path, meta: dict[str, str]) -> None:
        """Replace every edit with those saved at ``path`` (``meta``: its ``read_metadata``)."""
        self.codebook.load(path)
        self.subjects = {int(k): v for k, v in json.loads(meta.get("subjects", "{}")).items()}
        self.gates, self.trails = {}, {}
        with safe_open(str(path), framework="pt") as f:
            if "gate_edit_ids" in f.keys():
                vectors = f.get_tensor("gate_vectors")
                for i, e in enumerate(f.get_tensor("gate_edit_ids").tolist()):
                    self._set_relation(e, vectors[i])
            if "trail_edit_ids" in f.keys():
                rows, vectors = f.get_tensor("trail_rows").tolist(), f.get_tensor("trail_vectors")
                if sum(rows) != len(vectors) or min(rows) < 1:
                    raise CorruptStateError("codebook file's trails do not add up")
                for e, part in zip(f.get_tensor("trail_edit_ids").tolist(), vectors.split(rows)):
                    self.trails[e] = self._checked_trail(e, part)
        self.next_edit_id = max(self.codebook.edit_ids(), default=0) + 1
        self.router.reloaded()


def _json(d: dict) -> str:
    return json.dumps(d, sort_keys=True)
