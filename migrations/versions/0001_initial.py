"""initial schema: codebooks, edits, codebook_entries, events

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "codebooks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("module_path", sa.String(length=255), nullable=False),
        sa.Column("key_dim", sa.Integer(), nullable=False),
        sa.Column("value_dim", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_codebooks")),
        sa.UniqueConstraint(
            "model_fingerprint", "module_path", name=op.f("uq_codebooks_model_fingerprint_module_path")
        ),
    )
    op.create_table(
        "edits",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("codebook_id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("metadata", JSONType, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rolled_back_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rolled_back_by", sa.String(length=255), nullable=True),
        sa.Column("entry_id", sa.Integer(), nullable=False),
        sa.Column("created_entry", sa.Boolean(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=False),
        sa.Column("train_ms", sa.Float(), nullable=False),
        sa.Column("answer_ids", JSONType, nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("status IN ('active', 'rolled_back')", name=op.f("ck_edits_status")),
        sa.ForeignKeyConstraint(["codebook_id"], ["codebooks.id"], name=op.f("fk_edits_codebook_id_codebooks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_edits")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_edits_codebook_id_status"), "edits", ["codebook_id", "status"], unique=False)
    op.create_table(
        "codebook_entries",
        sa.Column("codebook_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("entry_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("answer_ids", JSONType, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["codebook_id"], ["codebooks.id"], name=op.f("fk_codebook_entries_codebook_id_codebooks")
        ),
        sa.PrimaryKeyConstraint("codebook_id", "entry_id", name=op.f("pk_codebook_entries")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("codebook_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("edit_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('edit', 'rollback')", name=op.f("ck_events_kind")),
        sa.ForeignKeyConstraint(["codebook_id"], ["codebooks.id"], name=op.f("fk_events_codebook_id_codebooks")),
        sa.ForeignKeyConstraint(["edit_id"], ["edits.id"], name=op.f("fk_events_edit_id_edits")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_events_codebook_id_id"), "events", ["codebook_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_events_codebook_id_id"), table_name="events")
    op.drop_table("events")
    op.drop_table("codebook_entries")
    op.drop_index(op.f("ix_edits_codebook_id_status"), table_name="edits")
    op.drop_table("edits")
    op.drop_table("codebooks")
