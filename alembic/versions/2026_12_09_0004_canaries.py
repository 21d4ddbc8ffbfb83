"""Canaries: each candidate served to a share of users beside current, and the decision with its numbers.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 09:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "canaries",
        sa.Column("id", RowId, nullable=False),
        sa.Column("candidate_version", sa.String(length=32), nullable=False),
        sa.Column("current_version", sa.String(length=32), nullable=True),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("decided_at", Timestamp, nullable=True),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("rule", sa.String(length=16), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=True),
        sa.Column("decided_by", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_canaries")),
    )


def downgrade() -> None:
    op.drop_table("canaries")
