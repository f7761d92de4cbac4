"""Tables of the service. A codebook is one model + layer; every other row belongs to one codebook.

`edits` is the log of edits (its id is both their global order and the HoReN edit id),
`codebook_entries` holds one optimistic-concurrency version per entry, `events` is the
replication log that replicas read in id order (each with who caused it, the audit trail),
`api_keys` holds keys made through the admin routes, by sha256 only, and `imports` /
`import_items` hold bulk imports: every fact of one, and the edit it became once committed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

EDIT_ACTIVE = "active"
EDIT_ROLLED_BACK = "rolled_back"
EVENT_EDIT = "edit"
EVENT_ROLLBACK = "rollback"
IMPORT_STATUSES = ("queued", "running", "done", "failed", "cancelled")
ITEM_PENDING, ITEM_DONE, ITEM_FAILED = "pending", "done", "failed"
ROLES = ("read", "edit", "admin")  # each role may do what the ones before it may

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no offset and returns naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; pass a timezone-aware one")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Codebook(Base):
    __tablename__ = "codebooks"
    __table_args__ = (UniqueConstraint("model_fingerprint", "module_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    module_path: Mapped[str] = mapped_column(String(255))
    key_dim: Mapped[int] = mapped_column(Integer)
    value_dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Edit(Base):
    __tablename__ = "edits"
    __table_args__ = (
        Index(None, "codebook_id", "status"),
        CheckConstraint(f"status IN ('{EDIT_ACTIVE}', '{EDIT_ROLLED_BACK}')", name="status"),
        {"sqlite_autoincrement": True},  # ids are never reused: they are HoReN edit ids
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    codebook_id: Mapped[int] = mapped_column(ForeignKey("codebooks.id"))
    prompt: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=EDIT_ACTIVE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    rolled_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    rolled_back_by: Mapped[str | None] = mapped_column(String(255))
    created_by: Mapped[str | None] = mapped_column(String(255))  # the API key's name; None when open
    # the name a prompt must mention to be routed to this edit; "" or None (edits older than it) = any
    subject: Mapped[str | None] = mapped_column(Text)
    entry_id: Mapped[int] = mapped_column(Integer)  # a created entry's id is the creating edit's id
    created_entry: Mapped[bool]
    steps: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(Float)
    train_ms: Mapped[float] = mapped_column(Float)
    answer_ids: Mapped[list[int]] = mapped_column(JSONType)
    key: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian query vector
    value: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian value vector
    # float32 relation vector (horen_core.gate); None: the edit is not relation-gated
    gate: Mapped[bytes | None] = mapped_column(LargeBinary)
    # float32 [m, value_dim] values at a long-form answer's tokens (horen_core.training); None: none
    trail: Mapped[bytes | None] = mapped_column(LargeBinary)

    def __repr__(self) -> str:
        return f"Edit(id={self.id}, codebook_id={self.codebook_id}, entry_id={self.entry_id}, status={self.status!r})"


class Entry(Base):
    __tablename__ = "codebook_entries"

    codebook_id: Mapped[int] = mapped_column(ForeignKey("codebooks.id"), primary_key=True, autoincrement=False)
    entry_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    answer_ids: Mapped[list[int]] = mapped_column(JSONType)
    version: Mapped[int] = mapped_column(Integer, default=1)  # bumped by every retrain and rollback touching it
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        Index(None, "codebook_id", "id"),  # replicas read (codebook_id, id > last seen)
        CheckConstraint(f"kind IN ('{EVENT_EDIT}', '{EVENT_ROLLBACK}')", name="kind"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    codebook_id: Mapped[int] = mapped_column(ForeignKey("codebooks.id"))
    kind: Mapped[str] = mapped_column(String(16))
    edit_id: Mapped[int] = mapped_column(ForeignKey("edits.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str | None] = mapped_column(String(255))  # the API key's name; None when open


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(f"role IN {ROLES!r}", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)  # hex digest; the key is never stored
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(255))


class Import(Base):
    __tablename__ = "imports"
    __table_args__ = (
        Index(None, "codebook_id", "status"),
        CheckConstraint(f"status IN {IMPORT_STATUSES!r}", name="status"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    codebook_id: Mapped[int] = mapped_column(ForeignKey("codebooks.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_by: Mapped[str | None] = mapped_column(String(255))
    cancelled_by: Mapped[str | None] = mapped_column(String(255))


class ImportItem(Base):
    __tablename__ = "import_items"
    __table_args__ = (
        Index(None, "import_id", "status"),
        CheckConstraint(f"status IN ('{ITEM_PENDING}', '{ITEM_DONE}', '{ITEM_FAILED}')", name="status"),
    )

    import_id: Mapped[int] = mapped_column(ForeignKey("imports.id"), primary_key=True, autoincrement=False)
    line: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # 1-based, in the upload
    prompt: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    subject: Mapped[str | None] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(8), default="auto")
    status: Mapped[str] = mapped_column(String(16), default=ITEM_PENDING)
    edit_id: Mapped[int | None] = mapped_column(ForeignKey("edits.id"))  # set in the edit's own transaction
    error: Mapped[str | None] = mapped_column(Text)
