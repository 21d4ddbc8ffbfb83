"""The records the fake keeps and tests read (users, guilds, messages, interactions, actions, requests)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .protocol import (
    CALLBACK_DEFERRED_MESSAGE,
    CALLBACK_DEFERRED_UPDATE,
    CHANNEL_TEXT,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FLAG_SUPPRESS_EMBEDS,
    emoji_key,
)

if TYPE_CHECKING:
    from .actions import ActionLog

# --------------------------------------------------------------------------- records


@dataclass(eq=False)
class FakeUser:
    """A Discord user (or bot account) known to the fake."""

    id: int
    name: str
    bot: bool = False
    global_name: str | None = None

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "bot": self.bot,
            "system": False,
            "public_flags": 0,
        }


@dataclass(eq=False)
class FakeGuild:
    """A guild: channels, roles and members as Discord JSON objects, keyed by id."""

    id: int
    name: str
    owner_id: int
    channels: dict[int, dict[str, Any]] = field(default_factory=dict)
    roles: dict[int, dict[str, Any]] = field(default_factory=dict)
    members: dict[int, dict[str, Any]] = field(default_factory=dict)
    threads: dict[int, dict[str, Any]] = field(default_factory=dict)  # active threads, by id
    bot_present: bool = True

    def channel(self, name: str | None = None) -> dict[str, Any]:
        """The channel called ``name``, or the first text channel."""
        for channel in self.channels.values():
            if (name is None and channel["type"] == CHANNEL_TEXT) or channel["name"] == name:
                return channel
        raise KeyError(f"no channel {name!r} in guild {self.name!r}")

    def role(self, name: str) -> dict[str, Any]:
        for role in self.roles.values():
            if role["name"] == name:
                return role
        raise KeyError(f"no role {name!r} in guild {self.name!r}")


@dataclass(eq=False)
class FakeMessage:
    """A message as Discord stores it, plus what the bot sent to make and edit it.

    ``data`` is the message object (reactions aside, see ``reactions``); ``body`` is the JSON the bot
    sent to create it (None for messages the test sent); ``edits`` the JSON bodies of each edit and
    ``history`` the content of each version, oldest first.  ``msg["content"]`` reads ``data``.
    """

    data: dict[str, Any]
    body: dict[str, Any] | None = None
    edits: list[dict[str, Any]] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    files: list[tuple[str, bytes]] = field(default_factory=list)
    reactions: dict[str, list[int]] = field(default_factory=dict)
    deleted: bool = False
    interaction: FakeInteraction | None = field(default=None, repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def id(self) -> int:
        return int(self.data["id"])

    @property
    def channel_id(self) -> int:
        return int(self.data["channel_id"])

    @property
    def guild_id(self) -> int | None:
        return int(self.data["guild_id"]) if self.data.get("guild_id") else None

    @property
    def author_id(self) -> int:
        return int(self.data["author"]["id"])

    @property
    def content(self) -> str:
        return self.data["content"]

    @property
    def flags(self) -> int:
        return self.data.get("flags", 0)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def embeds_suppressed(self) -> bool:
        return bool(self.flags & FLAG_SUPPRESS_EMBEDS)

    @property
    def allowed_mentions(self) -> dict[str, Any] | None:
        """The allowed_mentions of the latest body (create or edit) that set them; None if none did."""
        for body in reversed([self.body or {}, *self.edits]):
            if "allowed_mentions" in body:
                return body["allowed_mentions"]
        return None

    @property
    def reference(self) -> dict[str, Any] | None:
        return self.data.get("message_reference")

    @property
    def reply_to(self) -> int | None:
        """The id of the message this one replies to."""
        reference = self.reference
        return int(reference["message_id"]) if reference else None

    @property
    def mentions(self) -> list[int]:
        """Ids of the users this message actually mentions (after allowed_mentions)."""
        return [int(user["id"]) for user in self.data.get("mentions", [])]

    def reactors(self, emoji: str) -> list[int]:
        """Ids of the users who reacted with ``emoji``, in order."""
        return list(self.reactions.get(emoji_key(emoji), []))


@dataclass(eq=False)
class FakeInteraction:
    """An interaction the test sent, with what the bot answered.

    ``callbacks`` are the bodies POSTed to the callback route (a second one is refused, as on Discord);
    ``original`` the message of the response (the "thinking" message after a defer, the clicked
    message after a component update); ``followups`` the messages POSTed to the webhook.  As on
    Discord, the first follow-up after a defer edits the thinking message, so it is ``original``.
    """

    id: int
    token: str
    payload: dict[str, Any]
    fake: ActionLog = field(repr=False)  # the FakeDiscord that sent it (waits on its log)
    created_at: float = 0.0
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    callback_delay: float | None = None
    original: FakeMessage | None = None
    followups: list[FakeMessage] = field(default_factory=list)
    target: FakeMessage | None = field(default=None, repr=False)

    @property
    def callback(self) -> dict[str, Any] | None:
        return self.callbacks[0] if self.callbacks else None

    @property
    def response_type(self) -> int | None:
        return self.callbacks[0]["type"] if self.callbacks else None

    @property
    def deferred(self) -> bool:
        return self.response_type in (CALLBACK_DEFERRED_MESSAGE, CALLBACK_DEFERRED_UPDATE)

    @property
    def messages(self) -> list[FakeMessage]:
        seen: list[FakeMessage] = []
        for message in [self.original, *self.followups]:
            if message is not None and all(message is not other for other in seen):
                seen.append(message)
        return seen

    async def wait_callback(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The callback body, once the bot has answered or deferred."""
        return await self.fake._wait_until(lambda: self.callback, timeout, f"a callback to {self.name}")

    async def wait_response(self, timeout: float = 5.0) -> FakeMessage:  # noqa: ASYNC109
        """The original response message once it holds an answer (not just "thinking")."""

        def ready() -> FakeMessage | None:
            message = self.original
            return message if message is not None and not message.flags & FLAG_LOADING else None

        return await self.fake._wait_until(ready, timeout, f"a response to {self.name}")

    async def wait_followup(self, count: int = 1, timeout: float = 5.0) -> FakeMessage:  # noqa: ASYNC109
        """The ``count``-th follow-up message."""

        def ready() -> FakeMessage | None:
            return self.followups[count - 1] if len(self.followups) >= count else None

        return await self.fake._wait_until(ready, timeout, f"follow-up #{count} to {self.name}")

    @property
    def name(self) -> str:
        data = self.payload.get("data", {})
        return "/" + data.get("name", data.get("custom_id", "?"))


@dataclass
class Action:
    """Something the client did.  ``data`` is a snapshot taken when it happened.

    Kinds: message_create, message_update, message_delete, bulk_delete, reaction_add, reaction_remove,
    reaction_clear, reaction_clear_emoji, typing, dm_create, guild_leave, commands_sync,
    interaction_callback, rate_limited, identify, resume, invalid_session, presence, disconnect.
    For message kinds ``data`` is the message JSON (content as of that moment).  A deferred interaction
    response records a message_create of the "thinking" message (flags 1 << 7, empty content); the
    answer that replaces it is a message_update.
    """

    index: int
    kind: str
    data: dict[str, Any]
    message: FakeMessage | None = field(default=None, repr=False)
    interaction: FakeInteraction | None = field(default=None, repr=False)
    at: float = field(default_factory=time.monotonic)  # when it happened (time.monotonic())


@dataclass
class RequestRecord:
    """One HTTP request the fake answered (REST or CDN)."""

    method: str
    path: str
    route: str | None
    query: dict[str, str]
    status: int = 0
    body: Any = None
    bytes_sent: int = 0


# --------------------------------------------------------------------------- internal bookkeeping


@dataclass
class CdnFile:
    data: bytes
    content_type: str
    total_size: int
    content_length: int | None
    chunked: bool
    status: int = 200


@dataclass
class Injected:
    method: str
    route: str
    times: int
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass(eq=False)
class Connection:
    ws: web.WebSocketResponse
    path: str
    query: dict[str, str]
    session: Session | None = None
    cursor: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.Task[None] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    server_close_code: int | None = None


@dataclass(eq=False)
class Session:
    id: str
    intents: int
    shard: list[int] | None
    # (seq - 1) indexes this list; the connection is set for READY / RESUMED, which belong to one socket.
    log: list[tuple[str, Connection | None]] = field(default_factory=list)
    conn: Connection | None = None
    alive: bool = True


RECORD = web.RequestKey("fake_discord_record", RequestRecord)
