"""stage_runs.batch_size: how many stage runs shared one forward pass

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 23:55:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("stage_runs") as batch_op:
        batch_op.add_column(sa.Column("batch_size", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stage_runs") as batch_op:
        batch_op.drop_column("batch_size")
