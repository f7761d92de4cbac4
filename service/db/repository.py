"""Queries of the service. Every function takes a `Session` and never commits: the caller owns the
transaction, so an edit row, its entry version and its event commit together or not at all.

Writers call `serialize_commit_lock` first (the write functions here also take it): it makes
concurrent writers, also in other processes, commit their events in id order, so a replica that
reads events with id > the last one it saw never skips one that commits late.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Row, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from horen_core.errors import UnknownEditError
from service.db.errors import EntryConflict
from service.db.models import (
    EDIT_ACTIVE,
    EDIT_ROLLED_BACK,
    EVENT_EDIT,
    EVENT_ROLLBACK,
    ApiKey,
    Codebook,
    Edit,
    Entry,
    Event,
    utcnow,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "EntryConflict",
    "active_edit_vectors",
    "any_api_key",
    "api_key_by_sha256",
    "audit_events",
    "bytes_to_matrix",
    "bytes_to_tensor",
    "count_active_edits",
    "create_api_key",
    "delete_api_key",
    "entry_version",
    "events_after",
    "get_edit",
    "get_or_create_codebook",
    "insert_edit",
    "last_event_id",
    "list_api_keys",
    "list_edits",
    "rollback_edit",
    "serialize_commit_lock",
    "tensor_to_bytes",
]

# Key of the PostgreSQL advisory lock that orders commits of edits and rollbacks ("HoReN" in ASCII).
COMMIT_LOCK_KEY = 0x486F52654E


def serialize_commit_lock(session: Session) -> None:
    """Take the write lock for the rest of this transaction.

    PostgreSQL: a transaction-scoped advisory lock (released by commit or rollback). SQLite: the
    database write lock (BEGIN IMMEDIATE), taken now rather than at the first write, so reads that
    follow see every earlier commit; nothing happens when this transaction already writes.
    """
    conn = session.connection()
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({COMMIT_LOCK_KEY})")
    elif dialect == "sqlite":
        dbapi_conn = conn.connection.dbapi_connection
        if dbapi_conn is not None and not dbapi_conn.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


# ---- codebooks ------------------------------------------------------------------------------
def get_or_create_codebook(
    session: Session, fingerprint: str, module_path: str, key_dim: int, value_dim: int
) -> Codebook:
    """The codebook of this model + layer, created on first use. Dimensions must match a stored one."""
    stmt = select(Codebook).where(Codebook.model_fingerprint == fingerprint, Codebook.module_path == module_path)
    cb = session.scalars(stmt).one_or_none()
    if cb is None:
        serialize_commit_lock(session)  # another process may be creating it; look again once we hold the lock
        cb = session.scalars(stmt).one_or_none()
    if cb is None:
        cb = Codebook(model_fingerprint=fingerprint, module_path=module_path, key_dim=key_dim, value_dim=value_dim)
        session.add(cb)
        session.flush()
    if (cb.key_dim, cb.value_dim) != (key_dim, value_dim):
        raise ValueError(
            f"codebook {cb.id} of {module_path} has dims {cb.key_dim}x{cb.value_dim}, not {key_dim}x{value_dim}"
        )
    return cb


# ---- edits ----------------------------------------------------------------------------------
def insert_edit(
    session: Session,
    codebook_id: int,
    *,
    prompt: str,
    target: str,
    metadata: dict[str, Any] | None,
    entry_id: int | None,
    created_entry: bool,
    steps: int,
    loss: float,
    train_ms: float,
    answer_ids: Sequence[int],
    key: bytes,
    value: bytes,
    expected_entry_version: int | None,
    created_by: str | None = None,
    subject: str = "",
    gate: bytes | None = None,
    trail: bytes | None = None,
) -> Edit:
    """Store one edit, create or bump its entry, and append an "edit" event; ``created_by`` (the
    API key's name) is the edit's and the event's actor.

    ``entry_id=None`` creates a new entry whose id is the new edit's id (version 1). Otherwise the
    edit retrains ``entry_id``: its version must still be ``expected_entry_version`` (any version
    when None, but the entry must exist), else `EntryConflict` is raised and nothing is written.
    A non-finite ``loss`` or ``train_ms`` raises ValueError (SQLite would store NaN as NULL).
    """
    if not (math.isfinite(loss) and math.isfinite(train_ms)):
        raise ValueError(f"loss and train_ms must be finite, got {loss!r} and {train_ms!r}")
    serialize_commit_lock(session)
    now = utcnow()
    if entry_id is not None:
        cond = [Entry.codebook_id == codebook_id, Entry.entry_id == entry_id]
        if expected_entry_version is not None:
            cond.append(Entry.version == expected_entry_version)
        bumped = session.execute(
            update(Entry).where(*cond).values(version=Entry.version + 1, updated_at=now),
            execution_options={"synchronize_session": False},
        )
        if bumped.rowcount != 1:
            raise EntryConflict(
                f"entry {entry_id} of codebook {codebook_id} is not at version {expected_entry_version} any more"
            )
    edit = Edit(
        codebook_id=codebook_id,
        prompt=prompt,
        target=target,
        metadata_=dict(metadata or {}),
        status=EDIT_ACTIVE,
        created_at=now,
        entry_id=entry_id if entry_id is not None else 0,  # a new entry takes the edit's id, known after flush
        created_entry=created_entry,
        steps=int(steps),
        loss=float(loss),
        train_ms=float(train_ms),
        answer_ids=[int(t) for t in answer_ids],
        key=bytes(key),
        value=bytes(value),
        created_by=created_by,
        subject=subject,
        gate=bytes(gate) if gate is not None else None,
        trail=bytes(trail) if trail is not None else None,
    )
    session.add(edit)
    session.flush()
    if entry_id is None:
        edit.entry_id = edit.id
        session.add(
            Entry(
                codebook_id=codebook_id, entry_id=edit.id, answer_ids=list(edit.answer_ids), version=1, updated_at=now
            )
        )
    session.add(Event(codebook_id=codebook_id, kind=EVENT_EDIT, edit_id=edit.id, created_at=now, actor=created_by))
    session.flush()
    return edit


def rollback_edit(session: Session, edit_id: int, by: str | None) -> tuple[Edit, bool]:
    """Mark an edit rolled back, bump its entry's version and append a "rollback" event (``by``,
    the API key's name, is its actor).

    Idempotent: for an edit already rolled back it returns ``(edit, False)`` and writes nothing.
    Raises ``UnknownEditError`` for an unknown id.
    """
    serialize_commit_lock(session)
    now = utcnow()
    changed = session.execute(
        update(Edit)
        .where(Edit.id == edit_id, Edit.status == EDIT_ACTIVE)
        .values(status=EDIT_ROLLED_BACK, rolled_back_at=now, rolled_back_by=by),
        execution_options={"synchronize_session": False},
    )
    edit = session.get(Edit, edit_id, populate_existing=True)
    if edit is None:
        raise UnknownEditError(f"no edit with id {edit_id}")
    if changed.rowcount != 1:
        return edit, False
    session.execute(
        update(Entry)
        .where(Entry.codebook_id == edit.codebook_id, Entry.entry_id == edit.entry_id)
        .values(version=Entry.version + 1, updated_at=now),
        execution_options={"synchronize_session": False},
    )
    session.add(Event(codebook_id=edit.codebook_id, kind=EVENT_ROLLBACK, edit_id=edit.id, created_at=now, actor=by))
    session.flush()
    return edit, True


def get_edit(session: Session, edit_id: int) -> Edit | None:
    return session.get(Edit, edit_id)


def codebook_edit(session: Session, codebook_id: int, edit_id: int) -> Edit:
    """The edit ``edit_id`` of this codebook; ``UnknownEditError`` when there is none."""
    edit = session.get(Edit, edit_id)
    if edit is None or edit.codebook_id != codebook_id:
        raise UnknownEditError(f"no edit with id {edit_id}")
    return edit


def list_edits(
    session: Session,
    codebook_id: int,
    limit: int = 50,
    offset: int = 0,
    status: str | None = None,
    q: str | None = None,
) -> tuple[list[Edit], int]:
    """One page of a codebook's edits in id order, and how many match in all.

    ``status`` filters on "active" / "rolled_back"; ``q`` is a case-insensitive substring of the
    prompt or the target (``%`` and ``_`` in it are literal).
    """
    cond = [Edit.codebook_id == codebook_id]
    if status is not None:
        cond.append(Edit.status == status)
    if q:
        cond.append(or_(Edit.prompt.icontains(q, autoescape=True), Edit.target.icontains(q, autoescape=True)))
    total = session.scalar(select(func.count()).select_from(Edit).where(*cond)) or 0
    items = session.scalars(select(Edit).where(*cond).order_by(Edit.id).limit(limit).offset(offset)).all()
    return list(items), int(total)


def _active_in(codebook_id: int) -> tuple[Any, ...]:
    """The conditions that select a codebook's active edits."""
    return (Edit.codebook_id == codebook_id, Edit.status == EDIT_ACTIVE)


def count_active_edits(session: Session, codebook_id: int) -> int:
    stmt = select(func.count()).select_from(Edit).where(*_active_in(codebook_id))
    return int(session.scalar(stmt) or 0)


def active_edit_vectors(session: Session, codebook_id: int, chunk: int = 4096) -> Iterator[Sequence[Row]]:
    """What replaying the active edits needs (``id``, ``entry_id``, ``answer_ids``, ``key``,
    ``value``, ``subject``, ``gate``, ``trail``), in id order, ``chunk`` rows at a time: plain rows, no ORM objects, so that a replay
    of many edits neither builds nor holds them all."""
    stmt = (
        select(Edit.id, Edit.entry_id, Edit.answer_ids, Edit.key, Edit.value, Edit.subject, Edit.gate, Edit.trail)
        .where(*_active_in(codebook_id))
        .order_by(Edit.id)
        .execution_options(yield_per=chunk)
    )
    yield from session.execute(stmt).partitions()


# ---- entries and events ---------------------------------------------------------------------
def entry_version(session: Session, codebook_id: int, entry_id: int) -> int | None:
    stmt = select(Entry.version).where(Entry.codebook_id == codebook_id, Entry.entry_id == entry_id)
    return session.scalar(stmt)


def events_after(session: Session, codebook_id: int, after_id: int, limit: int = 1000) -> list[Row]:
    """The next events of a codebook in id order, as plain rows (``id``, ``codebook_id``, ``kind``,
    ``edit_id``): a replay reads every event of the log (100,000 events: 0.57 s so, 3.3 s as ORM objects)."""
    stmt = (
        select(Event.id, Event.codebook_id, Event.kind, Event.edit_id)
        .where(Event.codebook_id == codebook_id, Event.id > after_id)
        .order_by(Event.id)
        .limit(limit)
    )
    return list(session.execute(stmt).all())


def last_event_id(session: Session, codebook_id: int) -> int:
    """Id of the newest event of a codebook, 0 when there is none."""
    return int(session.scalar(select(func.coalesce(func.max(Event.id), 0)).where(Event.codebook_id == codebook_id)))


def audit_events(
    session: Session,
    codebook_id: int,
    *,
    actor: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Row], int]:
    """One page of a codebook's edits and rollbacks, newest first, and how many match in all: rows
    of (``id``, ``kind``, ``edit_id``, ``actor``, ``created_at``, ``prompt``, ``target``). ``since``
    is inclusive, ``until`` exclusive."""
    cond = [Event.codebook_id == codebook_id]
    if actor is not None:
        cond.append(Event.actor == actor)
    if kind is not None:
        cond.append(Event.kind == kind)
    if since is not None:
        cond.append(Event.created_at >= since)
    if until is not None:
        cond.append(Event.created_at < until)
    total = session.scalar(select(func.count()).select_from(Event).where(*cond)) or 0
    stmt = (
        select(Event.id, Event.kind, Event.edit_id, Event.actor, Event.created_at, Edit.prompt, Edit.target)
        .join(Edit, Edit.id == Event.edit_id)
        .where(*cond)
        .order_by(Event.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(session.execute(stmt).all()), int(total)


# ---- API keys -------------------------------------------------------------------------------
def create_api_key(session: Session, name: str, key_sha256: str, role: str, created_by: str | None) -> ApiKey:
    """Store a key by its hex sha256 (the key itself is never stored). A taken name or digest
    raises ``sqlalchemy.exc.IntegrityError`` at the flush."""
    row = ApiKey(name=name, key_sha256=key_sha256, role=role, created_at=utcnow(), created_by=created_by)
    session.add(row)
    session.flush()
    return row


def api_key_by_sha256(session: Session, key_sha256: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.key_sha256 == key_sha256)).one_or_none()


def any_api_key(session: Session) -> bool:
    return bool(session.scalar(select(exists().where(ApiKey.id.is_not(None)))))


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)).all())


def delete_api_key(session: Session, key_id: int) -> bool:
    """Delete one stored key; False when there is none with that id."""
    return session.execute(delete(ApiKey).where(ApiKey.id == key_id)).rowcount == 1


# ---- vectors --------------------------------------------------------------------------------
def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """A vector as float32 little-endian bytes (any shape is flattened)."""
    arr = t.detach().to(device="cpu").reshape(-1).float().numpy()
    return arr.astype("<f4", copy=False).tobytes()


def bytes_to_matrix(blobs: Sequence[bytes], dim: int) -> torch.Tensor:
    """[len(blobs), dim] float32 of vectors stored by `tensor_to_bytes` (a new, writable tensor)."""
    import numpy as np
    import torch

    for b in blobs:
        if len(b) != 4 * dim:
            raise ValueError(f"vector has {len(b)} bytes, expected {4 * dim} for {dim} float32 values")
    flat = np.frombuffer(b"".join(blobs), dtype="<f4").astype(np.float32)
    return torch.from_numpy(flat.reshape(len(blobs), dim))


def optional_vector(b: bytes | None) -> torch.Tensor | None:
    """The float32 vector stored by `tensor_to_bytes` (its length read from the bytes), or None."""
    return None if b is None else bytes_to_matrix([b], len(b) // 4)[0]


def optional_rows(b: bytes | None, dim: int) -> torch.Tensor | None:
    """The float32 [m, dim] matrix stored by `tensor_to_bytes`, or None."""
    if b is None:
        return None
    if not b or len(b) % (4 * dim):
        raise ValueError(f"matrix has {len(b)} bytes, not a whole number of {dim}-float32 rows")
    return bytes_to_matrix([b], len(b) // 4)[0].reshape(-1, dim)


def bytes_to_tensor(b: bytes, dim: int) -> torch.Tensor:
    """The float32 vector of ``dim`` elements stored by `tensor_to_bytes` (a new, writable tensor)."""
    return bytes_to_matrix([b], dim)[0]
