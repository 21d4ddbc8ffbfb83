"""Votes: storing 👍/👎 reactions on answers, clearing them, reconciling them with Discord."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import (
    dialect_insert,
    transaction,
)
from feedback.store.errors import (
    UnknownResponse,
)
from feedback.store.models import (
    GuildSettings,
    OptedOutUser,
    Prompt,
    Reaction,
    Response,
    ResponseMessage,
    utcnow,
)
from feedback.store.votes import canonical_vote_emoji

if TYPE_CHECKING:
    pass

__all__ = [
    "clear_message_reactions",
    "clear_reaction",
    "reconcile_votes",
    "set_reaction",
]


def _response_of(message_id: int) -> Any:
    """The response id that a Discord message carries (a scalar subquery)."""
    return (
        select(ResponseMessage.response_id).where(ResponseMessage.message_id == message_id).scalar_subquery()
    )


async def set_reaction(
    session: AsyncSession,
    *,
    message_id: int,
    user_id: int,
    emoji: str,
    member_role_ids: Collection[int] | None = None,
) -> bool:
    """Record a 👍/👎 on a response message with the voter's eligibility; False if ignored (opted out)."""
    emoji = canonical_vote_emoji(emoji)  # NotAVote before anything is read or written
    async with transaction(session):
        # One read for all that decides the write (the bot calls this for every reaction).
        opted_out = select(OptedOutUser.user_id).where(OptedOutUser.user_id == user_id).exists()
        found = (
            await session.execute(
                select(ResponseMessage.response_id, GuildSettings.voter_role_id, opted_out)
                .join(Response, Response.id == ResponseMessage.response_id)
                .join(Prompt, Prompt.id == Response.prompt_id)
                .outerjoin(GuildSettings, GuildSettings.guild_id == Prompt.guild_id)
                .where(ResponseMessage.message_id == message_id)
            )
        ).first()
        if found is None:
            raise UnknownResponse(f"message {message_id} is not a stored response")
        response_id, role_id, is_opted_out = found
        if is_opted_out:
            return False
        holds = role_id is not None and member_role_ids is not None and role_id in member_role_ids
        try:
            await _upsert_reaction(session, response_id, user_id, emoji, role_id, holds)
        except IntegrityError:  # the response was deleted between the lookup and the upsert
            raise UnknownResponse(f"message {message_id} is not a stored response") from None
    return True


async def _upsert_reaction(
    session: AsyncSession, response_id: int, user_id: int, emoji: str, role_id: int | None, holds: bool
) -> None:
    now = utcnow()
    insert = dialect_insert(session, Reaction).values(
        response_id=response_id,
        user_id=user_id,
        emoji=emoji,
        voter_role_id=role_id,
        holds_voter_role=holds,
        created_at=now,
        updated_at=now,
    )
    # One statement, race-free: a concurrent add of the same reaction updates instead of failing.
    upsert = insert.on_conflict_do_update(
        index_elements=["response_id", "user_id", "emoji"],
        set_={
            "voter_role_id": insert.excluded.voter_role_id,
            "holds_voter_role": insert.excluded.holds_voter_role,
            "updated_at": insert.excluded.updated_at,
        },
    )
    await session.execute(upsert)


async def reconcile_votes(
    session: AsyncSession,
    *,
    message_id: int,
    votes: Mapping[tuple[int, str], Collection[int] | None],
    keep: Collection[tuple[int, str]] = (),
) -> int:
    """Make a response's stored votes the (user, emoji) → member roles seen on Discord, in one transaction.

    `keep` names the (user, emoji) whose stored state is newer than that snapshot (a live event
    came meanwhile): they are left as they are. Opted-out users' votes are not added, as in
    set_reaction. Returns how many votes were added or removed; UnknownResponse if none is stored.
    """
    wanted = {(user_id, canonical_vote_emoji(emoji)): roles for (user_id, emoji), roles in votes.items()}
    untouched = {(user_id, canonical_vote_emoji(emoji)) for user_id, emoji in keep}
    async with transaction(session):
        found = (
            await session.execute(
                select(ResponseMessage.response_id, GuildSettings.voter_role_id)
                .join(Response, Response.id == ResponseMessage.response_id)
                .join(Prompt, Prompt.id == Response.prompt_id)
                .outerjoin(GuildSettings, GuildSettings.guild_id == Prompt.guild_id)
                .where(ResponseMessage.message_id == message_id)
            )
        ).first()
        if found is None:
            raise UnknownResponse(f"message {message_id} is not a stored response")
        response_id, role_id = found
        stored = {
            (row.user_id, row.emoji)
            for row in await session.execute(
                select(Reaction.user_id, Reaction.emoji).where(Reaction.response_id == response_id)
            )
        }
        opted_out = set(
            await session.scalars(
                select(OptedOutUser.user_id).where(OptedOutUser.user_id.in_({u for u, _ in wanted}))
            )
        )
        gone = stored - wanted.keys() - untouched
        for user_id, emoji in sorted(gone):
            await session.execute(
                delete(Reaction).where(
                    Reaction.response_id == response_id, Reaction.user_id == user_id, Reaction.emoji == emoji
                )
            )
        added = 0
        for (user_id, emoji), roles in sorted(wanted.items()):
            if (user_id, emoji) in untouched or user_id in opted_out:
                continue
            if (user_id, emoji) in stored and roles is None:
                continue  # present already, and no newer roles to record
            holds = role_id is not None and roles is not None and role_id in roles
            await _upsert_reaction(session, response_id, user_id, emoji, role_id, holds)
            added += (user_id, emoji) not in stored
    return len(gone) + added


async def clear_reaction(session: AsyncSession, *, message_id: int, user_id: int, emoji: str) -> bool:
    """Record that a user removed a 👍/👎; False if nothing was stored (an unknown message is no error)."""
    emoji = canonical_vote_emoji(emoji)
    async with transaction(session):
        result = await session.execute(
            delete(Reaction).where(
                Reaction.response_id == _response_of(message_id),
                Reaction.user_id == user_id,
                Reaction.emoji == emoji,
            )
        )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def clear_message_reactions(session: AsyncSession, *, message_id: int, emoji: str | None = None) -> int:
    """Remove every stored vote on a response message (or only those of one emoji); returns how many."""
    if emoji is not None:
        try:
            emoji = canonical_vote_emoji(emoji)
        except ValueError:
            return 0  # a cleared 🔁 or 🗑️: nothing of it is stored
    async with transaction(session):
        statement = delete(Reaction).where(Reaction.response_id == _response_of(message_id))
        if emoji is not None:
            statement = statement.where(Reaction.emoji == emoji)
        result = await session.execute(statement)
    return int(result.rowcount)  # type: ignore[attr-defined]
