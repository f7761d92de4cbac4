"""bulk imports: one row per import and one per fact, with the edit each fact became

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB


revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "imports",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("codebook_id", sa.Integer(), sa.ForeignKey("codebooks.id", name=op.f("fk_imports_codebook_id_codebooks")), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.String(255), nullable=True),
        sa.Column("cancelled_by", sa.String(255), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name=op.f("ck_imports_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_imports")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_imports_codebook_id_status"), "imports", ["codebook_id", "status"])
    op.create_table(
        "import_items",
        sa.Column("import_id", sa.Integer(), sa.ForeignKey("imports.id", name=op.f("fk_import_items_import_id_imports")), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("metadata", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("format", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("edit_id", sa.Integer(), sa.ForeignKey("edits.id", name=op.f("fk_import_items_edit_id_edits")), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'done', 'failed')", name=op.f("ck_import_items_status")),
        sa.PrimaryKeyConstraint("import_id", "line", name=op.f("pk_import_items")),
    )
    op.create_index(op.f("ix_import_items_import_id_status"), "import_items", ["import_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_import_items_import_id_status", "import_items")
    op.drop_table("import_items")
    op.drop_index("ix_imports_codebook_id_status", "imports")
    op.drop_table("imports")
