"""The fake Discord speaks enough REST and gateway for the real discord.py client, traps included."""

import asyncio
import gc
import io
import threading
import warnings
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from fake_discord import CLIENT_OPTIONS, FakeDiscord, FakeGuild, FakeUser

pytestmark = pytest.mark.timeout(30)


def make_client() -> discord.Client:
    return discord.Client(intents=discord.Intents.default(), **CLIENT_OPTIONS)


def world(fake: FakeDiscord) -> tuple[FakeUser, FakeGuild, dict[str, Any]]:
    """alice owns guild "Test" (channels general and random, role Mods); returns alice, it, general."""
    alice = fake.add_user("alice")
    guild = fake.add_guild("Test", owner=alice, channels=["general", "random"], roles=["Mods"])
    return alice, guild, guild.channel("general")


async def next_matching(queue: asyncio.Queue, check: Any = lambda _: True, timeout: float = 5.0) -> Any:  # noqa: ASYNC109
    """The next item the client's handlers queued that passes ``check``, skipping the others."""

    async def find() -> Any:
        while True:
            item = await queue.get()
            if check(item):
                return item

    return await asyncio.wait_for(find(), timeout)


@pytest.mark.parametrize("kind", ["client", "bot"])
async def test_client_connects_and_sees_its_guild(fake_discord: FakeDiscord, kind: str) -> None:
    alice, guild, _ = world(fake_discord)
    if kind == "client":
        client = make_client()
    else:
        client = commands.Bot(
            command_prefix=commands.when_mentioned, intents=discord.Intents.default(), **CLIENT_OPTIONS
        )
    async with fake_discord.run_client(client):
        assert client.user is not None and client.user.id == fake_discord.bot_user.id
        assert client.application_id == fake_discord.application_id
        [seen] = client.guilds
        assert (seen.id, seen.name, seen.owner_id) == (guild.id, "Test", alice.id)
        assert {c.name for c in seen.text_channels} == {"general", "random"}
        assert "Mods" in {r.name for r in seen.roles} and seen.me is not None
        assert (await client.application_info()).owner.id == fake_discord.owner.id
        if isinstance(client, commands.Bot):
            assert await client.is_owner(await client.fetch_user(fake_discord.owner.id))
            assert not await client.is_owner(await client.fetch_user(alice.id))
        [identify] = fake_discord.actions_of("identify")
        assert identify.data["intents"] == discord.Intents.default().value
        assert identify.data["path"] == "/gateway"
    assert fake_discord.heartbeats >= 1
    assert fake_discord.unhandled == []


async def test_privileged_intent_not_enabled_is_refused(fake_discord: FakeDiscord) -> None:
    world(fake_discord)
    client = discord.Client(intents=discord.Intents.all(), **CLIENT_OPTIONS)
    with pytest.raises(discord.PrivilegedIntentsRequired):
        async with fake_discord.run_client(client):
            pass


async def test_mention_reply_edit_and_reactions(fake_discord: FakeDiscord) -> None:
    alice, _, channel = world(fake_discord)
    client = make_client()
    received: asyncio.Queue[discord.Message] = asyncio.Queue()
    reactions: asyncio.Queue[discord.RawReactionActionEvent] = asyncio.Queue()

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author.bot:
            return
        await received.put(message)
        if client.user in message.mentions and message.attachments:
            data = await message.attachments[0].read()
            reply = await message.reply(
                f"got {len(data)} bytes",
                allowed_mentions=discord.AllowedMentions.none(),
                suppress_embeds=True,
            )
            await reply.edit(content=f"got {len(data)} bytes of {message.attachments[0].filename}")
            for emoji in ("👍", "👎", "🔁"):
                await reply.add_reaction(emoji)

    @client.event
    async def on_raw_reaction_add(payload: discord.RawReactionActionEvent) -> None:
        await reactions.put(payload)

    async with fake_discord.run_client(client):
        image = fake_discord.attachment("cat.png", b"\x89PNG-not-really", width=2, height=2)
        question = await fake_discord.send_message(
            channel, alice, f"{fake_discord.bot_user.mention} what is this?", attachments=[image]
        )
        message = await next_matching(received)
        assert message.content == question.content and message.guild is not None
        assert message.attachments[0].url == image["url"] and message.attachments[0].size == 15

        reply = (await fake_discord.wait_for("message_create")).message
        assert reply is not None and reply.reply_to == question.id
        assert reply.allowed_mentions is not None and reply.allowed_mentions["parse"] == []
        assert not reply.allowed_mentions.get("replied_user") and reply.mentions == []
        assert reply.embeds_suppressed and reply.body and reply.body["flags"] == 1 << 2
        await fake_discord.wait_for("reaction_add", lambda a: a.data["emoji"] == "🔁")
        assert reply.history == ["got 15 bytes", "got 15 bytes of cat.png"]
        assert len(reply.edits) == 1 and reply.content == "got 15 bytes of cat.png"
        assert list(reply.reactions) == ["👍", "👎", "🔁"]
        assert fake_discord.messages_in(channel) == [question, reply]

        # The bot sees its own reactions come back, then a user's, with the member attached.
        own = await next_matching(reactions, lambda p: p.emoji.name == "🔁")
        assert own.user_id == fake_discord.bot_user.id
        await fake_discord.react(reply, alice, "👍")
        theirs = await next_matching(reactions, lambda p: p.user_id == alice.id)
        assert (theirs.message_id, str(theirs.emoji), theirs.message_author_id) == (
            reply.id,
            "👍",
            reply.author_id,
        )
        assert theirs.member is not None and theirs.member.id == alice.id
        assert reply.reactors("👍") == [fake_discord.bot_user.id, alice.id]
        fetched = await message.channel.fetch_message(reply.id)
        assert {str(r.emoji): (r.count, r.me) for r in fetched.reactions}["👍"] == (2, True)
        assert {u.id async for u in fetched.reactions[0].users()} == {fake_discord.bot_user.id, alice.id}

        # Without the message content intent, a message that does not mention the bot comes empty,
        # and so does a reply to the bot whose author turned the ping off.
        chatter = await fake_discord.send_message(channel, alice, "just chatting")
        assert (await next_matching(received, lambda m: m.id == chatter.id)).content == ""
        quiet = await fake_discord.send_message(
            channel, alice, "and another thing", reference=reply, mention_author=False
        )
        quiet_seen = await next_matching(received, lambda m: m.id == quiet.id)
        assert quiet_seen.content == "" and quiet_seen.reference is not None
        assert quiet_seen.reference.message_id == reply.id
        pinged = await fake_discord.send_message(channel, alice, "follow-up", reference=reply)
        assert (await next_matching(received, lambda m: m.id == pinged.id)).content == "follow-up"


async def test_slash_commands_sync_defer_followup_and_attachment(fake_discord: FakeDiscord) -> None:
    alice, guild, channel = world(fake_discord)
    client = make_client()
    tree = app_commands.CommandTree(client)
    response_ids: dict[str, int | None] = {}

    @tree.command(name="ask", description="Ask about an image")
    async def ask(interaction: discord.Interaction, image: discord.Attachment, question: str) -> None:
        await interaction.response.defer()
        data = await image.read()
        await interaction.followup.send(
            f"{question}: {image.filename} ({len(data)} bytes)",
            allowed_mentions=discord.AllowedMentions.none(),
        )

    @tree.command(name="ping", description="Ping the bot")
    async def ping(interaction: discord.Interaction) -> None:
        response = await interaction.response.send_message("pong")
        response_ids["ping"] = response.message_id if response else None
        await interaction.followup.send("and a follow-up", ephemeral=True)

    async def setup_hook() -> None:
        tree.copy_global_to(guild=discord.Object(guild.id))
        await tree.sync(guild=discord.Object(guild.id))

    client.setup_hook = setup_hook  # type: ignore[method-assign]

    async with fake_discord.run_client(client):
        [sync] = fake_discord.actions_of("commands_sync")
        assert sync.data["guild_id"] == guild.id
        assert {c["name"] for c in fake_discord.commands[guild.id]} == {"ask", "ping"}
        assert fake_discord.command("ask", guild=guild)["options"][0]["type"] == 11

        image = fake_discord.attachment("dog.jpg", b"JFIF" * 10)
        asked = await fake_discord.invoke_command(
            "ask", alice, {"image": image, "question": "what breed"}, guild=guild
        )
        assert (await asked.wait_callback())["type"] == 5
        answer = await asked.wait_response()
        assert answer.content == "what breed: dog.jpg (40 bytes)"
        assert asked.deferred and asked.followups == [answer] and answer.history == ["", answer.content]
        assert answer.allowed_mentions == {"parse": []}
        assert asked.callback_delay is not None and asked.callback_delay < 3
        assert answer in fake_discord.messages_in(channel)

        pinged = await fake_discord.invoke_command(
            "ping", alice, guild=guild, channel=guild.channel("random")
        )
        pong = await pinged.wait_response()
        assert pong.content == "pong" and pong.channel_id == int(guild.channel("random")["id"])
        secret = await pinged.wait_followup()
        assert secret.ephemeral and secret not in fake_discord.messages_in(guild.channel("random"))
        assert response_ids["ping"] == pong.id

        with pytest.raises(LookupError):
            await fake_discord.invoke_command("nope", alice, guild=guild)


class Confirm(discord.ui.View):
    @discord.ui.button(label="Yes", custom_id="confirm:yes", style=discord.ButtonStyle.danger)
    async def yes(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.edit_message(content="forgotten", view=None)


async def test_buttons_user_options_and_original_response_edits(fake_discord: FakeDiscord) -> None:
    alice, guild, _ = world(fake_discord)
    bob = fake_discord.add_user("bob")
    fake_discord.add_member(guild, bob, roles=["Mods"], permissions=discord.Permissions(manage_guild=True))
    client = make_client()
    tree = app_commands.CommandTree(client)

    @tree.command(name="forget", description="Forget me")
    async def forget(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("sure?", view=Confirm(timeout=30), ephemeral=True)
        await interaction.edit_original_response(content="really sure?")
        assert (await interaction.original_response()).content == "really sure?"

    @tree.command(name="whois", description="Describe a member")
    async def whois(interaction: discord.Interaction, member: discord.Member) -> None:
        roles = sorted(r.name for r in member.roles if not r.is_default() and not r.managed)
        manage = interaction.permissions.manage_guild
        await interaction.response.send_message(f"{member.name} {roles[0]} asker_manages={manage}")

    async def setup_hook() -> None:
        tree.copy_global_to(guild=discord.Object(guild.id))
        await tree.sync(guild=discord.Object(guild.id))

    client.setup_hook = setup_hook  # type: ignore[method-assign]
    async with fake_discord.run_client(client):
        asked = await fake_discord.invoke_command("forget", alice, guild=guild)
        prompt = await asked.wait_response()
        await fake_discord.wait_for("message_update", lambda a: a.message is prompt)
        assert prompt.content == "really sure?" and prompt.ephemeral
        clicked = await fake_discord.click(prompt, "confirm:yes", alice)
        assert (await clicked.wait_callback())["type"] == 7
        assert prompt.content == "forgotten" and prompt.data["components"] == []

        described = await fake_discord.invoke_command("whois", bob, {"member": bob}, guild=guild)
        assert (await described.wait_response()).content == "bob Mods asker_manages=True"
        assert fake_discord.permissions_of(guild, alice) == discord.Permissions.all().value  # the owner

        await fake_discord.close_gateway(4000)
        joined = fake_discord.add_guild("Joined later", owner=bob)
        await fake_discord.wait_for("resume")
        for _ in range(100):
            if client.get_guild(joined.id) is not None:
                break
            await asyncio.sleep(0.01)
        assert client.get_guild(joined.id) is not None


async def test_interaction_answered_too_late_is_unknown(fake_discord: FakeDiscord) -> None:
    alice, guild, _ = world(fake_discord)
    fake_discord.interaction_deadline = 0.1
    client = make_client()
    tree = app_commands.CommandTree(client)
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    @tree.command(name="slow", description="Too slow")
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(0.2)
        try:
            await interaction.response.send_message("late")
        except discord.HTTPException as error:
            outcome.set_result(error)
        else:
            outcome.set_result(None)

    async def setup_hook() -> None:
        await tree.sync()

    client.setup_hook = setup_hook  # type: ignore[method-assign]
    async with fake_discord.run_client(client):
        await fake_discord.invoke_command("slow", alice, guild=guild)
        error = await asyncio.wait_for(outcome, 5)
        assert isinstance(error, discord.NotFound) and error.code == 10062


async def test_direct_messages_and_dm_commands(fake_discord: FakeDiscord) -> None:
    bob = fake_discord.add_user("bob")
    client = make_client()
    tree = app_commands.CommandTree(client)

    @tree.command(name="hello", description="Say hello")
    async def hello(interaction: discord.Interaction) -> None:
        kind = type(interaction.channel).__name__
        await interaction.response.send_message(f"hello {interaction.user.name} in {kind}", ephemeral=True)

    @client.event
    async def on_message(message: discord.Message) -> None:
        if not message.author.bot and isinstance(message.channel, discord.DMChannel):
            await message.channel.send(f"hi {message.author.name}: {message.content}")

    async def setup_hook() -> None:
        await tree.sync()

    client.setup_hook = setup_hook  # type: ignore[method-assign]

    async with fake_discord.run_client(client):
        assert [c["name"] for c in fake_discord.commands[None]] == ["hello"]
        dm = fake_discord.dm_channel(bob)
        await fake_discord.send_message(dm, bob, "hello there")
        reply = (await fake_discord.wait_for("message_create")).message
        assert reply is not None and reply.content == "hi bob: hello there"
        assert reply.channel_id == int(dm["id"]) and reply.guild_id is None

        user = await client.fetch_user(bob.id)
        await user.send("a DM the bot started")
        assert fake_discord.messages_in(dm)[-1].content == "a DM the bot started"

        said = await fake_discord.invoke_command("hello", bob)
        answer = await said.wait_response()
        assert answer.content == "hello bob in DMChannel" and answer.ephemeral


async def test_gateway_close_4000_resumes_and_replays(fake_discord: FakeDiscord) -> None:
    alice, _, channel = world(fake_discord)
    client = make_client()
    received: asyncio.Queue[discord.Message] = asyncio.Queue()
    resumed = asyncio.Event()

    @client.event
    async def on_message(message: discord.Message) -> None:
        await received.put(message)

    @client.event
    async def on_resumed() -> None:
        resumed.set()

    async with fake_discord.run_client(client):
        await fake_discord.close_gateway(4000)
        missed = await fake_discord.send_message(
            channel, alice, f"{fake_discord.bot_user.mention} while you were away"
        )
        resume = await fake_discord.wait_for("resume")
        assert resume.data["path"] == "/resume-gateway" and resume.data["replayed"] >= 1
        assert (await next_matching(received)).id == missed.id
        await asyncio.wait_for(resumed.wait(), 5)

        later = await fake_discord.send_message(
            channel, alice, f"{fake_discord.bot_user.mention} still there?"
        )
        assert (await next_matching(received)).content == later.content
        assert fake_discord.identify_count == 1 and fake_discord.resume_count == 1
        assert client.is_ready() and client.get_guild(int(channel["guild_id"])) is not None


async def test_rate_limit_with_via_is_retried_and_without_is_a_ban(fake_discord: FakeDiscord) -> None:
    _, _, channel = world(fake_discord)
    client = make_client()
    async with fake_discord.run_client(client):
        target = client.get_channel(int(channel["id"]))
        assert isinstance(target, discord.TextChannel)
        route = "/channels/{channel_id}/messages"
        fake_discord.rate_limit("POST", route, retry_after=0.05)
        sent = await target.send("hello")
        statuses = [r.status for r in fake_discord.requests if r.method == "POST" and r.route == route]
        assert statuses == [429, 200]
        assert [m.id for m in fake_discord.messages_in(channel)] == [sent.id]

        fake_discord.rate_limit("POST", route, via=False)
        with pytest.raises(discord.HTTPException) as banned:
            await target.send("again")
        assert banned.value.status == 429


async def test_discord_refuses_what_discord_refuses(fake_discord: FakeDiscord) -> None:
    alice, _, channel = world(fake_discord)
    client = make_client()
    async with fake_discord.run_client(client):
        target = client.get_channel(int(channel["id"]))
        assert isinstance(target, discord.TextChannel)
        with pytest.raises(discord.HTTPException) as too_long:
            await target.send("x" * 2001)
        assert too_long.value.code == 50035 and too_long.value.status == 400
        with pytest.raises(discord.HTTPException) as empty:
            await target.send("")
        assert empty.value.code == 50006
        theirs = await fake_discord.send_message(channel, alice, "mine")
        with pytest.raises(discord.Forbidden):
            await target.get_partial_message(theirs.id).edit(content="hijacked")
        fake_discord.fail(
            "PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/{user}", 403, code=50013
        )
        with pytest.raises(discord.Forbidden):
            await target.get_partial_message(theirs.id).add_reaction("👍")
        assert fake_discord.messages_in(channel) == [theirs]


async def test_uploads_typing_and_history(fake_discord: FakeDiscord) -> None:
    alice, _, channel = world(fake_discord)
    client = make_client()
    async with fake_discord.run_client(client):
        target = client.get_channel(int(channel["id"]))
        assert isinstance(target, discord.TextChannel)
        older = await fake_discord.send_message(channel, alice, "older")
        async with target.typing():
            sent = await target.send("a file", file=discord.File(io.BytesIO(b"hello"), filename="note.txt"))
        assert fake_discord.actions_of("typing")
        uploaded = fake_discord.message(sent.id)
        assert (
            uploaded.files == [("note.txt", b"hello")]
            and uploaded.body
            and uploaded.body["content"] == "a file"
        )
        assert await sent.attachments[0].read() == b"hello"
        assert sent.attachments[0].url.startswith(fake_discord.cdn_base)
        assert [m.id async for m in target.history(limit=10)] == [sent.id, older.id]
        assert [m.id async for m in target.history(after=older)] == [sent.id]


async def test_deletes_reaction_clears_and_guild_removal_reach_the_client(fake_discord: FakeDiscord) -> None:
    alice, guild, channel = world(fake_discord)
    client = make_client()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    for name in (
        "raw_message_delete",
        "raw_bulk_message_delete",
        "raw_reaction_remove",
        "raw_reaction_clear",
        "raw_reaction_clear_emoji",
        "guild_remove",
        "raw_message_edit",
    ):

        async def handler(payload: Any, name: str = name) -> None:
            await events.put((name, payload))

        setattr(client, f"on_{name}", handler)

    async with fake_discord.run_client(client):
        first = await fake_discord.send_message(channel, alice, "one")
        second = await fake_discord.send_message(channel, alice, "two")
        third = await fake_discord.send_message(channel, alice, "three")

        await fake_discord.edit_message(first, "one, edited")
        name, edited = await next_matching(events)
        assert name == "raw_message_edit" and edited.message_id == first.id
        await fake_discord.react(first, alice, "👍")
        await fake_discord.unreact(first, alice, "👍")
        name, removed = await next_matching(events)
        assert name == "raw_reaction_remove" and removed.user_id == alice.id and str(removed.emoji) == "👍"
        await fake_discord.react(first, alice, "👎")
        await fake_discord.clear_reactions(first, "👎")
        name, cleared = await next_matching(events)
        assert name == "raw_reaction_clear_emoji" and str(cleared.emoji) == "👎"
        await fake_discord.clear_reactions(first)
        assert (await next_matching(events))[0] == "raw_reaction_clear"

        await fake_discord.delete_message(first)
        name, deleted = await next_matching(events)
        assert name == "raw_message_delete" and deleted.message_id == first.id
        await fake_discord.bulk_delete([second, third])
        name, bulk = await next_matching(events)
        assert name == "raw_bulk_message_delete" and bulk.message_ids == {second.id, third.id}
        assert fake_discord.messages_in(channel) == []

        await fake_discord.leave_guild(guild)
        name, gone = await next_matching(events)
        assert name == "guild_remove" and gone.id == guild.id and client.get_guild(guild.id) is None


async def test_cdn_serves_files_redirects_and_lies(fake_discord: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as http:
        url = fake_discord.cdn_url("a.png", b"abc")
        assert url.startswith(fake_discord.cdn_base)
        async with http.get(url) as response:
            assert response.headers["Content-Type"] == "image/png" and await response.read() == b"abc"

        redirect = fake_discord.redirect_url(url)
        async with http.get(redirect, allow_redirects=False) as response:
            assert response.status == 302 and response.headers["Location"] == url

        huge = fake_discord.cdn_url("big.png", b"\x89PNG", total_size=200 * 1024 * 1024, chunked=True)
        async with http.get(huge) as response:
            assert response.content_length is None
            assert (await response.content.read(4)) == b"\x89PNG"

        lying = fake_discord.cdn_url("small.png", b"x" * 5000, content_length=100)
        async with http.get(lying) as response:
            assert response.content_length == 100 and len(await response.read()) == 100

        short = fake_discord.cdn_url("short.png", b"x" * 100, content_length=10_000)
        async with http.get(short) as response:
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()

        elsewhere = fake_discord.cdn_url("other.png", b"abc", host="localhost")
        assert not elsewhere.startswith(fake_discord.cdn_base)

    served = [r for r in fake_discord.requests if r.path.endswith("/big.png")]
    assert served and served[0].bytes_sent < 200 * 1024 * 1024


async def answer_once(fake: FakeDiscord, user: FakeUser, guild: FakeGuild) -> discord.Client:
    client = make_client()
    tree = app_commands.CommandTree(client)

    @tree.command(name="ping", description="Ping")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        await interaction.followup.send("pong")

    async def setup_hook() -> None:
        await tree.sync()

    client.setup_hook = setup_hook  # type: ignore[method-assign]
    async with fake.run_client(client):
        answered = await fake.invoke_command("ping", user, guild=guild)
        assert (await answered.wait_response()).ephemeral
        await fake.send_message(guild.channel(), user, "bye")
    return client


async def test_client_shuts_down_cleanly(fake_discord: FakeDiscord) -> None:
    alice, guild, _ = world(fake_discord)
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    gc.collect()  # garbage left by earlier tests must not be blamed on this client
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert (await answer_once(fake_discord, alice, guild)).is_closed()
            gc.collect()  # an unclosed aiohttp session would complain here
            await asyncio.sleep(0.05)
        assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
        assert loop_errors == []
    finally:
        loop.set_exception_handler(previous_handler)
    # discord.py means to close with 1000, but its reader task wins aiohttp's close race and sends 4000.
    [disconnect] = fake_discord.actions_of("disconnect")
    assert disconnect.data["by_server"] is None and disconnect.data["code"] in (1000, 4000)
    assert not [t for t in threading.enumerate() if "KeepAlive" in type(t).__name__ and t.is_alive()]
