"""each long-form edit's values at its answer's tokens (horen_core.training: its trail), float32
[m, value_dim]; NULL for every other edit

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("edits") as batch:
        batch.add_column(sa.Column("trail", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("edits") as batch:
        batch.drop_column("trail")
