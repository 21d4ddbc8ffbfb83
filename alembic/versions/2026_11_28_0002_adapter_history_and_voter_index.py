"""Adapter history table, and an index on reactions by voter (forget-me, opt-out, pair building).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 07:10:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "adapter_versions",
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("run_id", RowId, nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("promoted_at", Timestamp, nullable=True),
        sa.Column("rolled_back_at", Timestamp, nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["training_runs.id"],
            name=op.f("fk_adapter_versions_run_id_training_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_adapter_versions")),
    )
    op.create_index(op.f("ix_adapter_versions_run_id"), "adapter_versions", ["run_id"])

    # Runs that finished before this revision produced versions: their history starts here.
    op.execute(
        """
        INSERT INTO adapter_versions (version, status, run_id, metrics, created_at)
        SELECT adapter_version, 'candidate', id, metrics, COALESCE(finished_at, started_at)
        FROM training_runs
        WHERE adapter_version IS NOT NULL
          AND id IN (SELECT MAX(id) FROM training_runs WHERE adapter_version IS NOT NULL GROUP BY adapter_version)
        """
    )
    op.create_index("ix_reactions_user_id", "reactions", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_reactions_user_id", table_name="reactions")
    op.drop_table("adapter_versions")
