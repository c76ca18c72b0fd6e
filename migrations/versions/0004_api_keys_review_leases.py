"""api_keys, review_leases, and an index for the review queue (HTTP API and console)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 03:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.types import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_keys_token_sha256")),
    )
    op.create_table(
        "review_leases",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("reviewer", sa.String(length=128), nullable=False),
        sa.Column("taken_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_review_leases_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_review_leases")),
    )
    op.create_index(op.f("ix_review_leases_reviewer"), "review_leases", ["reviewer"], unique=False)
    op.create_index("ix_jobs_verdict_finished", "jobs", ["verdict", "finished_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_verdict_finished", table_name="jobs")
    op.drop_index(op.f("ix_review_leases_reviewer"), table_name="review_leases")
    op.drop_table("review_leases")
    op.drop_table("api_keys")
