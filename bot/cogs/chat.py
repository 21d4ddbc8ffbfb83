"""Asking: mentions with images, DMs, reply-chain follow-ups and /ask, answered by streaming (bot.answering)."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.attachments import AttachmentRef, AttachmentRefused, fetch_image
from bot.conversation import DEFAULT_IMAGE_QUESTION, Question
from bot.display import NO_MENTIONS, InteractionDestination, ReplyDestination
from feedback.store import prompts as prompts_service
from feedback.store import responses as responses_service
from smolcord.images import NormalizedImage

if TYPE_CHECKING:
    from bot.app import SmolcordBot

log = logging.getLogger(__name__)

USAGE_HINT = (
    "👋 Mention me with an image and a question (for example `@smolcord what breed is this dog?`), "
    "or use `/ask`. Reply to one of my answers, mentioning me, to follow up."
)
PING_OFF_HINT = (
    "👋 I can only read replies that mention me: reply again with the @ mention turned **on** "
    "(or mention me in your reply) and I'll answer."
)
NO_DMS = "I don't answer DMs here; ask me in a server instead."


def _cooldown_text(seconds: float) -> str:
    return f"⏱️ Not so fast: you can ask again in {math.ceil(seconds)} s."


class Chat(commands.Cog):
    """Turns questions into answers; the streaming, recording and limits live in bot.answering."""

    def __init__(self, bot: SmolcordBot) -> None:
        self.bot = bot
        self.settings = bot.settings
        self.answerer = bot.answerer

    # ------------------------------------------------------------------ where the bot answers

    def _channel_allowed(self, channel: object) -> bool:
        """SMOLCORD_CHANNELS, when set (a thread counts as its parent channel)."""
        allowed = self.settings.channels
        if not allowed:
            return True
        return getattr(channel, "id", None) in allowed or getattr(channel, "parent_id", None) in allowed

    def _question_text(self, content: str) -> str:
        assert self.bot.user is not None
        return re.sub(rf"<@!?{self.bot.user.id}>", "", content).strip()

    async def _fetch_images(self, attachments: list[discord.Attachment]) -> list[NormalizedImage]:
        """Every attachment as a normalised image; AttachmentRefused (friendly text) for the first bad one."""
        if len(attachments) > self.settings.max_images:
            raise AttachmentRefused(f"I can look at {self.settings.max_images} images at most per question.")
        refs = [
            AttachmentRef(url=a.url, size=a.size, filename=a.filename, content_type=a.content_type)
            for a in attachments
        ]
        return list(
            await asyncio.gather(*(fetch_image(self.bot.http_session, ref, self.settings) for ref in refs))
        )

    async def _is_reply_to_bot(self, message: discord.Message) -> bool:
        reference = message.reference
        if reference is None or reference.message_id is None or self.bot.user is None:
            return False
        resolved = reference.resolved
        if isinstance(resolved, discord.Message):
            return resolved.author.id == self.bot.user.id
        async with self.bot.sessions() as session:
            return await responses_service.find_response(session, message_id=reference.message_id) is not None

    # ------------------------------------------------------------------ messages

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if me is None or message.author.bot or message.webhook_id is not None:
            return
        in_dm = message.guild is None
        if not in_dm and not self._channel_allowed(message.channel):
            return
        mentioned = any(user.id == me.id for user in message.mentions)
        try:
            if in_dm and not self.settings.allow_dms:
                await self._reply(message, NO_DMS)
                return
            if not in_dm and not mentioned:
                # Without the message content intent a reply whose ping was turned off arrives empty.
                if not message.content and not message.attachments and await self._is_reply_to_bot(message):
                    await self._reply(message, PING_OFF_HINT)
                return
            await self._answer_message(message)
        except discord.HTTPException as exc:  # e.g. no permission to send in this channel
            log.warning(
                "could not answer message %s in channel %s (%s)", message.id, message.channel.id, exc.status
            )

    async def _reply(self, message: discord.Message, text: str) -> None:
        await message.reply(text, allowed_mentions=NO_MENTIONS, suppress_embeds=True, mention_author=False)

    async def _answer_message(self, message: discord.Message) -> None:
        text = self._question_text(message.content)
        conversation = None
        if message.reference is not None and message.reference.message_id is not None:
            async with self.bot.sessions() as session:
                conversation = await prompts_service.get_conversation(
                    session, settings=self.settings, message_id=message.reference.message_id
                )
        if not text and not message.attachments:
            await self._reply(message, USAGE_HINT)
            return
        answerer = self.answerer
        wait = answerer.cooldown.retry_after(message.author.id)
        if wait > 0:
            await self._reply(message, _cooldown_text(wait))
            return
        guild_id = message.guild.id if message.guild else None
        with answerer.slot(guild_id, message.author.id) as busy:
            if busy is not None:
                answerer.cooldown.reset(message.author.id)  # not accepted: no work was done for it
                await self._reply(message, busy)
                return
            # Accepted for work: the cooldown stays spent from here on, whatever happens next (a
            # refused attachment was downloaded and decoded too, and a failed answer used the worker).
            try:
                images = await self._fetch_images(list(message.attachments))
            except AttachmentRefused as exc:
                await self._reply(message, f"🖼️ {exc}")
                return
            question = Question(
                text=text or DEFAULT_IMAGE_QUESTION,
                images=tuple(images),
                history=tuple(conversation.turns) if conversation else (),
                history_images=conversation.images if conversation else {},
            )
            await answerer.ask(
                ReplyDestination(message.channel, message.channel.id, message.id),
                question,
                guild_id=guild_id,
                channel_id=message.channel.id,
                message_id=message.id,
                author_id=message.author.id,
                parent_response_id=conversation.parent_response_id if conversation else None,
            )

    # ------------------------------------------------------------------ /ask

    @app_commands.command(name="ask", description="Ask smolcord a question about an image")
    @app_commands.describe(image="The image to ask about", question="What you want to know about it")
    async def ask(self, interaction: discord.Interaction, image: discord.Attachment, question: str) -> None:
        in_dm = interaction.guild_id is None
        if in_dm and not self.settings.allow_dms:
            await self._refuse(interaction, NO_DMS)
            return
        if not in_dm and not self._channel_allowed(interaction.channel):
            channels = ", ".join(f"<#{c}>" for c in self.settings.channels)
            await self._refuse(interaction, f"I only answer in {channels}.")
            return
        answerer = self.answerer
        wait = answerer.cooldown.retry_after(interaction.user.id)
        if wait > 0:
            await self._refuse(interaction, _cooldown_text(wait))
            return
        with answerer.slot(interaction.guild_id, interaction.user.id) as busy:
            if busy is not None:
                answerer.cooldown.reset(interaction.user.id)  # not accepted: no work was done for it
                await self._refuse(interaction, busy)
                return
            # Accepted: the cooldown stays spent (see _answer_message).
            # Discord wants an answer within 3 s: "thinking…" now, the answer replaces it.
            await interaction.response.defer(thinking=True)
            destination = InteractionDestination(interaction)
            try:
                [normalized] = await self._fetch_images([image])
            except AttachmentRefused as exc:
                await destination.post(f"🖼️ {exc}", first=True)
                return
            await answerer.ask(
                destination,
                Question(text=question.strip() or DEFAULT_IMAGE_QUESTION, images=(normalized,)),
                guild_id=interaction.guild_id,
                channel_id=destination.channel_id,
                message_id=None,  # a slash command has no question message
                author_id=interaction.user.id,
            )

    async def _refuse(self, interaction: discord.Interaction, text: str) -> None:
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)


async def setup(bot: SmolcordBot) -> None:
    await bot.add_cog(Chat(bot))
