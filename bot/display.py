"""Where an answer goes and how it is shown while it streams: a reply, an /ask response, paced edits.

A `Destination` posts the first message and continuation chunks and adds the vote reactions;
`Display` keeps the messages one answer is shown in up to date, taking turns on the channel's
`ChannelPacer` for edits (Discord allows only so many per channel).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import discord

from bot.limits import ChannelPacer

__all__ = ["NO_MENTIONS", "Destination", "Display", "InteractionDestination", "ReplyDestination"]

NO_MENTIONS = discord.AllowedMentions.none()


class Destination(Protocol):
    """Where an answer is posted: its first message, continuation chunks, the vote reactions under
    its last message, and a typing indicator. Discord's are below; `smolcord simulate` has its own."""

    channel_id: int
    parent_channel_id: int | None  # a thread's channel (its deletion takes the thread's data along)

    async def post(self, content: str, *, first: bool) -> Any: ...  # a message: `.id`, `.edit()`, `.delete()`

    async def add_reactions(self, message_id: int, emojis: Sequence[str]) -> None: ...

    def typing(self) -> contextlib.AbstractAsyncContextManager[Any]: ...


class ReplyDestination:
    """A reply in a channel (to a question, or to the answer a 🔁 was pressed on)."""

    def __init__(self, channel: discord.abc.Messageable, channel_id: int, reply_to: int | None) -> None:
        self.channel = channel
        self.channel_id = channel_id
        self.parent_channel_id = channel.parent_id if isinstance(channel, discord.Thread) else None
        self.reply_to = reply_to

    async def post(self, content: str, *, first: bool) -> discord.Message:
        reference = None
        if first and self.reply_to is not None:
            # fail_if_not_exists=False: a question deleted meanwhile still gets its answer posted
            # (and then deleted with the question's record, see Answerer.ask).
            reference = discord.MessageReference(
                message_id=self.reply_to, channel_id=self.channel_id, fail_if_not_exists=False
            )
        kwargs: dict[str, Any] = {"reference": reference} if reference is not None else {}
        return await self.channel.send(
            content, allowed_mentions=NO_MENTIONS, suppress_embeds=True, mention_author=False, **kwargs
        )

    async def add_reactions(self, message_id: int, emojis: Sequence[str]) -> None:
        message = discord.PartialMessage(channel=self.channel, id=message_id)  # type: ignore[arg-type]
        for emoji in emojis:
            await message.add_reaction(emoji)

    def typing(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.channel.typing()


class InteractionDestination:
    """The response to a deferred slash command: the first follow-up replaces "thinking…"."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.channel_id = interaction.channel_id or 0
        channel = interaction.channel
        self.parent_channel_id = channel.parent_id if isinstance(channel, discord.Thread) else None

    async def post(self, content: str, *, first: bool) -> discord.Message:
        return await self.interaction.followup.send(
            content, allowed_mentions=NO_MENTIONS, suppress_embeds=True, wait=True
        )

    async def add_reactions(self, message_id: int, emojis: Sequence[str]) -> None:
        client = self.interaction.client
        channel = client.get_partial_messageable(self.channel_id, guild_id=self.interaction.guild_id)
        message = channel.get_partial_message(message_id)
        for emoji in emojis:
            await message.add_reaction(emoji)

    def typing(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return contextlib.nullcontext()  # Discord shows "thinking…" for a deferred interaction


async def _edit(message: Any, content: str) -> None:
    if isinstance(message, discord.WebhookMessage):  # its edit leaves the flags alone
        await message.edit(content=content, allowed_mentions=NO_MENTIONS)
    else:
        # Message.edit sends `suppress=False` unless told otherwise, which brings embeds back.
        await message.edit(content=content, allowed_mentions=NO_MENTIONS, suppress=True)


class Display:
    """The messages one answer is shown in; edits take turns on the channel's pacer."""

    def __init__(self, destination: Destination, pacer: ChannelPacer) -> None:
        self.destination = destination
        self.pacer = pacer
        self.messages: list[Any] = []  # what the destination's `post` returned
        self.shown: list[str] = []

    async def show(self, render: Callable[[], list[str]]) -> None:
        """Make the messages show `render()`: edit changed chunks, post new ones, delete extra ones."""
        chunks = render()
        index = 0
        while index < len(chunks):
            if index >= len(self.messages):
                message = await self.destination.post(chunks[index], first=not self.messages)
                self.messages.append(message)
                self.shown.append(chunks[index])
            elif self.shown[index] != chunks[index]:
                await self.pacer.turn(self.destination.channel_id)
                chunks = render()  # the text grew while we waited for the slot: show the latest
                if index < len(chunks) and self.shown[index] != chunks[index]:
                    await _edit(self.messages[index], chunks[index])
                    self.shown[index] = chunks[index]
            index += 1
        extra, self.messages, self.shown = (
            self.messages[len(chunks) :],
            self.messages[: len(chunks)],
            self.shown[: len(chunks)],
        )
        for message in extra:
            with contextlib.suppress(discord.HTTPException):
                await message.delete()

    async def fail(self, text: str) -> None:
        """Replace whatever was shown with an error message."""
        with contextlib.suppress(discord.HTTPException):
            await self.show(lambda: [text])

    @property
    def message_ids(self) -> list[int]:
        return [message.id for message in self.messages]
