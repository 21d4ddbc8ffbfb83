"""Discord's wire vocabulary as the fake speaks it: opcodes, intents, flags, limits, ids, errors, JSON answers."""

from __future__ import annotations

import datetime
import json
import re
import time
from collections.abc import Mapping
from typing import Any

import discord
from aiohttp import web

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


class Snowflakes:
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


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    # *trap*: discord.py only parses a body whose Content-Type is exactly "application/json";
    # aiohttp's json_response adds "; charset=utf-8", and the client then sees a str instead of a dict.
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def id_of(thing: Any) -> int:
    """An id from an int, a numeric str, a JSON object with "id", or anything with an ``id`` attribute."""
    if isinstance(thing, int):
        return thing
    if isinstance(thing, str):
        return int(thing)
    if isinstance(thing, Mapping):
        return int(thing["id"])
    return int(thing.id)


def permission_value(permissions: Any) -> int:
    return int(getattr(permissions, "value", permissions))


def emoji_key(emoji: Any) -> str:
    """The key the fake stores a reaction under: the unicode emoji itself, or ``name:id`` for custom ones."""
    text = str(emoji).strip("<>")
    match = _CUSTOM_EMOJI.match(text)
    return f"{match.group(2)}:{match.group(3)}" if match else text


def emoji_json(key: str) -> dict[str, Any]:
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
        return json_response(body, status=self.status)

    @classmethod
    def form(cls, field_name: str, code: str, message: str) -> DiscordError:
        errors = {field_name: {"_errors": [{"code": code, "message": message}]}}
        return cls(400, 50035, "Invalid Form Body", errors)


def unknown(what: str, code: int) -> DiscordError:
    return DiscordError(404, code, f"Unknown {what}")
