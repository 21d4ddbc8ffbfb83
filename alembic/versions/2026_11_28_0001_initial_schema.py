"""Initial schema: prompts, images, responses and their messages, reactions, consent, training runs.

Revision ID: 0001
Revises:
Create Date: 2026-11-28 06:24:18+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# INTEGER PRIMARY KEY is SQLite's autoincrementing rowid alias; BIGINT elsewhere.
RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "guild_settings",
        sa.Column("guild_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("learning", sa.Boolean(), nullable=False),
        sa.Column("voter_role_id", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("guild_id", name=op.f("pk_guild_settings")),
    )
    op.create_table(
        "images",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("mime", sa.String(length=32), nullable=False),
        sa.Column("suffix", sa.String(length=8), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_images")),
    )
    op.create_table(
        "opted_out_users",
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("since", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_opted_out_users")),
    )
    op.create_table(
        "prompts",
        sa.Column("id", RowId, nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("author_id", sa.BigInteger(), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("history", sa.JSON(), nullable=False),
        sa.Column("trainable", sa.Boolean(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompts")),
        sa.UniqueConstraint("message_id", name=op.f("uq_prompts_message_id")),
    )
    op.create_index(op.f("ix_prompts_author_id"), "prompts", ["author_id"])
    op.create_index(op.f("ix_prompts_created_at"), "prompts", ["created_at"])
    op.create_index(op.f("ix_prompts_guild_id"), "prompts", ["guild_id"])
    op.create_index(op.f("ix_prompts_key"), "prompts", ["key"])

    op.create_table(
        "training_runs",
        sa.Column("id", RowId, nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.Column("adapter_version", sa.String(length=32), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )
    op.create_table(
        "prompt_images",
        sa.Column("prompt_id", RowId, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("image_sha256", sa.String(length=64), nullable=False),
        sa.Column("in_history", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_sha256"], ["images.sha256"], name=op.f("fk_prompt_images_image_sha256_images")
        ),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompts.id"],
            name=op.f("fk_prompt_images_prompt_id_prompts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("prompt_id", "position", name=op.f("pk_prompt_images")),
    )
    op.create_index(op.f("ix_prompt_images_image_sha256"), "prompt_images", ["image_sha256"])

    op.create_table(
        "responses",
        sa.Column("id", RowId, nullable=False),
        sa.Column("prompt_id", RowId, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("adapter_version", sa.String(length=64), nullable=True),
        sa.Column("sampling", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("requested_by", sa.BigInteger(), nullable=True),
        sa.Column("regenerated", sa.Boolean(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("fk_responses_prompt_id_prompts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_responses")),
    )
    op.create_index(op.f("ix_responses_prompt_id"), "responses", ["prompt_id"])
    op.create_index(op.f("ix_responses_requested_by"), "responses", ["requested_by"])

    op.create_table(
        "follow_ups",
        sa.Column("prompt_id", RowId, nullable=False),
        sa.Column("parent_response_id", RowId, nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_response_id"],
            ["responses.id"],
            name=op.f("fk_follow_ups_parent_response_id_responses"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("fk_follow_ups_prompt_id_prompts"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("prompt_id", name=op.f("pk_follow_ups")),
    )
    op.create_index(op.f("ix_follow_ups_parent_response_id"), "follow_ups", ["parent_response_id"])

    op.create_table(
        "reactions",
        sa.Column("response_id", RowId, nullable=False),
        sa.Column("user_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("emoji", sa.String(length=16), nullable=False),
        sa.Column("voter_role_id", sa.BigInteger(), nullable=True),
        sa.Column("holds_voter_role", sa.Boolean(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.ForeignKeyConstraint(
            ["response_id"],
            ["responses.id"],
            name=op.f("fk_reactions_response_id_responses"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("response_id", "user_id", "emoji", name=op.f("pk_reactions")),
    )
    op.create_table(
        "response_messages",
        sa.Column("message_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("response_id", RowId, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["response_id"],
            ["responses.id"],
            name=op.f("fk_response_messages_response_id_responses"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_response_messages")),
    )
    op.create_index(op.f("ix_response_messages_response_id"), "response_messages", ["response_id"])

    op.create_table(
        "training_run_pairs",
        sa.Column("id", RowId, nullable=False),
        sa.Column("run_id", RowId, nullable=False),
        sa.Column("chosen_response_id", RowId, nullable=True),
        sa.Column("rejected_response_id", RowId, nullable=True),
        sa.Column("heldout", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["chosen_response_id"],
            ["responses.id"],
            name=op.f("fk_training_run_pairs_chosen_response_id_responses"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rejected_response_id"],
            ["responses.id"],
            name=op.f("fk_training_run_pairs_rejected_response_id_responses"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["training_runs.id"],
            name=op.f("fk_training_run_pairs_run_id_training_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_run_pairs")),
    )
    op.create_index(
        op.f("ix_training_run_pairs_chosen_response_id"), "training_run_pairs", ["chosen_response_id"]
    )
    op.create_index(
        op.f("ix_training_run_pairs_rejected_response_id"), "training_run_pairs", ["rejected_response_id"]
    )
    op.create_index(op.f("ix_training_run_pairs_run_id"), "training_run_pairs", ["run_id"])


def downgrade() -> None:
    # children first; dropping a table drops its indexes
    for table in (
        "training_run_pairs",
        "response_messages",
        "reactions",
        "follow_ups",
        "responses",
        "prompt_images",
        "training_runs",
        "prompts",
        "opted_out_users",
        "images",
        "guild_settings",
    ):
        op.drop_table(table)
