"""Deleting stored data with everything that carries it: messages, answers, users, channels, guilds, expired."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.consent import FORGOTTEN
from feedback.store.db import (
    chunks,
    delete_where_in,
    dialect_insert,
    hold_writes,
    ids_where_in,
    lock_rows,
    transaction,
)
from feedback.store.errors import (
    UnknownResponse,
)
from feedback.store.images import delete_unused_images, sweep_image_files
from feedback.store.models import (
    FollowUp,
    GuildRemoval,
    GuildSettings,
    HistoryTurn,
    Image,
    OptedOutUser,
    Prompt,
    PromptImage,
    Reaction,
    Response,
    ResponseMessage,
    TrainingRunPair,
    utcnow,
)

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = [
    "Deletion",
    "cancel_guild_deletion",
    "delete_channel",
    "delete_message",
    "delete_response",
    "forget_user",
    "note_guilds_present",
    "purge_expired",
    "schedule_guild_deletion",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deletion:
    """What a deletion removed; `message_ids` are the Discord messages of deleted responses."""

    prompt_ids: tuple[int, ...] = ()
    response_ids: tuple[int, ...] = ()
    message_ids: tuple[int, ...] = ()
    reactions: int = 0
    images: tuple[str, ...] = ()  # sha256 of images whose rows and files were removed

    @property
    def nothing(self) -> bool:
        return not (self.prompt_ids or self.response_ids or self.reactions)


async def _delete_everything_of(
    session: AsyncSession,
    settings: Settings,
    *,
    prompt_ids: Iterable[int] = (),
    response_ids: Iterable[int] = (),
) -> Deletion:
    """Delete prompts and responses with everything that depends on or quotes them (in the caller's transaction)."""
    prompts, responses = set(prompt_ids), set(response_ids)
    # Closure: a prompt's responses; every prompt whose history quotes a deleted prompt or response
    # (a reply to an answer or to a question, however far down the chain: each quotes the one
    # before); an /ask question (no message of its own) whose last answer goes.
    frontier_prompts, frontier_responses = set(prompts), set(responses)
    await hold_writes(session)
    while frontier_prompts or frontier_responses:
        await lock_rows(session, Prompt.id, frontier_prompts)
        more_responses = (
            await ids_where_in(session, Response.id, Response.prompt_id, frontier_prompts) - responses
        )
        await lock_rows(session, Response.id, frontier_responses | more_responses)
        responses |= more_responses
        frontier_responses |= more_responses
        more_prompts = (
            await ids_where_in(session, FollowUp.prompt_id, FollowUp.parent_response_id, frontier_responses)
            | await ids_where_in(
                session, HistoryTurn.prompt_id, HistoryTurn.source_response_id, frontier_responses
            )
            | await ids_where_in(
                session, HistoryTurn.prompt_id, HistoryTurn.source_prompt_id, frontier_prompts
            )
            | await _unanswered_slash_prompts(session, frontier_responses, responses)
        ) - prompts
        prompts |= more_prompts
        frontier_prompts, frontier_responses = more_prompts, set()
    if not prompts and not responses:
        return Deletion()

    message_ids = await ids_where_in(
        session, ResponseMessage.message_id, ResponseMessage.response_id, responses
    )
    image_shas = await ids_where_in(session, PromptImage.image_sha256, PromptImage.prompt_id, prompts)

    await delete_where_in(session, TrainingRunPair, TrainingRunPair.chosen_response_id, responses)
    await delete_where_in(session, TrainingRunPair, TrainingRunPair.rejected_response_id, responses)
    reactions = await delete_where_in(session, Reaction, Reaction.response_id, responses)
    await delete_where_in(session, ResponseMessage, ResponseMessage.response_id, responses)
    await delete_where_in(session, FollowUp, FollowUp.parent_response_id, responses)
    await delete_where_in(session, FollowUp, FollowUp.prompt_id, prompts)
    await delete_where_in(session, HistoryTurn, HistoryTurn.prompt_id, prompts)
    await delete_where_in(session, Response, Response.id, responses)
    await delete_where_in(session, PromptImage, PromptImage.prompt_id, prompts)
    await delete_where_in(session, Prompt, Prompt.id, prompts)
    removed_images = await delete_unused_images(session, settings, image_shas)
    return Deletion(
        prompt_ids=tuple(sorted(prompts)),
        response_ids=tuple(sorted(responses)),
        message_ids=tuple(sorted(message_ids)),
        reactions=reactions,
        images=tuple(sorted(removed_images)),
    )


async def _unanswered_slash_prompts(session: AsyncSession, frontier: set[int], deleted: set[int]) -> set[int]:
    """The /ask prompts (no Discord message) of the frontier responses whose every answer is being deleted.

    Nothing else could reach such a prompt again (there is no message to reply to, delete or react
    on), so it goes with its last answer.
    """
    if not frontier:
        return set()
    candidates = await ids_where_in(session, Response.prompt_id, Response.id, frontier)
    slash: set[int] = set()
    kept: set[int] = set()
    for batch in chunks(sorted(candidates)):
        slash.update(
            await session.scalars(select(Prompt.id).where(Prompt.id.in_(batch), Prompt.message_id.is_(None)))
        )
    for batch in chunks(sorted(slash)):
        rows = await session.execute(
            select(Response.prompt_id, Response.id).where(Response.prompt_id.in_(batch))
        )
        kept.update(prompt_id for prompt_id, response_id in rows if response_id not in deleted)
    return slash - kept


async def delete_message(session: AsyncSession, *, settings: Settings, message_id: int) -> Deletion:
    """Delete what was stored of a deleted Discord message: a question takes its answers along."""
    async with transaction(session):
        prompt_id = await session.scalar(select(Prompt.id).where(Prompt.message_id == message_id))
        if prompt_id is not None:
            deletion = await _delete_everything_of(session, settings, prompt_ids=[prompt_id])
        else:
            response_id = await session.scalar(
                select(ResponseMessage.response_id).where(ResponseMessage.message_id == message_id)
            )
            if response_id is None:
                return Deletion()
            deletion = await _delete_everything_of(session, settings, response_ids=[response_id])
    log.info(
        "deleted message %s: %d prompts, %d responses",
        message_id,
        len(deletion.prompt_ids),
        len(deletion.response_ids),
    )
    return deletion


async def delete_response(session: AsyncSession, *, settings: Settings, response_id: int) -> Deletion:
    """Delete one answer (🗑️): its messages, votes and follow-ups, and an /ask question left without answers; UnknownResponse if none."""
    async with transaction(session):
        if await session.get(Response, response_id) is None:
            raise UnknownResponse(f"no response {response_id}")
        return await _delete_everything_of(session, settings, response_ids=[response_id])


async def forget_user(session: AsyncSession, *, settings: Settings, user_id: int) -> Deletion:
    """Delete a user's prompts and every prompt quoting them (with answers, votes, unshared images) and votes; remember them as forgotten."""
    async with transaction(session):
        upsert = dialect_insert(session, OptedOutUser).values(
            user_id=user_id, reason=FORGOTTEN, since=utcnow()
        )
        await session.execute(
            upsert.on_conflict_do_update(
                index_elements=["user_id"],
                set_={"reason": upsert.excluded.reason, "since": upsert.excluded.since},
            )
        )
        prompt_ids = set(await session.scalars(select(Prompt.id).where(Prompt.author_id == user_id)))
        # copies of their words in other people's follow-ups, even where the quoted prompt is gone
        prompt_ids.update(
            await session.scalars(select(HistoryTurn.prompt_id).where(HistoryTurn.author_id == user_id))
        )
        deletion = await _delete_everything_of(session, settings, prompt_ids=prompt_ids)
        votes = await session.execute(delete(Reaction).where(Reaction.user_id == user_id))
        # Who pressed 🔁 on someone else's prompt is the user's data too; the answer itself is not.
        await session.execute(
            update(Response).where(Response.requested_by == user_id).values(requested_by=None)
        )
    log.info("forgot user %s: %d prompts", user_id, len(deletion.prompt_ids))
    return Deletion(
        prompt_ids=deletion.prompt_ids,
        response_ids=deletion.response_ids,
        message_ids=deletion.message_ids,
        reactions=deletion.reactions + int(votes.rowcount),  # type: ignore[attr-defined]
        images=deletion.images,
    )


async def purge_expired(
    session: AsyncSession, *, settings: Settings, now: datetime | None = None
) -> Deletion:
    """Delete prompts older than SMOLCORD_RETENTION_DAYS and the data of servers removed longer than their grace
    period, with all that depends on or quotes them; sweep orphan image files."""
    now = now or utcnow()
    cutoff = now - timedelta(days=settings.retention_days)
    async with transaction(session):
        prompt_ids = set(await session.scalars(select(Prompt.id).where(Prompt.created_at < cutoff)))
        gone = list(
            await session.scalars(select(GuildRemoval.guild_id).where(GuildRemoval.delete_after <= now))
        )
        if gone:
            prompt_ids |= await ids_where_in(session, Prompt.id, Prompt.guild_id, gone)
            await delete_where_in(session, GuildSettings, GuildSettings.guild_id, gone)
            await delete_where_in(session, GuildRemoval, GuildRemoval.guild_id, gone)
            log.info("deleting the data of %d servers the bot was removed from", len(gone))
        deletion = await _delete_everything_of(session, settings, prompt_ids=prompt_ids)
    async with transaction(session):
        known = set(await session.scalars(select(Image.sha256)))
    swept = await asyncio.to_thread(sweep_image_files, settings.images_dir, known)
    if deletion.prompt_ids or swept:
        log.info(
            "purged %d prompts older than %s, swept %d orphan files", len(deletion.prompt_ids), cutoff, swept
        )
    return deletion


async def delete_channel(session: AsyncSession, *, settings: Settings, channel_id: int) -> Deletion:
    """Delete what was stored of a deleted channel or thread (a channel takes its threads), quotes of it included."""
    async with transaction(session):
        prompt_ids = await ids_where_in(session, Prompt.id, Prompt.channel_id, [channel_id])
        prompt_ids |= await ids_where_in(session, Prompt.id, Prompt.parent_channel_id, [channel_id])
        deletion = await _delete_everything_of(session, settings, prompt_ids=prompt_ids)
    if not deletion.nothing:
        log.info(
            "deleted channel %s: %d prompts, %d responses",
            channel_id,
            len(deletion.prompt_ids),
            len(deletion.response_ids),
        )
    return deletion


async def schedule_guild_deletion(
    session: AsyncSession, *, settings: Settings, guild_id: int, now: datetime | None = None
) -> datetime:
    """The bot was removed from a guild: its data goes after SMOLCORD_GUILD_GRACE_DAYS (kept if it was due earlier)."""
    now = now or utcnow()
    async with transaction(session):
        insert = dialect_insert(session, GuildRemoval).values(
            guild_id=guild_id, removed_at=now, delete_after=now + timedelta(days=settings.guild_grace_days)
        )
        await session.execute(insert.on_conflict_do_nothing(index_elements=["guild_id"]))
        due = await session.scalar(select(GuildRemoval.delete_after).where(GuildRemoval.guild_id == guild_id))
    assert due is not None
    log.info("removed from guild %s: its data is deleted after %s unless the bot is back", guild_id, due)
    return due


async def note_guilds_present(
    session: AsyncSession, *, settings: Settings, guild_ids: Collection[int], now: datetime | None = None
) -> tuple[int, int]:
    """At start: cancel the pending deletion of guilds the bot is in, schedule it for guilds with data it left
    while offline; returns (cancelled, scheduled)."""
    now = now or utcnow()
    present = set(guild_ids)
    async with transaction(session):
        pending = set(await session.scalars(select(GuildRemoval.guild_id)))
        cancelled = await delete_where_in(session, GuildRemoval, GuildRemoval.guild_id, pending & present)
        known = {
            guild for guild in await session.scalars(select(Prompt.guild_id).distinct()) if guild is not None
        }
        known |= set(await session.scalars(select(GuildSettings.guild_id)))
        missing = sorted(known - present - pending)
        if missing:
            after = now + timedelta(days=settings.guild_grace_days)
            await session.execute(
                dialect_insert(session, GuildRemoval).on_conflict_do_nothing(index_elements=["guild_id"]),
                [{"guild_id": g, "removed_at": now, "delete_after": after} for g in missing],
            )
    if cancelled or missing:
        log.info("guilds at start: %d pending deletions cancelled, %d scheduled", cancelled, len(missing))
    return cancelled, len(missing)


async def cancel_guild_deletion(session: AsyncSession, *, guild_id: int) -> bool:
    """The bot is back in a guild before its grace period ended: keep its data; False if none was pending."""
    async with transaction(session):
        result = await session.execute(delete(GuildRemoval).where(GuildRemoval.guild_id == guild_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]
