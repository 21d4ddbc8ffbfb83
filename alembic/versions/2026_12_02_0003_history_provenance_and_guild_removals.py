"""Where each history turn came from, removed servers awaiting deletion, and a thread's parent channel.

Prompts with a history recorded before this revision have no provenance: nothing says whose words
their quoted turns were, so they are marked not trainable (no guessed backfill). Prompts without a
history quote nobody and keep their flag. Downgrading drops the provenance; it cannot give those
prompts their flag back.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 09:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "history_turns",
        sa.Column("prompt_id", RowId, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("source_prompt_id", RowId, nullable=True),
        sa.Column("source_response_id", RowId, nullable=True),
        sa.Column("author_id", sa.BigInteger(), nullable=True),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("fk_history_turns_prompt_id_prompts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["source_prompt_id"],
            ["prompts.id"],
            name=op.f("fk_history_turns_source_prompt_id_prompts"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["source_response_id"],
            ["responses.id"],
            name=op.f("fk_history_turns_source_response_id_responses"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("prompt_id", "position", name=op.f("pk_history_turns")),
    )
    op.create_index(op.f("ix_history_turns_source_prompt_id"), "history_turns", ["source_prompt_id"])
    op.create_index(op.f("ix_history_turns_source_response_id"), "history_turns", ["source_response_id"])
    op.create_index(op.f("ix_history_turns_author_id"), "history_turns", ["author_id"])

    op.create_table(
        "guild_removals",
        sa.Column("guild_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("removed_at", Timestamp, nullable=False),
        sa.Column("delete_after", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("guild_id", name=op.f("pk_guild_removals")),
    )

    with op.batch_alter_table("prompts") as batch:
        batch.add_column(sa.Column("parent_channel_id", sa.BigInteger(), nullable=True))

    # Recorded before provenance: whose words the history quotes is unknown, so it never trains.
    op.execute(
        sa.text(
            "UPDATE prompts SET trainable = :no WHERE trainable = :yes AND CAST(history AS TEXT) <> '[]'"
        ).bindparams(no=False, yes=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("prompts") as batch:
        batch.drop_column("parent_channel_id")
    op.drop_table("guild_removals")
    op.drop_index(op.f("ix_history_turns_author_id"), table_name="history_turns")
    op.drop_index(op.f("ix_history_turns_source_response_id"), table_name="history_turns")
    op.drop_index(op.f("ix_history_turns_source_prompt_id"), table_name="history_turns")
    op.drop_table("history_turns")
