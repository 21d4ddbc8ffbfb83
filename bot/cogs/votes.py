"""Votes: 👍 / 👎 on answers into the store, 🔁 for another answer, 🗑️ to delete one, deletions and reconciling.

Raw events only (they arrive for messages that are not cached, and after restarts); each handler
returns early on anything that is not a vote or an action on a stored answer. A deleted channel or
thread takes what was stored there along. After the bot leaves a guild its events are ignored
(Discord stops sending them anyway; a late one is dropped), and what was stored there is deleted
after SMOLCORD_GUILD_GRACE_DAYS unless the bot is invited back first (the deadline is stored, so
a restart keeps it; at start, guilds the bot left while offline are scheduled too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.display import NO_MENTIONS, ReplyDestination
from bot.limits import HourlyQuota
from feedback.store import consent as consent_service
from feedback.store import deletion as deletion_service
from feedback.store import prompts as prompts_service
from feedback.store import reactions as reactions_service
from feedback.store import responses as responses_service
from feedback.store.errors import FeedbackError, NotAVote, UnknownPrompt, UnknownResponse
from feedback.store.votes import action_of, canonical_vote_emoji, vote_value

if TYPE_CHECKING:
    from bot.app import SmolcordBot

log = logging.getLogger(__name__)


def _canonical(emoji: str) -> str:
    try:
        return canonical_vote_emoji(emoji)
    except NotAVote:
        return emoji


RECONCILE_ANSWERS = 50  # recent answers whose reactions are checked at start (REST calls: a few each)


class Votes(commands.Cog):
    """Reaction and deletion events on the bot's answers."""

    def __init__(self, bot: SmolcordBot) -> None:
        self.bot = bot
        self.settings = bot.settings
        self.answerer = bot.answerer
        self.departed: set[int] = set()  # guilds the bot was removed from: their late events are dropped
        # While reconciling: (message, user, emoji) of every live vote event (None: all of them),
        # so that what happened live wins over the older REST snapshot (see reconcile).
        self._live: set[tuple[int, int | None, str | None]] | None = None
        self._reconcile_write = asyncio.Lock()
        # 🔁 requests per user in the last hour, counted in memory (a restart forgets them)
        self.regen_quota = HourlyQuota(self.settings.regen_per_hour)
        self._reconciled = False

    async def cog_unload(self) -> None:
        await self.answerer.recent.flush()  # the next start reconciles from that file

    @contextlib.asynccontextmanager
    async def _live_vote(
        self, message_id: int, user_id: int | None, emoji: str | None
    ) -> AsyncIterator[None]:
        """Around a live vote's store write: while reconciling, it is noted and waits for a reconcile
        write in progress, so it lands after it (and the reconcile leaves it alone)."""
        if self._live is None:
            yield
            return
        self._live.add((message_id, user_id, None if emoji is None else _canonical(emoji)))
        async with self._reconcile_write:
            yield

    # ------------------------------------------------------------------ filters

    def _is_bot_or_self(self, user_id: int, member: discord.Member | None) -> bool:
        me = self.bot.user
        if me is None or user_id == me.id:
            return True
        user = member or self.bot.get_user(user_id)
        return bool(user is not None and user.bot)

    # ------------------------------------------------------------------ reactions

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        if not payload.emoji.is_unicode_emoji() or payload.guild_id in self.departed:
            return
        emoji = payload.emoji.name or ""
        vote, action = vote_value(emoji), action_of(emoji)
        if vote is None and action is None:
            return
        me = self.bot.user
        if me is not None and payload.message_author_id is not None and payload.message_author_id != me.id:
            return  # not one of the bot's messages
        if self._is_bot_or_self(payload.user_id, payload.member):
            return
        if vote is not None:
            roles = [role.id for role in payload.member.roles] if payload.member is not None else None
            try:
                async with (
                    self._live_vote(payload.message_id, payload.user_id, emoji),
                    self.bot.sessions() as session,
                ):
                    await reactions_service.set_reaction(
                        session,
                        message_id=payload.message_id,
                        user_id=payload.user_id,
                        emoji=emoji,
                        member_role_ids=roles,
                    )
            except (UnknownResponse, NotAVote):
                return
        elif action == "regenerate":
            await self._regenerate(payload)
        elif action == "delete":
            await self._delete_answer(payload)

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        if not payload.emoji.is_unicode_emoji() or payload.guild_id in self.departed:
            return
        emoji = payload.emoji.name or ""
        if vote_value(emoji) is None or self._is_bot_or_self(payload.user_id, None):
            return
        async with (
            self._live_vote(payload.message_id, payload.user_id, emoji),
            self.bot.sessions() as session,
        ):
            await reactions_service.clear_reaction(
                session, message_id=payload.message_id, user_id=payload.user_id, emoji=emoji
            )

    @commands.Cog.listener()
    async def on_raw_reaction_clear(self, payload: discord.RawReactionClearEvent) -> None:
        if payload.guild_id in self.departed:
            return
        async with self._live_vote(payload.message_id, None, None), self.bot.sessions() as session:
            cleared = await reactions_service.clear_message_reactions(session, message_id=payload.message_id)
        if cleared:
            log.info("reactions cleared on message %s: %d votes removed", payload.message_id, cleared)

    @commands.Cog.listener()
    async def on_raw_reaction_clear_emoji(self, payload: discord.RawReactionClearEmojiEvent) -> None:
        if payload.guild_id in self.departed or not payload.emoji.is_unicode_emoji():
            return
        if vote_value(payload.emoji.name or "") is None:
            return
        emoji = payload.emoji.name
        async with self._live_vote(payload.message_id, None, emoji), self.bot.sessions() as session:
            await reactions_service.clear_message_reactions(
                session, message_id=payload.message_id, emoji=emoji
            )

    # ------------------------------------------------------------------ 🔁 and 🗑️

    async def _regenerate(self, payload: discord.RawReactionActionEvent) -> None:
        user_id = payload.user_id
        # Reserved before the first await, so presses racing each other cannot all pass; a request
        # made stays counted (a failed answer used the worker, a deleted one was still asked for).
        reserved = self.regen_quota.take(user_id)
        async with self.bot.sessions() as session:
            response = await responses_service.find_response(session, message_id=payload.message_id)
        if response is None:  # not an answer: nothing was requested
            if reserved:
                self.regen_quota.give_back(user_id)
            return
        channel = self.bot.get_partial_messageable(response.channel_id, guild_id=response.guild_id)
        destination = ReplyDestination(channel, response.channel_id, payload.message_id)
        if not reserved:
            await self._refuse_regeneration(channel, response.channel_id, payload.message_id, user_id)
            return
        try:
            async with self.bot.sessions() as session:
                prompt = await prompts_service.get_prompt(
                    session, settings=self.settings, prompt_id=response.prompt_id
                )
        except UnknownPrompt:
            self.regen_quota.give_back(user_id)
            return
        try:
            with self.answerer.slot(response.guild_id, user_id) as busy:
                if busy is not None:
                    self.regen_quota.give_back(user_id)  # nothing was asked of the model
                    with contextlib.suppress(discord.HTTPException):
                        await destination.post(busy, first=True)
                    return
                await self.answerer.regenerate(
                    destination, prompt, user_id=user_id, version=response.adapter_version
                )
        except discord.HTTPException as exc:
            log.warning("could not post another answer in channel %s (%s)", response.channel_id, exc.status)

    async def _refuse_regeneration(
        self, channel: discord.PartialMessageable, channel_id: int, message_id: int, user_id: int
    ) -> None:
        limit = self.settings.regen_per_hour
        text = (
            f"<@{user_id}>, you have asked for {self.regen_quota.used(user_id)} other answers in the last "
            f"hour (the limit is {limit}); please try again later."
            if limit
            else "Other answers (🔁) are turned off here."
        )
        with contextlib.suppress(discord.HTTPException):
            await channel.send(
                text,
                reference=discord.MessageReference(
                    message_id=message_id, channel_id=channel_id, fail_if_not_exists=False
                ),
                allowed_mentions=NO_MENTIONS,
                suppress_embeds=True,
                delete_after=30,
            )

    async def _delete_answer(self, payload: discord.RawReactionActionEvent) -> None:
        async with self.bot.sessions() as session:
            response = await responses_service.find_response(session, message_id=payload.message_id)
        if response is None:
            return
        user_id = payload.user_id
        if user_id not in (response.prompt_author_id, response.requested_by):
            if not await self.bot.is_bot_admin(payload.member or discord.Object(id=user_id)):  # type: ignore[arg-type]
                return
        try:
            async with self.bot.sessions() as session:
                deletion = await deletion_service.delete_response(
                    session, settings=self.settings, response_id=response.id
                )
        except UnknownResponse:
            return
        log.info("response %s deleted by its asker: %d messages", response.id, len(deletion.message_ids))
        self.answerer.recent.forget(set(deletion.response_ids))
        await self.answerer.delete_answer_messages(response.channel_id, list(deletion.message_ids))

    # ------------------------------------------------------------------ deletions

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self._message_gone(payload.channel_id, payload.message_id)

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in sorted(payload.message_ids):
            await self._message_gone(payload.channel_id, message_id)

    async def _message_gone(self, channel_id: int, message_id: int) -> None:
        # Remembered even when nothing is stored yet: an answer being written to it is dropped once done.
        self.answerer.deleted_questions.append(message_id)
        try:
            await self.answerer.forget_message(channel_id, message_id)
        except FeedbackError as exc:
            log.warning("could not delete what was stored of message %s (%s)", message_id, type(exc).__name__)

    @commands.Cog.listener()
    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        await self._channel_gone(channel.id)  # its threads too: Discord sends no event for them

    @commands.Cog.listener()
    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        await self._channel_gone(payload.thread_id)

    async def _channel_gone(self, channel_id: int) -> None:
        try:
            async with self.bot.sessions() as session:
                deletion = await deletion_service.delete_channel(
                    session, settings=self.settings, channel_id=channel_id
                )
        except FeedbackError as exc:
            log.warning("could not delete what was stored of channel %s (%s)", channel_id, type(exc).__name__)
            return
        self.answerer.recent.forget(set(deletion.response_ids))

    # ------------------------------------------------------------------ guilds

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        self.departed.add(guild.id)
        async with self.bot.sessions() as session:
            due = await deletion_service.schedule_guild_deletion(
                session, settings=self.settings, guild_id=guild.id
            )
        log.info("removed from guild %s: no longer collecting there; its data goes after %s", guild.id, due)

    @commands.Cog.listener()
    async def on_guild_join(self, guild: discord.Guild) -> None:
        self.departed.discard(guild.id)
        async with self.bot.sessions() as session:
            if await deletion_service.cancel_guild_deletion(session, guild_id=guild.id):
                log.info("back in guild %s before its grace period ended: its data is kept", guild.id)

    # ------------------------------------------------------------------ reconciling after downtime

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        if self._reconciled:  # on_ready comes again after a full reconnect; once is enough
            return
        self._reconciled = True
        try:  # removals and re-invites that happened while the bot was offline sent no event
            async with self.bot.sessions() as session:
                await deletion_service.note_guilds_present(
                    session, settings=self.settings, guild_ids=[guild.id for guild in self.bot.guilds]
                )
        except Exception:
            log.exception("checking which guilds the bot is still in failed")
        try:
            await self.reconcile()
        except Exception:  # a failed reconcile must not stop the bot from answering
            log.exception("reconciling reactions failed")

    async def reconcile(self, limit: int = RECONCILE_ANSWERS) -> int:
        """Make the stored votes of recent answers match their reactions on Discord; returns answers checked.

        Reactions added or removed while the bot was offline produced no event. For each recent answer
        the votes are read from all its chunks over REST and the stored ones made to match in one
        transaction (with the voter's roles when the guild names a voter role). A live event that
        arrives meanwhile is newer than that snapshot: its (user, emoji) is left to the event.
        """
        self._live = set()
        try:
            return await self._reconcile(limit)
        finally:
            self._live = None

    async def _reconcile(self, limit: int) -> int:
        checked = 0
        for entry in self.answerer.recent.recent()[:limit]:
            try:
                async with self.bot.sessions() as session:
                    response = await responses_service.get_response(session, response_id=entry["response_id"])
            except UnknownResponse:
                self.answerer.recent.forget({entry["response_id"]})
                continue
            if response.guild_id in self.departed or not response.message_ids:
                continue
            votes = await self._current_votes(response)
            if votes is None:
                continue
            await self._store_votes(response, votes)
            checked += 1
        if checked:
            log.info("reconciled the reactions of %d recent answers", checked)
        return checked

    async def _current_votes(self, response: responses_service.ResponseView) -> set[tuple[int, str]] | None:
        """(user, emoji) of every 👍 / 👎 by a person on any chunk; None when an answer message is gone."""
        channel = self.bot.get_partial_messageable(response.channel_id, guild_id=response.guild_id)
        votes: set[tuple[int, str]] = set()
        for message_id in response.message_ids:
            try:
                message = await channel.fetch_message(message_id)
            except discord.NotFound:  # deleted while offline: delete its record, as the event would have
                await self.answerer.forget_message(response.channel_id, message_id)
                return None
            except discord.HTTPException:
                return None
            for reaction in message.reactions:
                emoji = str(reaction.emoji)
                if vote_value(emoji) is None or reaction.count <= int(reaction.me):
                    continue
                async for user in reaction.users(limit=None):
                    if not user.bot:
                        votes.add((user.id, emoji))
        return votes

    async def _store_votes(
        self, response: responses_service.ResponseView, votes: set[tuple[int, str]]
    ) -> None:
        roles: dict[int, list[int] | None] = {}
        if response.guild_id is not None:
            async with self.bot.sessions() as session:
                consent = await consent_service.get_guild_settings(
                    session, settings=self.settings, guild_id=response.guild_id
                )
            guild = self.bot.get_guild(response.guild_id)
            if consent.voter_role_id is not None and guild is not None:
                for user_id in {user_id for user_id, _ in votes}:
                    with contextlib.suppress(discord.HTTPException):
                        member = guild.get_member(user_id) or await guild.fetch_member(user_id)
                        roles[user_id] = [role.id for role in member.roles]
        async with self._reconcile_write:  # live events wait for this write, then land after it
            live = {
                (user_id, emoji)
                for message_id, user_id, emoji in self._live or ()
                if message_id in response.message_ids
            }
            if any(user_id is None for user_id, _ in live):
                return  # its reactions were cleared live: nothing older may come back
            with contextlib.suppress(UnknownResponse):
                async with self.bot.sessions() as session:
                    await reactions_service.reconcile_votes(
                        session,
                        message_id=response.message_ids[-1],
                        votes={(user_id, emoji): roles.get(user_id) for user_id, emoji in votes},
                        keep={(user_id, emoji) for user_id, emoji in live if user_id is not None and emoji},
                    )


async def setup(bot: SmolcordBot) -> None:
    await bot.add_cog(Votes(bot))
