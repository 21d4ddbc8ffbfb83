"""The world changing under the bot: guilds, members, threads, messages and reactions, each announced as on Discord."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .cdn import Cdn
from .gateway import Gateway
from .protocol import (
    BOT_PERMISSIONS,
    CHANNEL_PUBLIC_THREAD,
    CHANNEL_TEXT,
    EVERYONE_PERMISSIONS,
    emoji_json,
    emoji_key,
    now_iso,
    permission_value,
)
from .records import FakeGuild, FakeMessage, FakeUser


class World(Gateway, Cdn):
    """Test-driven changes to the world, each dispatched over the gateway as Discord would."""

    # ----------------------------------------------------------------- world building

    def add_guild(
        self,
        name: str,
        *,
        owner: FakeUser | None = None,
        channels: Iterable[str | Mapping[str, Any]] = ("general",),
        roles: Iterable[str | Mapping[str, Any]] = (),
        bot_permissions: Any = BOT_PERMISSIONS,
    ) -> FakeGuild:
        """A guild the bot is in.  ``channels``: names or channel objects; ``roles``: names or
        ``{"name": ..., "permissions": int | discord.Permissions}``.  The owner and the bot are members.
        Added while the bot is connected, it arrives as a GUILD_CREATE (the bot joined)."""
        owner = owner or self.owner
        guild = FakeGuild(id=self._ids.next(), name=name, owner_id=owner.id)
        guild.roles[guild.id] = self._role_json(guild.id, "@everyone", EVERYONE_PERMISSIONS, position=0)
        for position, spec in enumerate(channels):
            channel = {"name": spec} if isinstance(spec, str) else dict(spec)
            channel_id = int(channel.get("id") or self._ids.next())
            channel = {
                "id": str(channel_id),
                "type": CHANNEL_TEXT,
                "guild_id": str(guild.id),
                "position": position,
                "permission_overwrites": [],
                "topic": None,
                "nsfw": False,
                "rate_limit_per_user": 0,
                "parent_id": None,
                "last_message_id": None,
                "flags": 0,
                **channel,
            }
            channel["id"] = str(channel_id)
            guild.channels[channel_id] = channel
            self._channels[channel_id] = channel
        for position, spec in enumerate(roles, start=1):
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            role_id = self._ids.next()
            permissions = permission_value(spec.pop("permissions", 0))
            guild.roles[role_id] = {
                **self._role_json(role_id, spec.pop("name"), permissions, position),
                **spec,
            }
        bot_role = self._ids.next()
        guild.roles[bot_role] = {
            **self._role_json(
                bot_role, self.bot_user.name, permission_value(bot_permissions), len(guild.roles)
            ),
            "managed": True,
            "tags": {"bot_id": str(self.bot_user.id)},
        }
        self.guilds[guild.id] = guild
        self.add_member(guild, owner)
        self.add_member(guild, self.bot_user, roles=[bot_role])
        for session in self._live_sessions():
            self._emit_to(session, "GUILD_CREATE", self._guild_create_json(guild, session.intents))
        return guild

    def add_member(
        self,
        guild: FakeGuild,
        user: FakeUser,
        *,
        roles: Iterable[str | int | Mapping[str, Any]] = (),
        permissions: Any = None,
        nick: str | None = None,
    ) -> dict[str, Any]:
        """Make ``user`` a member.  ``roles``: names or ids of the guild's roles; ``permissions`` (int or
        discord.Permissions) gives the member a role of their own carrying exactly those."""
        role_ids = [self._role_id(guild, role) for role in roles]
        if permissions is not None:
            role_id = self._ids.next()
            guild.roles[role_id] = self._role_json(
                role_id, f"{user.name}'s permissions", permission_value(permissions), len(guild.roles)
            )
            role_ids.append(role_id)
            if guild.bot_present:  # a connected bot learns of the new role, as it would on Discord
                self._emit("GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": guild.roles[role_id]})
        member = {
            "user": user.to_json(),
            "roles": [str(role_id) for role_id in role_ids],
            "nick": nick,
            "joined_at": now_iso(),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "avatar": None,
            "communication_disabled_until": None,
        }
        guild.members[user.id] = member
        return member

    def add_thread(
        self, channel: Any, name: str = "thread", *, owner: FakeUser | None = None
    ) -> dict[str, Any]:
        """A public thread in a guild text ``channel`` (THREAD_CREATE when the bot is connected)."""
        parent = self._channel(channel)
        guild = self._guild_of(parent)
        if guild is None:
            raise ValueError("threads live in guild channels")
        thread_id = self._ids.next()
        thread = {
            "id": str(thread_id),
            "type": CHANNEL_PUBLIC_THREAD,
            "guild_id": str(guild.id),
            "parent_id": parent["id"],
            "owner_id": str((owner or self.owner).id),
            "name": name,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "message_count": 0,
            "member_count": 1,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": now_iso(),
                "locked": False,
            },
        }
        guild.threads[thread_id] = thread
        self._channels[thread_id] = thread
        if guild.bot_present:
            self._emit("THREAD_CREATE", {**thread, "newly_created": True})
        return thread

    async def delete_channel(self, channel: Any) -> None:
        """A moderator deletes a channel (CHANNEL_DELETE) or a thread (THREAD_DELETE).  Deleting a
        channel removes its threads too, as on Discord, without an event of their own."""
        self._mark = len(self.actions)
        found = self._channel(channel)
        guild = self._guild_of(found)
        if guild is None:
            raise ValueError("only guild channels and threads can be deleted")
        channel_id = int(found["id"])
        if found["type"] == CHANNEL_PUBLIC_THREAD:
            guild.threads.pop(channel_id, None)
            payload = {
                "id": found["id"],
                "guild_id": str(guild.id),
                "parent_id": found["parent_id"],
                "type": found["type"],
            }
            self._emit("THREAD_DELETE", payload)
        else:
            guild.channels.pop(channel_id, None)
            for thread_id in [t for t, thread in guild.threads.items() if thread["parent_id"] == found["id"]]:
                del guild.threads[thread_id]
                self._channels.pop(thread_id, None)
            self._emit("CHANNEL_DELETE", found)
        self._channels.pop(channel_id, None)
        await self.flush()

    # ----------------------------------------------------------------- test-driven events

    async def send_message(
        self,
        channel: Any,
        author: FakeUser,
        content: str = "",
        *,
        attachments: Iterable[Mapping[str, Any] | tuple[str, bytes]] = (),
        reference: Any = None,
        mention_author: bool = True,
        mentions: Iterable[FakeUser] = (),
        embeds: Iterable[Mapping[str, Any]] = (),
        webhook: bool = False,
    ) -> FakeMessage:
        """``author`` posts a message (MESSAGE_CREATE).  Mentions come from ``<@id>`` in the content
        plus ``mentions``; a ``reference`` (message or id) makes it a reply, which pings the replied
        author unless ``mention_author=False``.  Attachments: ``fake.attachment(...)`` objects or
        ``(filename, data)``.  ``webhook=True`` posts it as a webhook instead of as ``author``."""
        self._mark = len(self.actions)
        channel_json = self._channel(channel)
        guild = self._guild_of(channel_json)
        if guild is not None and not webhook and author.id not in guild.members:
            self.add_member(guild, author)
        files = [a if isinstance(a, Mapping) else self.attachment(a[0], a[1]) for a in attachments]
        message = self._build_message(
            channel_json,
            author,
            content=content,
            attachments=[dict(a) for a in files],
            embeds=[dict(e) for e in embeds],
            reference=self._reference_json(reference, channel_json) if reference is not None else None,
            reply_ping=mention_author,
            extra_mentions=[user.id for user in mentions],
            webhook_id=self._ids.next() if webhook else None,
        )
        self._store(message)
        self._emit_message("MESSAGE_CREATE", message)
        await self.flush()
        return message

    async def edit_message(self, message: Any, content: str) -> FakeMessage:
        """The author edits their message (MESSAGE_UPDATE)."""
        self._mark = len(self.actions)
        msg = self._live_message(message)
        msg.data["content"] = content
        msg.data["edited_timestamp"] = now_iso()
        msg.history.append(content)
        self._emit_message("MESSAGE_UPDATE", msg)
        await self.flush()
        return msg

    async def delete_message(self, message: Any) -> None:
        """Someone (author or moderator) deletes a message (MESSAGE_DELETE)."""
        self._mark = len(self.actions)
        self._delete(self._live_message(message))
        await self.flush()

    async def bulk_delete(self, messages: Iterable[Any]) -> None:
        """A moderator bulk-deletes messages of one channel (MESSAGE_DELETE_BULK)."""
        self._mark = len(self.actions)
        found = [self._live_message(m) for m in messages]
        self._bulk_delete(found)
        await self.flush()

    async def react(self, message: Any, user: FakeUser, emoji: str) -> None:
        """``user`` adds a reaction (MESSAGE_REACTION_ADD, with the member in guilds)."""
        self._mark = len(self.actions)
        self._add_reaction(self._live_message(message), user, emoji_key(emoji))
        await self.flush()

    async def unreact(self, message: Any, user: FakeUser, emoji: str) -> None:
        """``user`` removes their reaction (MESSAGE_REACTION_REMOVE)."""
        self._mark = len(self.actions)
        self._remove_reaction(self._live_message(message), user.id, emoji_key(emoji))
        await self.flush()

    async def clear_reactions(self, message: Any, emoji: str | None = None) -> None:
        """A moderator clears all reactions (MESSAGE_REACTION_REMOVE_ALL), or one emoji's
        (MESSAGE_REACTION_REMOVE_EMOJI)."""
        self._mark = len(self.actions)
        msg = self._live_message(message)
        if emoji is None:
            self._clear_reactions(msg)
        else:
            self._clear_emoji(msg, emoji_key(emoji))
        await self.flush()

    async def leave_guild(self, guild: FakeGuild) -> None:
        """The bot is removed from ``guild`` (GUILD_DELETE without "unavailable")."""
        self._mark = len(self.actions)
        self._remove_bot_from(guild)
        await self.flush()

    async def rejoin_guild(self, guild: FakeGuild) -> None:
        """The bot is invited back into ``guild`` it was removed from (GUILD_CREATE: discord.py's on_guild_join)."""
        self._mark = len(self.actions)
        if guild.bot_present:
            raise ValueError(f"the bot is in {guild.name!r} already")
        bot_role = next(
            r for r in guild.roles.values() if r.get("tags", {}).get("bot_id") == str(self.bot_user.id)
        )
        guild.bot_present = True
        self.add_member(guild, self.bot_user, roles=[int(bot_role["id"])])
        for session in self._live_sessions():
            # a join carries no "unavailable" (False means an outage ended: discord.py's on_guild_available)
            payload = self._guild_create_json(guild, session.intents)
            payload.pop("unavailable", None)
            self._emit_to(session, "GUILD_CREATE", payload)
        await self.flush()

    # ----------------------------------------------------------------- state changes (+ gateway events)

    def _store(self, message: FakeMessage) -> None:
        self._messages[message.id] = message
        channel = self._channels.get(message.channel_id)
        if channel is not None and not message.ephemeral:
            channel["last_message_id"] = str(message.id)

    def _emit_message(self, event: str, message: FakeMessage) -> None:
        if message.ephemeral:
            return  # ephemeral messages never reach the gateway
        self._emit(event, self._message_json(message, for_rest=False))

    def _delete(self, message: FakeMessage) -> None:
        message.deleted = True
        payload = {"id": str(message.id), "channel_id": str(message.channel_id)}
        if message.guild_id:
            payload["guild_id"] = str(message.guild_id)
        if not message.ephemeral:
            self._emit("MESSAGE_DELETE", payload)

    def _bulk_delete(self, messages: list[FakeMessage]) -> None:
        if not messages:
            return
        if len({m.channel_id for m in messages}) != 1:
            raise ValueError("a bulk delete covers one channel")
        for message in messages:
            message.deleted = True
        payload: dict[str, Any] = {
            "ids": [str(m.id) for m in messages],
            "channel_id": str(messages[0].channel_id),
        }
        if messages[0].guild_id:
            payload["guild_id"] = str(messages[0].guild_id)
        self._emit("MESSAGE_DELETE_BULK", payload)

    def _reaction_base(self, message: FakeMessage, key: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "channel_id": str(message.channel_id),
            "message_id": str(message.id),
            "emoji": emoji_json(key),
        }
        if message.guild_id:
            payload["guild_id"] = str(message.guild_id)
        return payload

    def _add_reaction(self, message: FakeMessage, user: FakeUser, key: str) -> bool:
        users = message.reactions.setdefault(key, [])
        if user.id in users:
            return False
        users.append(user.id)
        # *trap*: discord.py reads "type" (normal 0 / burst 1) from every reaction event.
        payload = {
            **self._reaction_base(message, key),
            "user_id": str(user.id),
            "message_author_id": str(message.author_id),
            "burst": False,
            "burst_colors": [],
            "type": 0,
        }
        guild = self.guilds.get(message.guild_id) if message.guild_id else None
        if guild is not None and user.id in guild.members:
            payload["member"] = guild.members[user.id]
        self._emit("MESSAGE_REACTION_ADD", payload)
        return True

    def _remove_reaction(self, message: FakeMessage, user_id: int, key: str) -> bool:
        users = message.reactions.get(key, [])
        if user_id not in users:
            return False
        users.remove(user_id)
        if not users:
            del message.reactions[key]
        payload = {**self._reaction_base(message, key), "user_id": str(user_id), "burst": False, "type": 0}
        self._emit("MESSAGE_REACTION_REMOVE", payload)
        return True

    def _clear_reactions(self, message: FakeMessage) -> None:
        message.reactions.clear()
        payload = {k: v for k, v in self._reaction_base(message, "x").items() if k != "emoji"}
        self._emit("MESSAGE_REACTION_REMOVE_ALL", payload)

    def _clear_emoji(self, message: FakeMessage, key: str) -> None:
        message.reactions.pop(key, None)
        self._emit("MESSAGE_REACTION_REMOVE_EMOJI", self._reaction_base(message, key))

    def _remove_bot_from(self, guild: FakeGuild) -> None:
        guild.bot_present = False
        guild.members.pop(self.bot_user.id, None)
        self._emit("GUILD_DELETE", {"id": str(guild.id)})
