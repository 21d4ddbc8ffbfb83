"""The world as data (users, guilds, channels, messages, interactions, commands) and the lookups over it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from .actions import ActionLog
from .protocol import (
    ADMINISTRATOR,
    ALL_PERMISSIONS,
    API_PREFIX,
    ATTACHMENT_SIZE_LIMIT,
    CHANNEL_DM,
    Snowflakes,
    id_of,
    unknown,
)
from .records import (
    CdnFile,
    Connection,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    FakeUser,
    Injected,
    RequestRecord,
    Session,
)


class State(ActionLog):
    """Everything the fake remembers, the settings it was started with, and lookups over them."""

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        bot_name: str = "smolbot",
        owner_name: str = "owner",
        privileged_intents: int = 0,
        heartbeat_interval: float = 41.25,
        interaction_deadline: float = 3.0,
        attachment_size_limit: int = ATTACHMENT_SIZE_LIMIT,
        patch: bool = True,
    ) -> None:
        """``privileged_intents``: what the developer portal has switched on (IDENTIFY asking for more is
        closed with 4014); ``interaction_deadline``: seconds the bot has to answer or defer."""
        super().__init__()
        self.token = token
        self.privileged_intents = privileged_intents
        self.heartbeat_interval = heartbeat_interval
        self.interaction_deadline = interaction_deadline
        self.attachment_size_limit = attachment_size_limit
        self._patch = patch

        # The world (every layer above keeps its data here too, so all of it reads in one place).
        self._ids = Snowflakes()
        self.users: dict[int, FakeUser] = {}
        self.guilds: dict[int, FakeGuild] = {}
        self.dm_channels: dict[int, dict[str, Any]] = {}  # by recipient id
        self._channels: dict[int, dict[str, Any]] = {}
        self._messages: dict[int, FakeMessage] = {}
        self._interactions: dict[int, FakeInteraction] = {}
        self._cdn: dict[str, CdnFile] = {}  # served by cdn.py, by URL key
        self._redirects: dict[str, tuple[str, int]] = {}
        self._injected: list[Injected] = []  # failures rest.py answers instead of the route
        # Application commands as registered: None holds the global ones, else by guild id.
        self.commands: dict[int | None, list[dict[str, Any]]] = {}

        self.bot_user = self.add_user(bot_name, bot=True)
        self.application_id = self.bot_user.id
        self.owner = self.add_user(owner_name)

        # The traffic: HTTP requests (rest.py), gateway sessions and sockets (gateway.py), the server.
        self.requests: list[RequestRecord] = []
        self.unhandled: list[RequestRecord] = []  # requests no route of the fake matched
        self.heartbeats = 0
        self._sessions: dict[str, Session] = {}
        self._connections: set[Connection] = set()
        self._background_tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._patcher: contextlib.ExitStack | None = None
        self.port = 0

    # ----------------------------------------------------------------- where it listens

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @property
    def resume_gateway_url(self) -> str:
        # A distinct path, so tests can see that discord.py resumed where READY told it to.
        return f"ws://127.0.0.1:{self.port}/resume-gateway"

    # ----------------------------------------------------------------- users, DM channels, messages

    def add_user(self, name: str, *, bot: bool = False) -> FakeUser:
        user = FakeUser(id=self._ids.next(), name=name, bot=bot)
        self.users[user.id] = user
        return user

    def dm_channel(self, user: FakeUser) -> dict[str, Any]:
        """The DM channel between ``user`` and the bot (type 1), created on first use."""
        channel = self.dm_channels.get(user.id)
        if channel is None:
            channel_id = self._ids.next()
            channel = {
                "id": str(channel_id),
                "type": CHANNEL_DM,
                "recipients": [user.to_json()],
                "last_message_id": None,
                "flags": 0,
            }
            self.dm_channels[user.id] = channel
            self._channels[channel_id] = channel
        return channel

    def message(self, message_id: Any) -> FakeMessage:
        return self._messages[id_of(message_id)]

    def messages_in(
        self, channel: Any, *, author: FakeUser | None = None, include_deleted: bool = False
    ) -> list[FakeMessage]:
        """Messages in a channel, oldest first (ephemeral ones never; deleted ones on request)."""
        channel_id = id_of(channel)
        return sorted(
            (
                m
                for m in self._messages.values()
                if m.channel_id == channel_id
                and not m.ephemeral
                and (include_deleted or not m.deleted)
                and (author is None or m.author_id == author.id)
            ),
            key=lambda m: m.id,
        )

    # ----------------------------------------------------------------- permissions

    @staticmethod
    def _role_json(role_id: int, name: str, permissions: int, position: int) -> dict[str, Any]:
        return {
            "id": str(role_id),
            "name": name,
            "permissions": str(permissions),
            "position": position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }

    def _role_id(self, guild: FakeGuild, role: str | int | Mapping[str, Any]) -> int:
        if isinstance(role, str) and not role.isdigit():
            return int(guild.role(role)["id"])
        return id_of(role)

    def permissions_of(self, guild: FakeGuild, user: FakeUser | int) -> int:
        """A member's guild permissions, computed the way Discord does (owner and admins get all)."""
        user_id = id_of(user)
        if user_id == guild.owner_id:
            return ALL_PERMISSIONS
        member = guild.members.get(user_id)
        value = int(guild.roles[guild.id]["permissions"])
        for role_id in member["roles"] if member else ():
            role = guild.roles.get(int(role_id))
            if role is not None:
                value |= int(role["permissions"])
        return ALL_PERMISSIONS if value & ADMINISTRATOR else value

    # ----------------------------------------------------------------- lookups

    def _channel(self, channel: Any) -> dict[str, Any]:
        if isinstance(channel, FakeUser):
            return self.dm_channel(channel)
        channel_id = id_of(channel)
        try:
            return self._channels[channel_id]
        except KeyError:
            raise unknown("Channel", 10003) from None

    def _guild_of(self, channel: dict[str, Any]) -> FakeGuild | None:
        guild_id = channel.get("guild_id")
        return self.guilds[int(guild_id)] if guild_id else None

    def _live_message(self, message: Any, channel_id: int | None = None) -> FakeMessage:
        found = self._messages.get(id_of(message))
        if found is None or found.deleted or (channel_id is not None and found.channel_id != channel_id):
            raise unknown("Message", 10008)
        return found

    def _live_sessions(self) -> list[Session]:
        return [s for s in self._sessions.values() if s.alive]

    @staticmethod
    def _in_shard(guild_id: int, session: Session) -> bool:
        if not session.shard:
            return True
        shard_id, shard_count = session.shard
        return (guild_id >> 22) % shard_count == shard_id
