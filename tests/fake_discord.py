"""A fake Discord (REST, gateway and CDN on loopback) that the real discord.py client connects to in tests.

Usage::

    async with FakeDiscord() as fake:                    # starts the server, points discord.py at it
        alice = fake.add_user("alice")
        guild = fake.add_guild("test", owner=alice)
        client = discord.Client(intents=discord.Intents.default(), **CLIENT_OPTIONS)
        async with fake.run_client(client):                 # logs in, waits for on_ready, closes after
            await fake.send_message(guild.channel(), alice, f"{fake.bot_user.mention} hi")
            reply = (await fake.wait_for("message_create")).message

Every message, edit, reaction, typing call, interaction callback and command sync the client makes is
recorded as an `Action` (``fake.actions``) and, like real Discord, echoed back over the gateway.  The
protocol details discord.py 2.7 depends on are reproduced on purpose (see the comments marked *trap*).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import mimetypes
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import discord
import discord.asset
import discord.gateway
import discord.http
import yarl
from aiohttp import WSMsgType, web

log = logging.getLogger("fake_discord")

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1420070400000

# discord.py waits this long after the last GUILD_CREATE before on_ready (2 s by default); pass these
# options to the client under test so on_ready comes quickly.
CLIENT_OPTIONS: dict[str, Any] = {"guild_ready_timeout": 0.1}

# Gateway opcodes.
OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_PRESENCE, OP_RESUME = 0, 1, 2, 3, 6
OP_REQUEST_MEMBERS, OP_INVALID_SESSION, OP_HELLO, OP_HEARTBEAT_ACK = 8, 9, 10, 11

# Gateway intents (only those the fake gates on).
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_GUILD_MESSAGE_REACTIONS = 1 << 10
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_DIRECT_MESSAGE_REACTIONS = 1 << 13
INTENT_MESSAGE_CONTENT = 1 << 15
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT

# Message flags.
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
EDITABLE_FLAGS = FLAG_SUPPRESS_EMBEDS

# Channel types, message types, interaction (callback) types.
CHANNEL_TEXT, CHANNEL_DM, CHANNEL_PUBLIC_THREAD = 0, 1, 11
MESSAGE_DEFAULT, MESSAGE_REPLY, MESSAGE_CHAT_INPUT = 0, 19, 20
INTERACTION_COMMAND, INTERACTION_COMPONENT = 2, 3
CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE, CALLBACK_DEFERRED_UPDATE, CALLBACK_UPDATE = 4, 5, 6, 7
KNOWN_CALLBACKS = {1, 4, 5, 6, 7, 8, 9, 10, 12}

ALL_PERMISSIONS = discord.Permissions.all().value
ADMINISTRATOR = discord.Permissions(administrator=True).value
EVERYONE_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    read_message_history=True,
    add_reactions=True,
    embed_links=True,
    attach_files=True,
    use_application_commands=True,
    create_instant_invite=True,
    change_nickname=True,
).value
# What an invited bot typically gets: enough to answer, react and upload, nothing administrative.
BOT_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    read_message_history=True,
    add_reactions=True,
    embed_links=True,
    attach_files=True,
    use_application_commands=True,
).value

MAX_CONTENT = 2000
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024
# Discord drops a session whose socket closed with these codes (the others leave it resumable).
NON_RESUMABLE_CLOSE_CODES = {1000, 1001, 4004, 4007, 4009, 4010, 4011, 4012, 4013, 4014}

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CUSTOM_EMOJI = re.compile(r"^(?:(a):|:)?([\w~]+):(\d+)$")


# --------------------------------------------------------------------------- small helpers


class _Snowflakes:
    """Discord ids: milliseconds since 2015 in the high bits, strictly increasing."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        value = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = value if value > self._last else self._last + 1
        return self._last


def snowflake_time(snowflake: int) -> str:
    """ISO timestamp of a snowflake, in the format Discord uses."""
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).isoformat()


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    # *trap*: discord.py only parses a body whose Content-Type is exactly "application/json";
    # aiohttp's json_response adds "; charset=utf-8", and the client then sees a str instead of a dict.
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def _id_of(thing: Any) -> int:
    """An id from an int, a numeric str, a JSON object with "id", or anything with an ``id`` attribute."""
    if isinstance(thing, int):
        return thing
    if isinstance(thing, str):
        return int(thing)
    if isinstance(thing, Mapping):
        return int(thing["id"])
    return int(thing.id)


def _permission_value(permissions: Any) -> int:
    return int(getattr(permissions, "value", permissions))


def _emoji_key(emoji: Any) -> str:
    """The key the fake stores a reaction under: the unicode emoji itself, or ``name:id`` for custom ones."""
    text = str(emoji).strip("<>")
    match = _CUSTOM_EMOJI.match(text)
    return f"{match.group(2)}:{match.group(3)}" if match else text


def _emoji_json(key: str) -> dict[str, Any]:
    match = _CUSTOM_EMOJI.match(key)
    if match:
        return {"id": match.group(3), "name": match.group(2), "animated": bool(match.group(1))}
    return {"id": None, "name": key}


class DiscordError(Exception):
    """An error answered the way Discord does: status, JSON code and message (and form errors)."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def response(self) -> web.Response:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return _json_response(body, status=self.status)

    @classmethod
    def form(cls, field_name: str, code: str, message: str) -> DiscordError:
        errors = {field_name: {"_errors": [{"code": code, "message": message}]}}
        return cls(400, 50035, "Invalid Form Body", errors)


def _unknown(what: str, code: int) -> DiscordError:
    return DiscordError(404, code, f"Unknown {what}")


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
        return list(self.reactions.get(_emoji_key(emoji), []))


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
    fake: FakeDiscord = field(repr=False)
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


@dataclass
class _CdnFile:
    data: bytes
    content_type: str
    total_size: int
    content_length: int | None
    chunked: bool
    status: int = 200


@dataclass
class _Injected:
    method: str
    route: str
    times: int
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    path: str
    query: dict[str, str]
    session: _Session | None = None
    cursor: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.Task[None] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    server_close_code: int | None = None


@dataclass(eq=False)
class _Session:
    id: str
    intents: int
    shard: list[int] | None
    # (seq - 1) indexes this list; the connection is set for READY / RESUMED, which belong to one socket.
    log: list[tuple[str, _Connection | None]] = field(default_factory=list)
    conn: _Connection | None = None
    alive: bool = True


_RECORD = web.RequestKey("fake_discord_record", RequestRecord)


@contextlib.contextmanager
def patch_discord_urls(api_base: str, gateway: str, cdn_base: str | None = None) -> Iterator[None]:
    """Point discord.py's REST base, default gateway (and asset CDN) somewhere else, then restore them."""
    saved = (
        discord.http.Route.BASE,
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY,
        discord.asset.Asset.BASE,
    )
    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)
    if cdn_base is not None:
        discord.asset.Asset.BASE = cdn_base
    try:
        yield
    finally:
        (
            discord.http.Route.BASE,
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY,
            discord.asset.Asset.BASE,
        ) = saved


# --------------------------------------------------------------------------- the fake


class FakeDiscord:
    """A fake Discord server on 127.0.0.1 (ephemeral port) for discord.py clients under test."""

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
        self.token = token
        self.privileged_intents = privileged_intents
        self.heartbeat_interval = heartbeat_interval
        self.interaction_deadline = interaction_deadline
        self.attachment_size_limit = attachment_size_limit
        self._patch = patch

        self._ids = _Snowflakes()
        self.users: dict[int, FakeUser] = {}
        self.guilds: dict[int, FakeGuild] = {}
        self.dm_channels: dict[int, dict[str, Any]] = {}  # by recipient id
        self._channels: dict[int, dict[str, Any]] = {}
        self._messages: dict[int, FakeMessage] = {}
        self._interactions: dict[int, FakeInteraction] = {}
        self._cdn: dict[str, _CdnFile] = {}
        self._redirects: dict[str, tuple[str, int]] = {}
        self._injected: list[_Injected] = []
        # Application commands as registered: None holds the global ones, else by guild id.
        self.commands: dict[int | None, list[dict[str, Any]]] = {}

        self.bot_user = self.add_user(bot_name, bot=True)
        self.application_id = self.bot_user.id
        self.owner = self.add_user(owner_name)

        self.actions: list[Action] = []
        self.requests: list[RequestRecord] = []
        self.unhandled: list[RequestRecord] = []  # requests no route of the fake matched
        self.heartbeats = 0
        self._mark = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._sessions: dict[str, _Session] = {}
        self._connections: set[_Connection] = set()
        self._background_tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._patcher: contextlib.ExitStack | None = None
        self.port = 0

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        if self._patch:
            self._patcher = contextlib.ExitStack()
            self._patcher.enter_context(
                patch_discord_urls(self.api_base, self.gateway_url, self.base_url + "/cdn")
            )
        log.debug("fake discord on port %d", self.port)

    async def stop(self) -> None:
        for conn in list(self._connections):
            await self._close_connection(conn, 1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._patcher is not None:
            self._patcher.close()
            self._patcher = None

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

    @property
    def cdn_base(self) -> str:
        """Prefix of every attachment URL the fake hands out (for an attachment-host allow-list)."""
        return f"{self.base_url}/cdn/attachments/"

    @contextlib.asynccontextmanager
    async def run_client(
        self, client: discord.Client, *, ready_timeout: float = 10.0
    ) -> AsyncIterator[discord.Client]:
        """Start ``client`` against the fake, wait for on_ready, and close it cleanly on exit."""
        task = asyncio.create_task(client.start(self.token), name="fake-discord-client")
        deadline = asyncio.get_running_loop().time() + ready_timeout
        try:
            while not client.is_ready():
                if task.done():
                    task.result()  # raises what stopped the client
                    raise RuntimeError("the client stopped before it was ready")
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"client not ready after {ready_timeout}s; actions: {self._summary()}")
                await asyncio.sleep(0.01)
            yield client
        finally:
            crashed = task.exception() if task.done() and not task.cancelled() else None
            in_flight = sys.exc_info()[1]
            # client.start does not close the HTTP session when it fails; close() always does.
            await client.close()
            if not task.done():
                try:
                    await asyncio.wait_for(task, timeout=5)
                except TimeoutError:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if crashed is not None and in_flight is None:
                raise crashed  # the client died while the test was using it

    # ----------------------------------------------------------------- world building

    def add_user(self, name: str, *, bot: bool = False) -> FakeUser:
        user = FakeUser(id=self._ids.next(), name=name, bot=bot)
        self.users[user.id] = user
        return user

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
            permissions = _permission_value(spec.pop("permissions", 0))
            guild.roles[role_id] = {
                **self._role_json(role_id, spec.pop("name"), permissions, position),
                **spec,
            }
        bot_role = self._ids.next()
        guild.roles[bot_role] = {
            **self._role_json(
                bot_role, self.bot_user.name, _permission_value(bot_permissions), len(guild.roles)
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
                role_id, f"{user.name}'s permissions", _permission_value(permissions), len(guild.roles)
            )
            role_ids.append(role_id)
            if guild.bot_present:  # a connected bot learns of the new role, as it would on Discord
                self._emit("GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": guild.roles[role_id]})
        member = {
            "user": user.to_json(),
            "roles": [str(role_id) for role_id in role_ids],
            "nick": nick,
            "joined_at": _now_iso(),
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
                "archive_timestamp": _now_iso(),
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

    def cdn_url(
        self,
        filename: str,
        data: bytes = b"",
        *,
        content_type: str | None = None,
        total_size: int | None = None,
        content_length: int | None = None,
        chunked: bool = False,
        host: str = "127.0.0.1",
        status: int = 200,
    ) -> str:
        """Serve ``data`` at a fresh URL under ``cdn_base`` and return the URL.

        ``total_size`` pads the body with zero bytes up to that size, streamed (a huge file without the
        memory); ``content_length`` declares a Content-Length that lies (the body is cut at it when
        smaller, the connection ends early when larger); ``chunked`` sends no Content-Length at all;
        ``host`` (e.g. "localhost") serves the same file under another host name.
        """
        key = str(self._ids.next())
        size = max(len(data), total_size or 0)
        self._cdn[key] = _CdnFile(
            data=data,
            content_type=content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream",
            total_size=size,
            content_length=content_length,
            chunked=chunked,
            status=status,
        )
        return f"http://{host}:{self.port}/cdn/attachments/{key}/{filename}"

    def redirect_url(self, target: str, *, status: int = 302) -> str:
        """A CDN-looking URL that answers with a redirect to ``target``."""
        key = str(self._ids.next())
        self._redirects[key] = (target, status)
        return f"{self.cdn_base}{key}/redirect.png"

    def attachment(
        self,
        filename: str,
        data: bytes = b"",
        *,
        content_type: str | None = None,
        url: str | None = None,
        size: int | None = None,
        width: int | None = None,
        height: int | None = None,
        **cdn: Any,
    ) -> dict[str, Any]:
        """An attachment object for send_message / a command's attachment option.  Served by the CDN
        route unless ``url`` is given; ``size`` is the size Discord claims (may lie); ``cdn`` goes to
        ``cdn_url`` (total_size, content_length, chunked, host)."""
        content_type = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if url is None:
            url = self.cdn_url(filename, data, content_type=content_type, **cdn)
        attachment: dict[str, Any] = {
            "id": str(self._ids.next()),
            "filename": filename,
            "size": size if size is not None else max(len(data), cdn.get("total_size") or 0),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }
        if width is not None and height is not None:
            attachment.update(width=width, height=height)
        return attachment

    def message(self, message_id: Any) -> FakeMessage:
        return self._messages[_id_of(message_id)]

    def messages_in(
        self, channel: Any, *, author: FakeUser | None = None, include_deleted: bool = False
    ) -> list[FakeMessage]:
        """Messages in a channel, oldest first (ephemeral ones never; deleted ones on request)."""
        channel_id = _id_of(channel)
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

    def command(self, name: str, *, guild: Any = None) -> dict[str, Any]:
        """A registered application command (global when ``guild`` is None)."""
        for command in self.commands.get(None if guild is None else _id_of(guild), []):
            if command["name"] == name:
                return command
        raise KeyError(f"no command {name!r} registered for guild {guild!r}")

    # ----------------------------------------------------------------- failure injection

    def rate_limit(
        self,
        method: str,
        route: str,
        *,
        retry_after: float = 0.05,
        times: int = 1,
        via: bool = True,
        is_global: bool = False,
    ) -> None:
        """Answer the next ``times`` requests to ``route`` (e.g. "/channels/{channel_id}/messages", or a
        concrete path) with 429.  *trap*: discord.py takes a 429 without a Via header for a Cloudflare
        ban and raises instead of retrying; ``via=False`` reproduces that."""
        headers = {
            "Retry-After": str(max(1, round(retry_after))),
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset-After": str(retry_after),
            "X-RateLimit-Bucket": "fake-bucket",
            "X-RateLimit-Scope": "global" if is_global else "user",
        }
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        if via:
            headers["Via"] = "1.1 google"
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global}
        self._injected.append(_Injected(method.upper(), route, times, 429, body, headers))

    def fail(
        self, method: str, route: str, status: int, *, code: int = 0, message: str = "", times: int = 1
    ) -> None:
        """Answer the next ``times`` requests to ``route`` with an error (e.g. 403 code 50013)."""
        body = {"message": message or f"{status}: injected error", "code": code}
        self._injected.append(_Injected(method.upper(), route, times, status, body, {}))

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
        msg.data["edited_timestamp"] = _now_iso()
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
        self._add_reaction(self._live_message(message), user, _emoji_key(emoji))
        await self.flush()

    async def unreact(self, message: Any, user: FakeUser, emoji: str) -> None:
        """``user`` removes their reaction (MESSAGE_REACTION_REMOVE)."""
        self._mark = len(self.actions)
        self._remove_reaction(self._live_message(message), user.id, _emoji_key(emoji))
        await self.flush()

    async def clear_reactions(self, message: Any, emoji: str | None = None) -> None:
        """A moderator clears all reactions (MESSAGE_REACTION_REMOVE_ALL), or one emoji's
        (MESSAGE_REACTION_REMOVE_EMOJI)."""
        self._mark = len(self.actions)
        msg = self._live_message(message)
        if emoji is None:
            self._clear_reactions(msg)
        else:
            self._clear_emoji(msg, _emoji_key(emoji))
        await self.flush()

    async def invoke_command(
        self,
        name: str,
        user: FakeUser,
        options: Mapping[str, Any] | None = None,
        *,
        guild: FakeGuild | None = None,
        channel: Any = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """``user`` runs a registered slash command (INTERACTION_CREATE).  ``name`` may name a
        subcommand ("group sub").  Option values are converted by the registered option types:
        attachments take ``fake.attachment(...)`` objects or ``(filename, data)``, users FakeUser,
        roles a role object or name, channels a channel object.  Without ``guild`` it runs in the
        user's DM with the bot.  Like Discord's client the fake refuses unknown commands and options
        but, unlike it, does not hide commands by default_member_permissions: the bot must check."""
        self._mark = len(self.actions)
        root, *path = name.split()
        command, registered_guild = self._find_command(root, guild)
        schema = command.get("options", [])
        resolved: dict[str, dict[str, Any]] = {}
        options_json = self._options_json(schema, path, dict(options or {}), guild, resolved, name)
        data: dict[str, Any] = {
            "id": command["id"],
            "name": root,
            "type": command.get("type", 1),
            "options": options_json,
        }
        if resolved:
            data["resolved"] = resolved
        if registered_guild is not None:
            data["guild_id"] = str(registered_guild)
        return await self._dispatch_interaction(INTERACTION_COMMAND, data, user, guild, channel, locale)

    async def click(
        self, message: Any, custom_id: str, user: FakeUser, *, values: Iterable[str] = ()
    ) -> FakeInteraction:
        """``user`` clicks a button (or picks select ``values``) on one of the bot's messages."""
        self._mark = len(self.actions)
        msg = self._live_message(message)
        component = self._find_component(msg.data.get("components", []), custom_id)
        if component is None:
            raise KeyError(f"message {msg.id} has no component {custom_id!r}")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"]}
        if component["type"] != 2:
            data["values"] = list(values)
        guild = self.guilds.get(msg.guild_id) if msg.guild_id else None
        return await self._dispatch_interaction(
            INTERACTION_COMPONENT, data, user, guild, msg.channel_id, "en-US", target=msg
        )

    async def close_gateway(self, code: int = 4000, reason: str = "") -> None:
        """Close the bot's gateway socket(s) with ``code``.  With a resumable code (4000) discord.py
        reconnects to resume_gateway_url and RESUMEs; events sent meanwhile are replayed then."""
        self._mark = len(self.actions)
        for conn in list(self._connections):
            await self._close_connection(conn, code, reason)

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

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until every connected socket has been sent everything dispatched so far."""
        for conn in list(self._connections):
            if conn.session is not None and conn.writer is not None and not conn.writer.done():
                try:
                    await asyncio.wait_for(conn.idle.wait(), timeout)
                except TimeoutError:
                    log.warning("gateway writer did not drain within %ss", timeout)

    # ----------------------------------------------------------------- observing the client

    def mark(self) -> int:
        """The current position in ``actions``; pass it as ``since`` to wait_for."""
        return len(self.actions)

    def actions_of(self, kind: str) -> list[Action]:
        return [action for action in self.actions if action.kind == kind]

    async def wait_for(
        self,
        kind: str | Callable[[Action], bool],
        check: Callable[[Action], bool] | None = None,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109
        since: int | None = None,
    ) -> Action:
        """The first action of ``kind`` (or matching a predicate) passing ``check``, recorded since
        ``since`` (default: since the last event the test sent), waiting up to ``timeout`` seconds."""
        start = self._mark if since is None else since

        def matches(action: Action) -> bool:
            if callable(kind):
                return kind(action) and (check is None or check(action))
            return action.kind == kind and (check is None or check(action))

        def find() -> Action | None:
            return next((a for a in self.actions[start:] if matches(a)), None)

        return await self._wait_until(find, timeout, lambda: f"{kind!r} since action #{start}")

    async def assert_no_action(
        self,
        kind: str | Callable[[Action], bool],
        check: Callable[[Action], bool] | None = None,
        *,
        within: float = 0.3,
        since: int | None = None,
    ) -> None:
        """Fail if such an action is (or gets, within ``within`` seconds) recorded."""
        try:
            found = await self.wait_for(kind, check, timeout=within, since=since)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected action: {found}")

    @property
    def identify_count(self) -> int:
        return len(self.actions_of("identify"))

    @property
    def resume_count(self) -> int:
        return len(self.actions_of("resume"))

    async def _wait_until(
        self,
        condition: Callable[[], Any],
        timeout: float,  # noqa: ASYNC109
        describe: str | Callable[[], str],
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = condition()
            if result is not None and result is not False:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                what = describe() if callable(describe) else describe
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what}; recent actions: {self._summary()}"
                )
            waiter = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, remaining)

    def _summary(self, last: int = 12) -> str:
        parts = []
        for action in self.actions[-last:]:
            detail = action.data.get("content", action.data.get("emoji", ""))
            parts.append(f"#{action.index} {action.kind} {str(detail)[:60]!r}")
        return "; ".join(parts) or "(none)"

    def _record(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        message: FakeMessage | None = None,
        interaction: FakeInteraction | None = None,
    ) -> Action:
        action = Action(len(self.actions), kind, data, message, interaction)
        self.actions.append(action)
        log.debug("action #%d %s", action.index, kind)
        self._wake_waiters()
        return action

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # ----------------------------------------------------------------- JSON builders

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
        return _id_of(role)

    def permissions_of(self, guild: FakeGuild, user: FakeUser | int) -> int:
        """A member's guild permissions, computed the way Discord does (owner and admins get all)."""
        user_id = _id_of(user)
        if user_id == guild.owner_id:
            return ALL_PERMISSIONS
        member = guild.members.get(user_id)
        value = int(guild.roles[guild.id]["permissions"])
        for role_id in member["roles"] if member else ():
            role = guild.roles.get(int(role_id))
            if role is not None:
                value |= int(role["permissions"])
        return ALL_PERMISSIONS if value & ADMINISTRATOR else value

    def _guild_create_json(self, guild: FakeGuild, intents: int) -> dict[str, Any]:
        # Without the (privileged) members intent Discord sends only the bot's own member.
        members = [
            m
            for user_id, m in guild.members.items()
            if intents & INTENT_GUILD_MEMBERS or user_id == self.bot_user.id
        ]
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "owner_id": str(guild.owner_id),
            "unavailable": False,
            "large": False,
            "member_count": len(guild.members),
            "joined_at": guild.members[self.bot_user.id]["joined_at"],
            "roles": list(guild.roles.values()),
            "channels": [{k: v for k, v in c.items() if k != "guild_id"} for c in guild.channels.values()],
            "members": members,
            "threads": list(guild.threads.values()),
            "presences": [],
            "voice_states": [],
            "emojis": [],
            "stickers": [],
            "features": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "afk_channel_id": None,
            "afk_timeout": 300,
            "application_id": None,
        }

    def _ready_json(self, session: _Session) -> dict[str, Any]:
        guilds = [g for g in self.guilds.values() if g.bot_present and self._in_shard(g.id, session)]
        ready: dict[str, Any] = {
            "v": 10,
            "user": {**self.bot_user.to_json(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.resume_gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
            "_trace": ["fake-discord"],
        }
        if session.shard is not None:
            ready["shard"] = session.shard
        return ready

    def _application_json(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": self.bot_user.name,
            "icon": None,
            "description": "",
            "summary": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner.to_json(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "bot": self.bot_user.to_json(),
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "tags": [],
        }

    def _member_partial(self, guild: FakeGuild, user_id: int) -> dict[str, Any] | None:
        member = guild.members.get(user_id)
        return None if member is None else {k: v for k, v in member.items() if k != "user"}

    def _mention_json(self, guild: FakeGuild | None, user_id: int) -> dict[str, Any]:
        user = self.users.get(user_id) or FakeUser(id=user_id, name=f"user{user_id}")
        mention = user.to_json()
        if guild is not None and (member := self._member_partial(guild, user_id)) is not None:
            mention["member"] = member
        return mention

    def _reference_json(self, reference: Any, channel: dict[str, Any]) -> dict[str, Any]:
        target = self._messages[_id_of(reference)]
        ref = {"type": 0, "message_id": str(target.id), "channel_id": str(target.channel_id)}
        if target.guild_id:
            ref["guild_id"] = str(target.guild_id)
        return ref

    def _build_message(
        self,
        channel: dict[str, Any],
        author: FakeUser,
        *,
        content: str,
        attachments: list[dict[str, Any]] | None = None,
        embeds: list[dict[str, Any]] | None = None,
        components: list[dict[str, Any]] | None = None,
        reference: dict[str, Any] | None = None,
        reply_ping: bool = True,
        extra_mentions: Iterable[int] = (),
        allowed_mentions: dict[str, Any] | None = None,
        flags: int = 0,
        webhook_id: int | None = None,
        tts: bool = False,
        nonce: Any = None,
        message_type: int | None = None,
        interaction: FakeInteraction | None = None,
    ) -> FakeMessage:
        guild = self._guild_of(channel)
        message_id = self._ids.next()
        data: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": channel["id"],
            "type": message_type
            if message_type is not None
            else (MESSAGE_REPLY if reference else MESSAGE_DEFAULT),
            "content": content,
            "author": author.to_json(),
            "timestamp": snowflake_time(message_id),
            "edited_timestamp": None,
            "tts": tts,
            "attachments": attachments or [],
            "embeds": embeds or [],
            "components": components or [],
            "pinned": False,
            "flags": flags,
        }
        if guild is not None:
            data["guild_id"] = str(guild.id)
            if webhook_id is None and (member := self._member_partial(guild, author.id)) is not None:
                data["member"] = member
        if webhook_id is not None:
            data["webhook_id"] = str(webhook_id)
            if interaction is None:
                data["author"] = {
                    **author.to_json(),
                    "id": str(webhook_id),
                    "bot": True,
                    "discriminator": "0000",
                }
        if nonce is not None:
            data["nonce"] = nonce
        if interaction is not None:
            data["application_id"] = str(self.application_id)
            user = interaction.payload.get("member", {}).get("user") or interaction.payload.get("user")
            data["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": interaction.payload["type"],
                "user": user,
                "authorizing_integration_owners": interaction.payload["authorizing_integration_owners"],
            }
            if interaction.payload["type"] == INTERACTION_COMMAND:
                data["interaction"] = {
                    "id": str(interaction.id),
                    "type": INTERACTION_COMMAND,
                    "name": interaction.payload["data"]["name"],
                    "user": user,
                }
        replied_author = None
        if reference is not None:
            data["message_reference"] = reference
            target = self._messages.get(int(reference["message_id"]))
            if target is not None and not target.deleted:
                data["referenced_message"] = {
                    k: v for k, v in target.data.items() if k != "referenced_message"
                }
                replied_author = target.author_id
            else:
                data["referenced_message"] = None
        self._set_mentions(
            data, guild, allowed_mentions, extra_mentions, replied_author if reply_ping else None
        )
        message = FakeMessage(data=data, history=[content], interaction=interaction)
        return message

    def _set_mentions(
        self,
        data: dict[str, Any],
        guild: FakeGuild | None,
        allowed: dict[str, Any] | None,
        extra: Iterable[int] = (),
        replied_author: int | None = None,
    ) -> None:
        """Fill mentions / mention_roles / mention_everyone the way Discord does, after allowed_mentions."""
        content = data.get("content") or ""
        users = [int(u) for u in _USER_MENTION.findall(content)] + list(extra)
        roles = [int(r) for r in _ROLE_MENTION.findall(content)]
        everyone = "@everyone" in content or "@here" in content
        if allowed is not None:
            parse = allowed.get("parse", [])
            allowed_users = {int(u) for u in allowed.get("users", [])}
            allowed_roles = {int(r) for r in allowed.get("roles", [])}
            users = [u for u in users if "users" in parse or u in allowed_users]
            roles = [r for r in roles if "roles" in parse or r in allowed_roles]
            everyone = everyone and "everyone" in parse
            # replied_user defaults to false once allowed_mentions is given.
            if not allowed.get("replied_user", False):
                replied_author = None
        if replied_author is not None:
            users.append(replied_author)
        unique = list(dict.fromkeys(users))
        data["mentions"] = [self._mention_json(guild, u) for u in unique]
        data["mention_roles"] = [str(r) for r in dict.fromkeys(roles) if guild is None or r in guild.roles]
        data["mention_everyone"] = everyone

    def _message_json(self, message: FakeMessage, *, for_rest: bool = True) -> dict[str, Any]:
        data = dict(message.data)
        data["reactions"] = [
            {
                "emoji": _emoji_json(key),
                "count": len(users),
                "count_details": {"burst": 0, "normal": len(users)},
                "me": self.bot_user.id in users,
                "me_burst": False,
                "burst_colors": [],
            }
            for key, users in message.reactions.items()
            if users
        ]
        if for_rest and not self.privileged_intents & INTENT_MESSAGE_CONTENT:
            data = self._blank_unreadable(data)
        return data

    def _blank_unreadable(self, data: dict[str, Any]) -> dict[str, Any]:
        """*trap*: without the message content intent, guild messages that neither mention the bot nor
        come from it arrive with empty content, embeds, attachments and components (so do replies whose
        author turned the ping off)."""
        referenced = data.get("referenced_message")
        if referenced:
            data = {**data, "referenced_message": self._blank_unreadable(referenced)}
        if not data.get("guild_id") or int(data["author"]["id"]) == self.bot_user.id:
            return data
        if any(int(user["id"]) == self.bot_user.id for user in data.get("mentions", [])):
            return data
        blank = {**data, "content": "", "embeds": [], "attachments": [], "components": []}
        blank.pop("poll", None)
        return blank

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
            "emoji": _emoji_json(key),
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

    # ----------------------------------------------------------------- lookups

    def _channel(self, channel: Any) -> dict[str, Any]:
        if isinstance(channel, FakeUser):
            return self.dm_channel(channel)
        channel_id = _id_of(channel)
        try:
            return self._channels[channel_id]
        except KeyError:
            raise _unknown("Channel", 10003) from None

    def _guild_of(self, channel: dict[str, Any]) -> FakeGuild | None:
        guild_id = channel.get("guild_id")
        return self.guilds[int(guild_id)] if guild_id else None

    def _live_message(self, message: Any, channel_id: int | None = None) -> FakeMessage:
        found = self._messages.get(_id_of(message))
        if found is None or found.deleted or (channel_id is not None and found.channel_id != channel_id):
            raise _unknown("Message", 10008)
        return found

    def _rest_channel(self, request: web.Request) -> dict[str, Any]:
        """The channel of a REST route, as the bot may see it (not in guilds it has left)."""
        channel = self._channel(request.match_info["channel_id"])
        guild = self._guild_of(channel)
        if guild is not None and not guild.bot_present:
            raise DiscordError(403, 50001, "Missing Access")
        return channel

    def _rest_message(self, request: web.Request) -> FakeMessage:
        channel = self._rest_channel(request)
        return self._live_message(request.match_info["message_id"], int(channel["id"]))

    def _live_sessions(self) -> list[_Session]:
        return [s for s in self._sessions.values() if s.alive]

    @staticmethod
    def _in_shard(guild_id: int, session: _Session) -> bool:
        if not session.shard:
            return True
        shard_id, shard_count = session.shard
        return (guild_id >> 22) % shard_count == shard_id

    # ----------------------------------------------------------------- interactions

    def _find_command(self, root: str, guild: FakeGuild | None) -> tuple[dict[str, Any], int | None]:
        if guild is not None:
            for command in self.commands.get(guild.id, []):
                if command["name"] == root and command.get("type", 1) == 1:
                    return command, guild.id
        for command in self.commands.get(None, []):
            if command["name"] == root and command.get("type", 1) == 1:
                return command, None
        known = {str(k): [c["name"] for c in v] for k, v in self.commands.items()}
        raise LookupError(f"/{root} is not registered (registered: {known}); did the bot sync its commands?")

    def _options_json(
        self,
        schema: list[dict[str, Any]],
        path: list[str],
        values: dict[str, Any],
        guild: FakeGuild | None,
        resolved: dict[str, dict[str, Any]],
        full_name: str,
    ) -> list[dict[str, Any]]:
        if path:
            sub = next((o for o in schema if o["name"] == path[0] and o["type"] in (1, 2)), None)
            if sub is None:
                raise LookupError(f"/{full_name}: no subcommand {path[0]!r}")
            inner = self._options_json(sub.get("options", []), path[1:], values, guild, resolved, full_name)
            return [{"name": sub["name"], "type": sub["type"], "options": inner}]
        if any(o["type"] in (1, 2) for o in schema):
            raise LookupError(f"/{full_name} needs a subcommand")
        by_name = {o["name"]: o for o in schema}
        unknown = set(values) - set(by_name)
        if unknown:
            raise LookupError(f"/{full_name} has no options {sorted(unknown)}; it has {sorted(by_name)}")
        missing = [o["name"] for o in schema if o.get("required") and o["name"] not in values]
        if missing:
            raise LookupError(f"/{full_name}: required options missing: {missing}")
        out = []
        for name, value in values.items():
            option_type = by_name[name]["type"]
            out.append(
                {
                    "name": name,
                    "type": option_type,
                    "value": self._option_value(option_type, value, guild, resolved),
                }
            )
        return out

    def _option_value(
        self, option_type: int, value: Any, guild: FakeGuild | None, resolved: dict[str, dict[str, Any]]
    ) -> Any:
        if option_type == 11:  # attachment
            attachment = dict(value) if isinstance(value, Mapping) else self.attachment(value[0], value[1])
            resolved.setdefault("attachments", {})[attachment["id"]] = attachment
            return attachment["id"]
        if option_type in (6, 9) and isinstance(value, FakeUser):  # user / mentionable
            resolved.setdefault("users", {})[str(value.id)] = value.to_json()
            if guild is not None and value.id in guild.members:
                member = {
                    **(self._member_partial(guild, value.id) or {}),
                    "permissions": str(self.permissions_of(guild, value)),
                }
                resolved.setdefault("members", {})[str(value.id)] = member
            return str(value.id)
        if option_type in (8, 9):  # role
            if guild is None:
                raise LookupError("role options need a guild")
            role = guild.roles[self._role_id(guild, value)]
            resolved.setdefault("roles", {})[role["id"]] = role
            return role["id"]
        if option_type == 7:  # channel
            channel = self._channel(value)
            resolved.setdefault("channels", {})[channel["id"]] = {
                **{k: channel[k] for k in ("id", "type", "name") if k in channel},
                "permissions": str(ALL_PERMISSIONS),
            }
            return channel["id"]
        return value

    def _find_component(self, components: list[dict[str, Any]], custom_id: str) -> dict[str, Any] | None:
        for component in components:
            if component.get("custom_id") == custom_id:
                return component
            children = list(component.get("components", []))
            if "accessory" in component:
                children.append(component["accessory"])
            found = self._find_component(children, custom_id)
            if found is not None:
                return found
        return None

    async def _dispatch_interaction(
        self,
        kind: int,
        data: dict[str, Any],
        user: FakeUser,
        guild: FakeGuild | None,
        channel: Any,
        locale: str,
        target: FakeMessage | None = None,
    ) -> FakeInteraction:
        interaction_id = self._ids.next()
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "token": secrets.token_urlsafe(32),
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            # *trap*: discord.py 2.7 reads attachment_size_limit from every interaction.
            "attachment_size_limit": self.attachment_size_limit,
        }
        if guild is not None:
            channel_json = self._channel(channel) if channel is not None else guild.channel()
            if user.id not in guild.members:
                self.add_member(guild, user)
            permissions = self.permissions_of(guild, user)
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                channel_id=channel_json["id"],
                channel={**channel_json, "permissions": str(permissions)},
                member={**guild.members[user.id], "permissions": str(permissions)},
                app_permissions=str(self.permissions_of(guild, self.bot_user)),
                authorizing_integration_owners={"0": str(guild.id)},
                context=0,
            )
        else:
            channel_json = self._channel(channel) if channel is not None else self.dm_channel(user)
            payload.update(
                channel_id=channel_json["id"],
                channel={**channel_json, "permissions": str(BOT_PERMISSIONS)},
                user=user.to_json(),
                app_permissions=str(BOT_PERMISSIONS),
                authorizing_integration_owners={"0": "0"},
                context=1,
            )
        if target is not None:
            payload["message"] = self._message_json(target, for_rest=False)
        interaction = FakeInteraction(
            id=interaction_id,
            token=payload["token"],
            payload=payload,
            fake=self,
            created_at=asyncio.get_running_loop().time(),
            target=target,
        )
        self._interactions[interaction_id] = interaction
        self._emit("INTERACTION_CREATE", payload)
        await self.flush()
        return interaction

    def _interaction_by_token(self, application_id: int, token: str) -> FakeInteraction:
        if application_id == self.application_id:
            for interaction in self._interactions.values():
                if interaction.token == token:
                    return interaction
        raise _unknown("Webhook", 10015)

    def _interaction_message(
        self,
        interaction: FakeInteraction,
        body: dict[str, Any],
        uploads: list[tuple[str, bytes, str]],
        *,
        loading: bool,
    ) -> FakeMessage:
        channel = self._channel(interaction.payload["channel_id"])
        flags = int(body.get("flags") or 0) & (
            FLAG_EPHEMERAL | FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS
        )
        if loading:
            flags |= FLAG_LOADING
        else:
            self._validate_message_body(body, uploads)
        is_command = interaction.payload["type"] == INTERACTION_COMMAND
        message = self._build_message(
            channel,
            self.bot_user,
            content="" if loading else body.get("content") or "",
            attachments=self._uploaded_attachments(body, uploads, channel),
            embeds=body.get("embeds") or [],
            components=body.get("components") or [],
            allowed_mentions=body.get("allowed_mentions"),
            flags=flags,
            webhook_id=self.application_id,
            tts=bool(body.get("tts")),
            message_type=MESSAGE_CHAT_INPUT if is_command else MESSAGE_REPLY,
            interaction=interaction,
        )
        message.body = body
        message.files = [(name, data) for name, data, _ in uploads]
        self._store(message)
        return message

    # ----------------------------------------------------------------- gateway

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        """Dispatch an event to every live session (buffered for resumes when disconnected)."""
        for session in self._live_sessions():
            self._emit_to(session, event, data)

    def _emit_to(
        self, session: _Session, event: str, data: dict[str, Any], only: _Connection | None = None
    ) -> None:
        required = self._required_intent(event, data)
        if required and not session.intents & required:
            return
        if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE") and not session.intents & INTENT_MESSAGE_CONTENT:
            data = self._blank_unreadable(data)
        seq = len(session.log) + 1
        # Serialised now: the log is a snapshot, immune to later changes of the records.
        session.log.append((json.dumps({"op": OP_DISPATCH, "t": event, "s": seq, "d": data}), only))
        conn = session.conn
        if conn is not None:
            conn.idle.clear()
            conn.wake.set()

    @staticmethod
    def _required_intent(event: str, data: dict[str, Any]) -> int:
        in_guild = bool(data.get("guild_id"))
        if event.startswith("MESSAGE_REACTION_"):
            return INTENT_GUILD_MESSAGE_REACTIONS if in_guild else INTENT_DIRECT_MESSAGE_REACTIONS
        if event.startswith("MESSAGE_"):
            return INTENT_GUILD_MESSAGES if in_guild else INTENT_DIRECT_MESSAGES
        if event.startswith("GUILD_MEMBER_") and event != "GUILD_MEMBERS_CHUNK":
            return INTENT_GUILD_MEMBERS
        if event.startswith(("GUILD_", "CHANNEL_", "THREAD_")) and event != "GUILD_MEMBERS_CHUNK":
            return INTENT_GUILDS
        return 0

    async def _writer(self, conn: _Connection) -> None:
        try:
            while True:
                session = conn.session
                assert session is not None
                while conn.cursor < len(session.log):
                    text, only = session.log[conn.cursor]
                    conn.cursor += 1
                    if only is None or only is conn:
                        await conn.ws.send_str(text)
                conn.idle.set()
                await conn.wake.wait()
                conn.wake.clear()
        except (ConnectionError, RuntimeError):
            pass  # the socket went away; what was not delivered stays in the log for a resume
        finally:
            conn.idle.set()

    def _attach(self, conn: _Connection, session: _Session, cursor: int) -> None:
        conn.session = session
        conn.cursor = cursor
        session.conn = conn
        conn.idle.clear()
        conn.writer = asyncio.create_task(self._writer(conn), name="fake-discord-gateway-writer")

    async def _close_connection(
        self, conn: _Connection, code: int, reason: str = "", *, wait: bool = True
    ) -> None:
        """Close a gateway socket from the server side (``wait=False`` from inside its own handler)."""
        session = conn.session
        if session is not None and session.conn is conn:
            session.conn = None
            if code in NON_RESUMABLE_CLOSE_CODES:
                session.alive = False
        if conn.writer is not None:
            conn.writer.cancel()
        conn.server_close_code = code
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.ws.close(code=code, message=reason.encode())
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.closed.wait(), 5)

    async def _send_op(self, conn: _Connection, op: int, data: Any) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await conn.ws.send_str(json.dumps({"op": op, "d": data, "s": None, "t": None}))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = _Connection(ws=ws, path=request.path, query=dict(request.query))
        self._connections.add(conn)
        try:
            await self._send_op(conn, OP_HELLO, {"heartbeat_interval": int(self.heartbeat_interval * 1000)})
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_gateway_message(conn, json.loads(msg.data))
                else:
                    await self._close_connection(conn, 4002, "Error while decoding payload.", wait=False)
        finally:
            self._connections.discard(conn)
            if conn.writer is not None:
                conn.writer.cancel()
            session = conn.session
            if session is not None and session.conn is conn:
                session.conn = None
                # A 1000/1001 close ends the session for good.  (discord.py's own shutdown usually
                # arrives as 4000: its reader task wins aiohttp's close race, so it stays resumable.)
                if ws.close_code in NON_RESUMABLE_CLOSE_CODES:
                    session.alive = False
            self._record(
                "disconnect",
                {
                    "code": ws.close_code,
                    "by_server": conn.server_close_code,
                    "session_id": session.id if session else None,
                },
            )
            conn.closed.set()
        return ws

    async def _on_gateway_message(self, conn: _Connection, payload: dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d")
        if op == OP_HEARTBEAT:
            self.heartbeats += 1
            await self._send_op(conn, OP_HEARTBEAT_ACK, None)
        elif op == OP_IDENTIFY:
            await self._identify(conn, data or {})
        elif op == OP_RESUME:
            await self._resume(conn, data or {})
        elif op == OP_PRESENCE:
            self._record("presence", data or {})
        elif op == OP_REQUEST_MEMBERS and conn.session is not None:
            self._members_chunk(conn.session, data or {})
        elif op not in (4,):  # voice state updates are accepted and ignored
            await self._close_connection(conn, 4001, "Unknown opcode.", wait=False)

    async def _identify(self, conn: _Connection, data: dict[str, Any]) -> None:
        if conn.session is not None:
            await self._close_connection(conn, 4005, "Already authenticated.", wait=False)
            return
        if data.get("token") != self.token:
            await self._close_connection(conn, 4004, "Authentication failed.", wait=False)
            return
        intents = int(data.get("intents", 0))
        if intents & PRIVILEGED_INTENTS & ~self.privileged_intents:
            # *trap*: asking for a privileged intent the portal has not enabled closes with 4014.
            await self._close_connection(conn, 4014, "Disallowed intent(s).", wait=False)
            return
        session = _Session(id=secrets.token_hex(16), intents=intents, shard=data.get("shard"))
        self._sessions[session.id] = session
        self._record(
            "identify",
            {
                "session_id": session.id,
                "intents": intents,
                "shard": session.shard,
                "path": conn.path,
                "query": conn.query,
            },
        )
        self._attach(conn, session, cursor=0)
        self._emit_to(session, "READY", self._ready_json(session), only=conn)
        for guild in self.guilds.values():
            if guild.bot_present and self._in_shard(guild.id, session):
                self._emit_to(session, "GUILD_CREATE", self._guild_create_json(guild, session.intents))

    async def _resume(self, conn: _Connection, data: dict[str, Any]) -> None:
        session = self._sessions.get(str(data.get("session_id")))
        if session is None or not session.alive or data.get("token") != self.token:
            self._record("invalid_session", {"session_id": data.get("session_id"), "path": conn.path})
            await self._send_op(conn, OP_INVALID_SESSION, False)
            return
        if session.conn is not None and session.conn is not conn:
            old = session.conn
            session.conn = None
            self._background(self._close_connection(old, 4000, "Resumed elsewhere."))
        seq = min(int(data.get("seq") or 0), len(session.log))
        replayed = sum(1 for _, only in session.log[seq:] if only is None)
        self._record(
            "resume", {"session_id": session.id, "seq": seq, "replayed": replayed, "path": conn.path}
        )
        self._attach(conn, session, cursor=seq)
        self._emit_to(session, "RESUMED", {}, only=conn)

    def _members_chunk(self, session: _Session, data: dict[str, Any]) -> None:
        guild = self.guilds.get(int(data.get("guild_id", 0)))
        if guild is None:
            return
        query, limit = str(data.get("query") or ""), int(data.get("limit") or 0)
        wanted = {int(u) for u in data.get("user_ids") or []}
        members = [
            m
            for user_id, m in guild.members.items()
            if (not wanted or user_id in wanted) and m["user"]["username"].startswith(query)
        ]
        chunk = {
            "guild_id": str(guild.id),
            "members": members[: limit or None],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        self._emit_to(session, "GUILD_MEMBERS_CHUNK", chunk)

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    # ----------------------------------------------------------------- HTTP plumbing

    def _add_routes(self, app: web.Application) -> None:
        p = API_PREFIX
        ch = p + r"/channels/{channel_id:\d+}"
        msg = ch + r"/messages/{message_id:\d+}"
        app_cmds = p + r"/applications/{application_id:\d+}"
        app.add_routes(
            [
                web.get("/gateway", self._gateway),
                web.get("/resume-gateway", self._gateway),
                web.get(p + "/gateway", self._get_gateway),
                web.get(p + "/gateway/bot", self._get_gateway),
                web.get(p + "/users/@me", self._get_me),
                web.get(p + r"/users/{user_id:\d+}", self._get_user),
                web.post(p + "/users/@me/channels", self._create_dm),
                web.delete(p + r"/users/@me/guilds/{guild_id:\d+}", self._leave_guild),
                web.get(p + "/oauth2/applications/@me", self._get_application),
                web.get(p + "/applications/@me", self._get_application),
                web.get(app_cmds + "/commands", self._commands),
                web.put(app_cmds + "/commands", self._commands),
                web.post(app_cmds + "/commands", self._commands),
                web.route("*", app_cmds + r"/commands/{command_id:\d+}", self._command),
                web.get(app_cmds + r"/guilds/{guild_id:\d+}/commands", self._commands),
                web.put(app_cmds + r"/guilds/{guild_id:\d+}/commands", self._commands),
                web.post(app_cmds + r"/guilds/{guild_id:\d+}/commands", self._commands),
                web.route("*", app_cmds + r"/guilds/{guild_id:\d+}/commands/{command_id:\d+}", self._command),
                web.get(p + r"/guilds/{guild_id:\d+}", self._get_guild),
                web.get(p + r"/guilds/{guild_id:\d+}/channels", self._get_guild_channels),
                web.get(p + r"/guilds/{guild_id:\d+}/roles", self._get_guild_roles),
                web.get(p + r"/guilds/{guild_id:\d+}/members/{user_id:\d+}", self._get_member),
                web.get(ch, self._get_channel),
                web.post(ch + "/typing", self._typing),
                web.post(ch + "/messages/bulk-delete", self._bulk_delete_route),
                web.get(ch + "/messages", self._history),
                web.post(ch + "/messages", self._create_message),
                web.get(msg, self._get_message),
                web.patch(msg, self._edit_message),
                web.delete(msg, self._delete_message),
                web.delete(msg + "/reactions", self._clear_reactions_route),
                web.get(msg + "/reactions/{emoji}", self._reaction_users),
                web.delete(msg + "/reactions/{emoji}", self._clear_emoji_route),
                web.put(msg + "/reactions/{emoji}/{user}", self._put_reaction),
                web.delete(msg + "/reactions/{emoji}/{user}", self._delete_reaction),
                web.post(
                    p + r"/interactions/{interaction_id:\d+}/{token}/callback", self._interaction_callback
                ),
                web.post(p + r"/webhooks/{application_id:\d+}/{token}", self._webhook_execute),
                web.route(
                    "*",
                    p + r"/webhooks/{application_id:\d+}/{token}/messages/{message_id}",
                    self._webhook_message,
                ),
                web.get("/cdn/attachments/{key}/{filename}", self._cdn_file),
            ]
        )

    def _route_of(self, request: web.Request) -> str | None:
        resource = request.match_info.route.resource
        if resource is None:
            return None
        canonical = resource.canonical
        return canonical[len(API_PREFIX) :] if canonical.startswith(API_PREFIX) else canonical

    def _take_injected(self, request: web.Request, route: str | None) -> _Injected | None:
        path = request.path[len(API_PREFIX) :] if request.path.startswith(API_PREFIX) else request.path
        for injected in self._injected:
            if injected.method in (request.method, "*") and injected.route in (route, path, request.path):
                injected.times -= 1
                if injected.times <= 0:
                    self._injected.remove(injected)
                return injected
        return None

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        route = self._route_of(request)
        record = RequestRecord(request.method, request.path, route, dict(request.query))
        request[_RECORD] = record
        self.requests.append(record)
        try:
            injected = self._take_injected(request, route)
            if injected is not None:
                if injected.status == 429:
                    self._record("rate_limited", {"method": request.method, "path": request.path})
                response: web.StreamResponse = _json_response(
                    injected.body, injected.status, injected.headers
                )
            else:
                if route is not None:  # unknown routes answer 404/405 whoever asks
                    self._check_auth(request)
                response = await handler(request)
        except DiscordError as error:
            response = error.response()
        except web.HTTPException as error:
            if error.status in (404, 405) and route is None:
                self.unhandled.append(record)
                log.warning("fake discord has no route for %s %s", request.method, request.path)
            response = _json_response({"message": f"{error.status}: {error.reason}", "code": 0}, error.status)
        record.status = response.status
        return response

    def _check_auth(self, request: web.Request) -> None:
        path = request.path
        if not path.startswith(API_PREFIX) or path.startswith(
            (API_PREFIX + "/webhooks/", API_PREFIX + "/interactions/")
        ):
            return
        if path in (API_PREFIX + "/gateway",):
            return
        if request.headers.get("Authorization") != f"Bot {self.token}":
            raise DiscordError(401, 0, "401: Unauthorized")

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any], list[tuple[str, bytes, str]]]:
        """The JSON payload (from the body, or payload_json of a multipart body) and uploaded files."""
        uploads: list[tuple[str, bytes, str]] = []
        payload: dict[str, Any] = {}
        if request.content_type == "multipart/form-data":
            form = await request.post()
            if "payload_json" in form:
                payload = json.loads(str(form["payload_json"]))
            indexed = []
            for name, value in form.items():
                if isinstance(value, web.FileField) and name.startswith("files["):
                    data = value.file.read()
                    content_type = mimetypes.guess_type(value.filename)[0] or "application/octet-stream"
                    indexed.append((int(name[6:-1]), (value.filename, data, content_type)))
            uploads = [upload for _, upload in sorted(indexed)]
        elif request.can_read_body:
            payload = await request.json()
        request[_RECORD].body = payload
        return payload, uploads

    # ----------------------------------------------------------------- REST: misc

    async def _get_gateway(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {"url": self.gateway_url}
        if request.path.endswith("/bot"):
            body.update(
                shards=1,
                session_start_limit={"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
            )
        return _json_response(body)

    async def _get_me(self, request: web.Request) -> web.Response:
        return _json_response({**self.bot_user.to_json(), "verified": True, "mfa_enabled": False, "flags": 0})

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise _unknown("User", 10013)
        return _json_response(user.to_json())

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json_response(self._application_json())

    async def _create_dm(self, request: web.Request) -> web.Response:
        body, _ = await self._read_body(request)
        user = self.users.get(int(body.get("recipient_id", 0)))
        if user is None:
            raise _unknown("User", 10013)
        channel = self.dm_channel(user)
        self._record("dm_create", {"user_id": user.id, "channel_id": int(channel["id"])})
        return _json_response(channel)

    async def _leave_guild(self, request: web.Request) -> web.Response:
        guild = self.guilds.get(int(request.match_info["guild_id"]))
        if guild is None or not guild.bot_present:
            raise _unknown("Guild", 10004)
        self._remove_bot_from(guild)
        self._record("guild_leave", {"guild_id": guild.id})
        return web.Response(status=204)

    def _guild_or_404(self, request: web.Request) -> FakeGuild:
        guild = self.guilds.get(int(request.match_info["guild_id"]))
        if guild is None or not guild.bot_present:
            raise _unknown("Guild", 10004)
        return guild

    async def _get_guild(self, request: web.Request) -> web.Response:
        guild = self._guild_or_404(request)
        full = self._guild_create_json(guild, intents=0)
        keep = (
            "channels",
            "members",
            "threads",
            "presences",
            "voice_states",
            "joined_at",
            "large",
            "member_count",
        )
        return _json_response({k: v for k, v in full.items() if k not in keep})

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        return _json_response(list(self._guild_or_404(request).channels.values()))

    async def _get_guild_roles(self, request: web.Request) -> web.Response:
        return _json_response(list(self._guild_or_404(request).roles.values()))

    async def _get_member(self, request: web.Request) -> web.Response:
        member = self._guild_or_404(request).members.get(int(request.match_info["user_id"]))
        if member is None:
            raise _unknown("Member", 10007)
        return _json_response(member)

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json_response(self._rest_channel(request))

    async def _typing(self, request: web.Request) -> web.Response:
        channel = self._rest_channel(request)
        self._record("typing", {"channel_id": int(channel["id"])})
        return web.Response(status=204)

    # ----------------------------------------------------------------- REST: application commands

    def _command_scope(self, request: web.Request) -> int | None:
        if int(request.match_info["application_id"]) != self.application_id:
            raise _unknown("Application", 10002)
        guild_id = request.match_info.get("guild_id")
        if guild_id is None:
            return None
        if int(guild_id) not in self.guilds:
            raise _unknown("Guild", 10004)
        return int(guild_id)

    def _validate_command(self, command: dict[str, Any]) -> None:
        name, description = command.get("name", ""), command.get("description", "")
        if not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower():
            raise DiscordError.form(
                "name", "APPLICATION_COMMAND_INVALID_NAME", f"Invalid command name {name!r}"
            )
        if command.get("type", 1) == 1 and not 1 <= len(description) <= 100:
            raise DiscordError.form(
                "description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        if len(command.get("options") or []) > 25:
            raise DiscordError.form("options", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")

    def _register_command(
        self, scope: int | None, body: dict[str, Any], existing: list[dict[str, Any]]
    ) -> dict[str, Any]:
        self._validate_command(body)
        previous = next(
            (c for c in existing if c["name"] == body["name"] and c.get("type", 1) == body.get("type", 1)),
            None,
        )
        command = {
            "type": 1,
            "options": [],
            "default_member_permissions": None,
            "nsfw": False,
            "contexts": None,
            "integration_types": [0],
            **body,
            "id": previous["id"] if previous else str(self._ids.next()),
            "application_id": str(self.application_id),
            "version": str(self._ids.next()),
        }
        if scope is not None:
            command["guild_id"] = str(scope)
        return command

    async def _commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        existing = self.commands.get(scope, [])
        if request.method == "GET":
            return _json_response(existing)
        body, _ = await self._read_body(request)
        if request.method == "PUT":
            if not isinstance(body, list):
                raise DiscordError.form("_root", "BASE_TYPE_LIST", "Must be a list.")
            if len({(c.get("name"), c.get("type", 1)) for c in body}) != len(body):
                raise DiscordError.form(
                    "_root", "APPLICATION_COMMANDS_DUPLICATE_NAME", "Duplicate command name."
                )
            self.commands[scope] = [self._register_command(scope, c, existing) for c in body]
        else:
            command = self._register_command(scope, body, existing)
            self.commands[scope] = [c for c in existing if c["id"] != command["id"]] + [command]
            self._record("commands_sync", {"guild_id": scope, "commands": [command]})
            return _json_response(command, status=201)
        self._record("commands_sync", {"guild_id": scope, "commands": self.commands[scope]})
        return _json_response(self.commands[scope])

    async def _command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        existing = self.commands.get(scope, [])
        command = next((c for c in existing if c["id"] == request.match_info["command_id"]), None)
        if command is None:
            raise _unknown("application command", 10063)
        if request.method == "GET":
            return _json_response(command)
        if request.method == "DELETE":
            self.commands[scope] = [c for c in existing if c is not command]
            self._record("commands_sync", {"guild_id": scope, "commands": self.commands[scope]})
            return web.Response(status=204)
        if request.method == "PATCH":
            body, _ = await self._read_body(request)
            command.update(body)
            self._validate_command(command)
            self._record("commands_sync", {"guild_id": scope, "commands": self.commands[scope]})
            return _json_response(command)
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "PATCH", "DELETE"])

    # ----------------------------------------------------------------- REST: messages

    def _validate_message_body(
        self, body: dict[str, Any], uploads: list[tuple[str, bytes, str]], *, editing: bool = False
    ) -> None:
        content = body.get("content")
        if content is not None and len(str(content)) > MAX_CONTENT:
            raise DiscordError.form(
                "content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT} or fewer in length."
            )
        if len(body.get("embeds") or []) > 10:
            raise DiscordError.form("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        if len(uploads) > 10:
            raise DiscordError.form("files", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        for _, data, _ in uploads:
            if len(data) > self.attachment_size_limit:
                raise DiscordError(413, 40005, "Request entity too large")
        empty = not (content or body.get("embeds") or uploads or body.get("sticker_ids") or body.get("poll"))
        empty = empty and not body.get("components")
        if empty and not editing:
            raise DiscordError(400, 50006, "Cannot send an empty message")

    def _uploaded_attachments(
        self, body: dict[str, Any], uploads: list[tuple[str, bytes, str]], channel: dict[str, Any]
    ) -> list[dict[str, Any]]:
        described = {int(a["id"]): a for a in body.get("attachments") or [] if str(a.get("id", "")).isdigit()}
        attachments = []
        for index, (filename, data, content_type) in enumerate(uploads):
            extra = described.get(index, {})
            attachment = self.attachment(filename, data, content_type=content_type)
            if extra.get("description"):
                attachment["description"] = extra["description"]
            attachments.append(attachment)
        return attachments

    async def _create_message(self, request: web.Request) -> web.Response:
        channel = self._rest_channel(request)
        body, uploads = await self._read_body(request)
        self._validate_message_body(body, uploads)
        reference = body.get("message_reference")
        if reference is not None:
            target = self._messages.get(int(reference.get("message_id") or 0))
            if target is None or target.deleted:
                if reference.get("fail_if_not_exists", True):
                    raise DiscordError.form(
                        "message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message"
                    )
                reference = None
            else:
                reference = self._reference_json(target.id, channel)
        flags = int(body.get("flags") or 0) & (FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS)
        message = self._build_message(
            channel,
            self.bot_user,
            content=str(body.get("content") or ""),
            attachments=self._uploaded_attachments(body, uploads, channel),
            embeds=body.get("embeds") or [],
            components=body.get("components") or [],
            reference=reference,
            allowed_mentions=body.get("allowed_mentions"),
            flags=flags,
            tts=bool(body.get("tts")),
            nonce=body.get("nonce"),
        )
        message.body = body
        message.files = [(name, data) for name, data, _ in uploads]
        self._store(message)
        self._emit_message("MESSAGE_CREATE", message)
        self._record("message_create", self._message_json(message, for_rest=False), message=message)
        return _json_response(self._message_json(message))

    def _apply_edit(
        self, message: FakeMessage, body: dict[str, Any], uploads: list[tuple[str, bytes, str]]
    ) -> None:
        if message.author_id != self.bot_user.id:
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        self._validate_message_body(body, uploads, editing=True)
        data = message.data
        if "content" in body:
            data["content"] = str(body["content"] or "")
        if "embeds" in body:
            data["embeds"] = body["embeds"] or []
        if "components" in body:
            data["components"] = body["components"] or []
        if body.get("flags") is not None:
            data["flags"] = (data.get("flags", 0) & ~EDITABLE_FLAGS) | (int(body["flags"]) & EDITABLE_FLAGS)
        if "attachments" in body:
            keep = {str(a.get("id")) for a in body["attachments"] or []}
            data["attachments"] = [a for a in data["attachments"] if a["id"] in keep]
        if uploads:
            data["attachments"] = data["attachments"] + self._uploaded_attachments(body, uploads, {})
            message.files.extend((name, blob) for name, blob, _ in uploads)
        data["flags"] = data.get("flags", 0) & ~FLAG_LOADING
        guild = self.guilds.get(message.guild_id) if message.guild_id else None
        allowed = body.get("allowed_mentions", message.allowed_mentions)
        self._set_mentions(data, guild, allowed)
        if not (data["content"] or data["embeds"] or data["attachments"] or data["components"]):
            raise DiscordError(400, 50006, "Cannot send an empty message")
        data["edited_timestamp"] = _now_iso()
        message.edits.append(body)
        message.history.append(data["content"])

    async def _edit_message(self, request: web.Request) -> web.Response:
        message = self._rest_message(request)
        body, uploads = await self._read_body(request)
        self._apply_edit(message, body, uploads)
        self._emit_message("MESSAGE_UPDATE", message)
        self._record("message_update", self._message_json(message, for_rest=False), message=message)
        return _json_response(self._message_json(message))

    async def _get_message(self, request: web.Request) -> web.Response:
        message = self._rest_message(request)
        if message.ephemeral:
            raise _unknown("Message", 10008)
        return _json_response(self._message_json(message))

    async def _delete_message(self, request: web.Request) -> web.Response:
        message = self._rest_message(request)
        self._delete(message)
        self._record("message_delete", {"id": message.id, "channel_id": message.channel_id}, message=message)
        return web.Response(status=204)

    async def _bulk_delete_route(self, request: web.Request) -> web.Response:
        channel_id = int(self._rest_channel(request)["id"])
        body, _ = await self._read_body(request)
        ids = body.get("messages") or []
        if not 2 <= len(ids) <= 100:
            raise DiscordError.form(
                "messages", "BASE_TYPE_BAD_LENGTH", "Must be between 2 and 100 in length."
            )
        messages = [self._live_message(i, channel_id) for i in ids]
        self._bulk_delete(messages)
        self._record("bulk_delete", {"ids": [m.id for m in messages], "channel_id": channel_id})
        return web.Response(status=204)

    async def _history(self, request: web.Request) -> web.Response:
        channel_id = int(self._rest_channel(request)["id"])
        limit = min(max(int(request.query.get("limit", 50)), 1), 100)
        messages = self.messages_in(channel_id)  # oldest first
        if "before" in request.query:
            before = int(request.query["before"])
            chosen = [m for m in messages if m.id < before][-limit:]
        elif "after" in request.query:
            after = int(request.query["after"])
            chosen = [m for m in messages if m.id > after][:limit]
        elif "around" in request.query:
            around = int(request.query["around"])
            older = [m for m in messages if m.id < around][-(limit // 2) :] if limit > 1 else []
            newer = [m for m in messages if m.id >= around][: limit - len(older)]
            chosen = older + newer
        else:
            chosen = messages[-limit:]
        # Discord answers newest first whatever the query.
        return _json_response([self._message_json(m) for m in reversed(chosen)])

    # ----------------------------------------------------------------- REST: reactions

    def _reaction_target(self, request: web.Request) -> tuple[FakeMessage, str]:
        message = self._rest_message(request)
        return message, _emoji_key(request.match_info["emoji"])

    async def _put_reaction(self, request: web.Request) -> web.Response:
        message, key = self._reaction_target(request)
        if request.match_info["user"] != "@me":
            raise web.HTTPNotFound()
        if self._add_reaction(message, self.bot_user, key):
            data = {
                "message_id": message.id,
                "channel_id": message.channel_id,
                "emoji": key,
                "user_id": self.bot_user.id,
            }
            self._record("reaction_add", data, message=message)
        return web.Response(status=204)

    async def _delete_reaction(self, request: web.Request) -> web.Response:
        message, key = self._reaction_target(request)
        user = request.match_info["user"]
        user_id = self.bot_user.id if user == "@me" else int(user)
        if self._remove_reaction(message, user_id, key):
            data = {
                "message_id": message.id,
                "channel_id": message.channel_id,
                "emoji": key,
                "user_id": user_id,
            }
            self._record("reaction_remove", data, message=message)
        return web.Response(status=204)

    async def _clear_emoji_route(self, request: web.Request) -> web.Response:
        message, key = self._reaction_target(request)
        self._clear_emoji(message, key)
        self._record("reaction_clear_emoji", {"message_id": message.id, "emoji": key}, message=message)
        return web.Response(status=204)

    async def _clear_reactions_route(self, request: web.Request) -> web.Response:
        message = self._rest_message(request)
        self._clear_reactions(message)
        self._record("reaction_clear", {"message_id": message.id}, message=message)
        return web.Response(status=204)

    async def _reaction_users(self, request: web.Request) -> web.Response:
        message, key = self._reaction_target(request)
        limit = min(max(int(request.query.get("limit", 25)), 1), 100)
        after = int(request.query.get("after", 0))
        ids = sorted(u for u in message.reactions.get(key, []) if u > after)[:limit]
        return _json_response([self.users[u].to_json() for u in ids if u in self.users])

    # ----------------------------------------------------------------- REST: interactions and webhooks

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        interaction = self._interactions.get(int(request.match_info["interaction_id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            raise _unknown("interaction", 10062)
        body, uploads = await self._read_body(request)
        if interaction.callbacks:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        elapsed = asyncio.get_running_loop().time() - interaction.created_at
        if elapsed > self.interaction_deadline:
            self._record(
                "interaction_expired",
                {"interaction_id": interaction.id, "elapsed": elapsed},
                interaction=interaction,
            )
            raise _unknown("interaction", 10062)
        callback_type = body.get("type")
        if callback_type not in KNOWN_CALLBACKS:
            raise DiscordError.form(
                "type", "BASE_TYPE_CHOICES", f"Value must be one of {sorted(KNOWN_CALLBACKS)}."
            )
        data = body.get("data") or {}
        message: FakeMessage | None = None
        if callback_type in (CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE):
            loading = callback_type == CALLBACK_DEFERRED_MESSAGE
            message = self._interaction_message(interaction, data, uploads, loading=loading)
            interaction.original = message
        elif callback_type in (CALLBACK_UPDATE, CALLBACK_DEFERRED_UPDATE):
            if interaction.target is None:
                raise DiscordError(400, 40043, "This interaction type cannot be used with this callback type")
            message = interaction.original = interaction.target
            if callback_type == CALLBACK_UPDATE:
                self._apply_edit(message, data, uploads)
        interaction.callbacks.append(body)
        interaction.callback_delay = elapsed
        if message is not None and callback_type in (CALLBACK_MESSAGE, CALLBACK_DEFERRED_MESSAGE):
            self._emit_message("MESSAGE_CREATE", message)
        elif message is not None and callback_type == CALLBACK_UPDATE:
            self._emit_message("MESSAGE_UPDATE", message)
        self._record(
            "interaction_callback",
            {"interaction_id": interaction.id, "type": callback_type, "data": data},
            message=message,
            interaction=interaction,
        )
        if message is not None and callback_type != CALLBACK_DEFERRED_UPDATE:
            kind = "message_update" if callback_type == CALLBACK_UPDATE else "message_create"
            self._record(
                kind, self._message_json(message, for_rest=False), message=message, interaction=interaction
            )
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        # *trap*: discord.py 2.7 asks with_response=1 and builds its InteractionCallbackResponse from this.
        response: dict[str, Any] = {
            "interaction": {
                "id": str(interaction.id),
                "type": interaction.payload["type"],
                "response_message_loading": callback_type == CALLBACK_DEFERRED_MESSAGE,
                "response_message_ephemeral": bool(message is not None and message.ephemeral),
            }
        }
        if message is not None:
            response["interaction"]["response_message_id"] = str(message.id)
        resource: dict[str, Any] = {"type": callback_type}
        if message is not None and callback_type != CALLBACK_DEFERRED_UPDATE:
            resource["message"] = self._message_json(message)
        response["resource"] = resource
        return _json_response(response)

    async def _webhook_execute(self, request: web.Request) -> web.Response:
        interaction = self._interaction_by_token(
            int(request.match_info["application_id"]), request.match_info["token"]
        )
        if not interaction.callbacks:
            raise _unknown("Webhook", 10015)  # the token only works once the interaction is acknowledged
        body, uploads = await self._read_body(request)
        original = interaction.original
        if (
            original is not None
            and original.flags & FLAG_LOADING
            and interaction.response_type == CALLBACK_DEFERRED_MESSAGE
        ):
            # As on Discord: the first follow-up after a defer replaces the "thinking" message.
            self._apply_edit(original, body, uploads)
            message, kind, event = original, "message_update", "MESSAGE_UPDATE"
        else:
            message = self._interaction_message(interaction, body, uploads, loading=False)
            kind, event = "message_create", "MESSAGE_CREATE"
        interaction.followups.append(message)
        self._emit_message(event, message)
        self._record(
            kind, self._message_json(message, for_rest=False), message=message, interaction=interaction
        )
        if request.query.get("wait") in ("1", "true", "True"):
            return _json_response(self._message_json(message))
        return web.Response(status=204)

    async def _webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._interaction_by_token(
            int(request.match_info["application_id"]), request.match_info["token"]
        )
        wanted = request.match_info["message_id"]
        if wanted == "@original":
            message = interaction.original
        else:
            message = next((m for m in interaction.messages if str(m.id) == wanted), None)
        if message is None or message.deleted:
            raise _unknown("Message", 10008)
        if request.method == "GET":
            return _json_response(self._message_json(message))
        if request.method == "PATCH":
            body, uploads = await self._read_body(request)
            self._apply_edit(message, body, uploads)
            self._emit_message("MESSAGE_UPDATE", message)
            self._record(
                "message_update",
                self._message_json(message, for_rest=False),
                message=message,
                interaction=interaction,
            )
            return _json_response(self._message_json(message))
        if request.method == "DELETE":
            self._delete(message)
            self._record(
                "message_delete", {"id": message.id, "channel_id": message.channel_id}, message=message
            )
            return web.Response(status=204)
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "PATCH", "DELETE"])

    # ----------------------------------------------------------------- CDN

    async def _cdn_file(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if key in self._redirects:
            target, status = self._redirects[key]
            return web.Response(status=status, headers={"Location": target})
        served = self._cdn.get(key)
        if served is None:
            raise web.HTTPNotFound()
        if served.status != 200:
            return web.Response(status=served.status, text="cdn error")
        response = web.StreamResponse(status=200, headers={"Content-Type": served.content_type})
        # One connection per file: a Content-Length that promises more than is sent then ends in an
        # early close (the client sees a truncated body) instead of a connection left hanging.
        response.force_close()
        if served.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = (
                served.content_length if served.content_length is not None else served.total_size
            )
        await response.prepare(request)
        record = request[_RECORD]
        chunk = 64 * 1024
        try:
            body = served.data
            for start in range(0, len(body), chunk):
                await response.write(body[start : start + chunk])
                record.bytes_sent += len(body[start : start + chunk])
            padding = served.total_size - len(body)
            zeros = bytes(chunk)
            while padding > 0:
                piece = zeros[: min(chunk, padding)]
                await response.write(piece)
                record.bytes_sent += len(piece)
                padding -= len(piece)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading: exactly what a size-checking client should do
        return response
