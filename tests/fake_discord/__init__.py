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

The package is one class, `FakeDiscord`, built in layers, one module per job; each layer extends the one
below it, so a module reads only what it imports and nothing imports upwards:

    protocol      Discord's wire vocabulary: opcodes, intents, flags, limits, ids, errors
    records       FakeUser, FakeGuild, FakeMessage, FakeInteraction, Action, RequestRecord
    actions       ActionLog: what the client did, and waiting for it (wait_for, assert_no_action)
    state         State(ActionLog): the world as data, the settings, and the lookups over them
    payloads      Payloads(State): the JSON Discord sends for that world (READY, GUILD_CREATE, messages)
    gateway       Gateway(Payloads): the websocket, IDENTIFY / RESUME, heartbeats, per-session dispatch
    cdn           Cdn(State): attachment files, served honestly or not, and redirects
    world         World(Gateway, Cdn): the test changing the world (guilds, messages, reactions), announced
    rest          Rest(World): HTTP plumbing, injected failures, routes for users, guilds, channels
    messages      Messages(Rest): REST routes for messages and reactions
    commands      Commands(Messages): application command sync
    interactions  Interactions(Commands): slash commands and clicks, callbacks, follow-ups
    server        FakeDiscord(Interactions): the aiohttp server, its route table, run_client

Layers of one class rather than collaborating objects: every job reads and changes the same world and
answers on the same gateway, so the methods keep ``self`` as they were, and a reader meeting
``self._emit(...)`` in world.py knows it is defined below (gateway.py), never above.  All the data is
declared in ``State.__init__`` (the action log in ``ActionLog``); the layers above add behaviour only.
"""

from .protocol import (
    ADMINISTRATOR,
    ALL_PERMISSIONS,
    API_PREFIX,
    ATTACHMENT_SIZE_LIMIT,
    BOT_PERMISSIONS,
    CALLBACK_DEFERRED_MESSAGE,
    CALLBACK_DEFERRED_UPDATE,
    CALLBACK_MESSAGE,
    CALLBACK_UPDATE,
    CHANNEL_DM,
    CHANNEL_PUBLIC_THREAD,
    CHANNEL_TEXT,
    CLIENT_OPTIONS,
    DISCORD_EPOCH_MS,
    EDITABLE_FLAGS,
    EVERYONE_PERMISSIONS,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FLAG_SUPPRESS_EMBEDS,
    FLAG_SUPPRESS_NOTIFICATIONS,
    INTENT_DIRECT_MESSAGE_REACTIONS,
    INTENT_DIRECT_MESSAGES,
    INTENT_GUILD_MEMBERS,
    INTENT_GUILD_MESSAGE_REACTIONS,
    INTENT_GUILD_MESSAGES,
    INTENT_GUILD_PRESENCES,
    INTENT_GUILDS,
    INTENT_MESSAGE_CONTENT,
    INTERACTION_COMMAND,
    INTERACTION_COMPONENT,
    KNOWN_CALLBACKS,
    MAX_CONTENT,
    MESSAGE_CHAT_INPUT,
    MESSAGE_DEFAULT,
    MESSAGE_REPLY,
    NON_RESUMABLE_CLOSE_CODES,
    OP_DISPATCH,
    OP_HEARTBEAT,
    OP_HEARTBEAT_ACK,
    OP_HELLO,
    OP_IDENTIFY,
    OP_INVALID_SESSION,
    OP_PRESENCE,
    OP_REQUEST_MEMBERS,
    OP_RESUME,
    PRIVILEGED_INTENTS,
    DiscordError,
    snowflake_time,
)
from .records import (
    Action,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    FakeUser,
    RequestRecord,
)
from .server import FakeDiscord, patch_discord_urls

__all__ = [
    "ADMINISTRATOR",
    "ALL_PERMISSIONS",
    "API_PREFIX",
    "ATTACHMENT_SIZE_LIMIT",
    "BOT_PERMISSIONS",
    "CALLBACK_DEFERRED_MESSAGE",
    "CALLBACK_DEFERRED_UPDATE",
    "CALLBACK_MESSAGE",
    "CALLBACK_UPDATE",
    "CHANNEL_DM",
    "CHANNEL_PUBLIC_THREAD",
    "CHANNEL_TEXT",
    "CLIENT_OPTIONS",
    "DISCORD_EPOCH_MS",
    "EDITABLE_FLAGS",
    "EVERYONE_PERMISSIONS",
    "FLAG_EPHEMERAL",
    "FLAG_LOADING",
    "FLAG_SUPPRESS_EMBEDS",
    "FLAG_SUPPRESS_NOTIFICATIONS",
    "INTENT_DIRECT_MESSAGES",
    "INTENT_DIRECT_MESSAGE_REACTIONS",
    "INTENT_GUILDS",
    "INTENT_GUILD_MEMBERS",
    "INTENT_GUILD_MESSAGES",
    "INTENT_GUILD_MESSAGE_REACTIONS",
    "INTENT_GUILD_PRESENCES",
    "INTENT_MESSAGE_CONTENT",
    "INTERACTION_COMMAND",
    "INTERACTION_COMPONENT",
    "KNOWN_CALLBACKS",
    "MAX_CONTENT",
    "MESSAGE_CHAT_INPUT",
    "MESSAGE_DEFAULT",
    "MESSAGE_REPLY",
    "NON_RESUMABLE_CLOSE_CODES",
    "OP_DISPATCH",
    "OP_HEARTBEAT",
    "OP_HEARTBEAT_ACK",
    "OP_HELLO",
    "OP_IDENTIFY",
    "OP_INVALID_SESSION",
    "OP_PRESENCE",
    "OP_REQUEST_MEMBERS",
    "OP_RESUME",
    "PRIVILEGED_INTENTS",
    "Action",
    "DiscordError",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeMessage",
    "FakeUser",
    "RequestRecord",
    "patch_discord_urls",
    "snowflake_time",
]
