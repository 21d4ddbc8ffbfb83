"""The feedback store's tables: prompts, images, responses, reactions, consent, training runs, adapters, canaries.

Ids of Discord objects (guilds, channels, messages, users, roles) are snowflakes: 64-bit, so
`BigInteger`. Every foreign key deletes with its parent (`ON DELETE CASCADE`), except three: an
image, which a prompt only borrows (the service deletes images, rows and files, once no prompt
uses them), an adapter version's training run (`SET NULL`: the history outlives the run), and a
history turn's source (`SET NULL`: the service deletes the quoting prompt itself; a source lost
any other way leaves an unknown source, which keeps the quoting prompt out of training).
The service also deletes children explicitly, so a connection without foreign keys enforced (the
sqlite3 shell) cannot leave orphans behind through it either.

Timestamps are UTC and come back timezone-aware on every backend (`UTCDateTime`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "AdapterVersion",
    "Base",
    "CanaryRollout",
    "FollowUp",
    "GuildRemoval",
    "GuildSettings",
    "HistoryTurn",
    "Image",
    "OptedOutUser",
    "Prompt",
    "PromptImage",
    "Reaction",
    "Response",
    "ResponseMessage",
    "TrainingRun",
    "TrainingRunPair",
    "utcnow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Surrogate keys: BIGINT on PostgreSQL; plain INTEGER on SQLite, where only `INTEGER PRIMARY KEY`
# is the autoincrementing rowid alias.
RowId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and read back timezone-aware (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the store keeps timezone-aware UTC timestamps")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(AsyncAttrs, DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# ------------------------------------------------------------------------------ consent


class GuildSettings(Base):
    """A server's own learning consent and voter role; a server without a row has the defaults."""

    __tablename__ = "guild_settings"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    learning: Mapped[bool] = mapped_column(Boolean)
    # When set, only votes by holders of this role (at the time they voted) reach training.
    voter_role_id: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class GuildRemoval(Base):
    """A server the bot was removed from: its data is deleted at `delete_after` unless the bot is back by then."""

    __tablename__ = "guild_removals"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    removed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delete_after: Mapped[datetime] = mapped_column(UTCDateTime)


class OptedOutUser(Base):
    """A user whose prompts and votes never reach training: opted out, or forgotten (data deleted too).

    A forgotten user's row stays so that events arriving after the deletion are ignored.
    """

    __tablename__ = "opted_out_users"

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    reason: Mapped[str] = mapped_column(String(16))  # "opted_out" | "forgotten"
    since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# ------------------------------------------------------------------------------ prompts


class Image(Base):
    """A normalised image, stored once by the sha256 of its bytes (the file is images_dir/ab/<sha><suffix>)."""

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    mime: Mapped[str] = mapped_column(String(32))
    suffix: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Prompt(Base):
    """One question as the model saw it: who asked where, the question, its images and history."""

    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    # sha256 over (images, question, history): prompts with the same key are the same prompt,
    # so their answers are comparable, and the held-out split is taken by key.
    key: Mapped[str] = mapped_column(String(64), index=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger, index=True)  # None: a DM
    channel_id: Mapped[int] = mapped_column(BigInteger)
    # The channel a thread belongs to, for questions asked in a thread: deleting a channel takes its
    # threads along, and Discord sends no deletion of its own for them.
    parent_channel_id: Mapped[int | None] = mapped_column(BigInteger)
    # The question's Discord message (None for prompts that have none, such as a slash command's).
    message_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    author_id: Mapped[int] = mapped_column(BigInteger, index=True)
    question: Mapped[str] = mapped_column(Text)
    # The earlier turns the model saw: [{"role": "user"|"assistant", "content": str, "images": [sha256]}];
    # where each came from is in `history_turns`, one row per turn.
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # Learning was on in its guild and the author had not opted out when it was recorded; never for DMs.
    # (Set to false by migration 0003 for prompts with a history recorded before provenance existed.)
    trainable: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    responses: Mapped[list[Response]] = relationship(
        back_populates="prompt", passive_deletes=True, lazy="raise", order_by="Response.id"
    )
    image_links: Mapped[list[PromptImage]] = relationship(
        passive_deletes=True, lazy="raise", order_by="PromptImage.position"
    )


class PromptImage(Base):
    """Which images a prompt showed the model, in order: the history's first, then the question's own."""

    __tablename__ = "prompt_images"

    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    # No cascade: an image outlives a prompt while another prompt uses it.
    image_sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"), index=True)
    in_history: Mapped[bool] = mapped_column(Boolean)


class Response(Base):
    """One answer to a prompt (a 🔁 alternative is another response to the same prompt)."""

    __tablename__ = "responses"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    adapter_version: Mapped[str | None] = mapped_column(String(64))  # None: the base model
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON)  # temperature, top_p, seed, max_tokens, ...
    latency_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    requested_by: Mapped[int | None] = mapped_column(BigInteger, index=True)  # who asked (or pressed 🔁)
    regenerated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    prompt: Mapped[Prompt] = relationship(back_populates="responses", lazy="raise")
    messages: Mapped[list[ResponseMessage]] = relationship(
        passive_deletes=True, lazy="raise", order_by="ResponseMessage.position"
    )


class ResponseMessage(Base):
    """A Discord message that carries (a chunk of) a response."""

    __tablename__ = "response_messages"

    message_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)


class FollowUp(Base):
    """A prompt that replied to a response: its history carries that response and what led to it."""

    __tablename__ = "follow_ups"

    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True)
    parent_response_id: Mapped[int] = mapped_column(
        ForeignKey("responses.id", ondelete="CASCADE"), index=True
    )


class HistoryTurn(Base):
    """Where one turn of a prompt's history came from, and whose words it carries.

    A user turn quotes a prompt's question (`source_prompt_id`); an assistant turn quotes a
    response (`source_response_id`) and names the prompt it answered (`source_prompt_id`), whose
    author's question it was derived from. `author_id` and `guild_id` are that source prompt's,
    copied when recorded so that forget-me finds the copy even if the source is gone. A turn with
    no source (None: not given, or deleted outside the service) keeps its prompt out of training.
    """

    __tablename__ = "history_turns"

    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # index into Prompt.history
    source_prompt_id: Mapped[int | None] = mapped_column(
        ForeignKey("prompts.id", ondelete="SET NULL"), index=True
    )
    source_response_id: Mapped[int | None] = mapped_column(
        ForeignKey("responses.id", ondelete="SET NULL"), index=True
    )
    author_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)


class Reaction(Base):
    """One user's 👍 or 👎 on a response: present while the row exists."""

    __tablename__ = "reactions"

    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    emoji: Mapped[str] = mapped_column(String(16), primary_key=True)
    # Eligibility at vote time: the guild's voter role then (None: none named) and whether the voter held it.
    voter_role_id: Mapped[int | None] = mapped_column(BigInteger)
    holds_voter_role: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # forget-me, opt-out and the voter filters of pair building look votes up by user
    __table_args__ = (Index("ix_reactions_user_id", "user_id"),)


# ------------------------------------------------------------------------------ training


class TrainingRun(Base):
    """One training run: what it did, how it went, the adapter version it produced."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    method: Mapped[str] = mapped_column(String(8))  # "dpo" | "kto" | "sft+dpo"
    status: Mapped[str] = mapped_column(String(16))  # "running" | "succeeded" | "failed" | "skipped"
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    adapter_version: Mapped[str | None] = mapped_column(String(32))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


class TrainingRunPair(Base):
    """A pair (or, for KTO, one rated answer: the other side None) that a run trained or evaluated on."""

    __tablename__ = "training_run_pairs"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    chosen_response_id: Mapped[int | None] = mapped_column(
        ForeignKey("responses.id", ondelete="CASCADE"), index=True
    )
    rejected_response_id: Mapped[int | None] = mapped_column(
        ForeignKey("responses.id", ondelete="CASCADE"), index=True
    )
    heldout: Mapped[bool] = mapped_column(Boolean)


class AdapterVersion(Base):
    """The history of an adapter version (the filesystem registry is the truth of what is served)."""

    __tablename__ = "adapter_versions"

    version: Mapped[str] = mapped_column(String(32), primary_key=True)
    # "candidate" | "promoted" | "rejected" | "superseded" | "rolled_back"
    status: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("training_runs.id", ondelete="SET NULL"), index=True
    )
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rolled_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CanaryRollout(Base):
    """One canary: a candidate served to a share of users beside current, and how it was decided.

    The registry on disk says what runs now; this is the history, with the numbers of each decision.
    """

    __tablename__ = "canaries"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    candidate_version: Mapped[str] = mapped_column(String(32))
    current_version: Mapped[str | None] = mapped_column(String(32))  # None: the base model
    share: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # None: still running
    decision: Mapped[str | None] = mapped_column(String(16))  # "promote" | "reject" | "abort"
    rule: Mapped[str | None] = mapped_column(String(16))  # "live" | "timeout" | "admin" | "superseded"
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the decision's numbers (both arms)
    decided_by: Mapped[int | None] = mapped_column(BigInteger)  # the admin's user id, for rule "admin"
