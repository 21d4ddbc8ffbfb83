"""The slash commands of bot/cogs/privacy.py and admin.py through the fake Discord: who may run what
(checked on the bot's side, whatever default_member_permissions says), what they change in the store,
that each is answered or deferred within Discord's 3 s, and when the commands sync."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import discord
from bot_harness import BotWorld
from fake_discord import CLIENT_OPTIONS, FakeInteraction, FakeMessage, FakeUser
from test_feedback.harness import StoreHarness, make_image

from bot.answering import Answerer
from bot.app import SmolcordBot
from bot.cogs.errors import on_app_command_error
from feedback.store import consent as consent_service
from feedback.store import prompts as prompts_service
from smolcord.worker_client import WorkerClient

INTERACTION_DEADLINE_S = 3.0


async def run_command(
    world: BotWorld, name: str, user: FakeUser, options: dict[str, Any] | None = None, **where: Any
) -> tuple[FakeInteraction, FakeMessage]:
    """Invoke a command in the test guild (unless `guild=` says otherwise); its answer once it is there."""
    where.setdefault("guild", world.guild)
    interaction = await world.fake.invoke_command(name, user, options, **where)
    await interaction.wait_callback()
    answer = await interaction.wait_response(timeout=20)
    assert interaction.callback_delay is not None and interaction.callback_delay < INTERACTION_DEADLINE_S
    return interaction, answer


def assert_every_interaction_in_time(world: BotWorld) -> None:
    """Every interaction the bot acknowledged, it acknowledged within 3 s, and none expired."""
    assert not world.fake.actions_of("interaction_expired")
    for action in world.fake.actions_of("interaction_callback"):
        assert action.interaction is not None
        assert action.interaction.callback_delay < INTERACTION_DEADLINE_S, action.interaction.name


@asynccontextmanager
async def restarted(world: BotWorld) -> AsyncIterator[Any]:
    """Stop the world's bot and run a new one on the same fake Discord, data dir and store."""
    await world.bot.close()
    worker = WorkerClient(world.bot.http_session, world.settings.worker_url)
    bot = SmolcordBot(
        settings=world.settings,
        http_session=world.bot.http_session,
        sessions=world.sessions,
        worker=worker,
        answerer=Answerer(settings=world.settings, sessions=world.sessions, worker=worker),
        **CLIENT_OPTIONS,
    )
    async with world.fake.run_client(bot):
        world.bot = bot
        yield bot


def store(world: BotWorld) -> StoreHarness:
    """One harness per world, so the Discord ids it makes up never repeat."""
    if "store" not in world.extra:
        world.extra["store"] = StoreHarness(world.sessions, world.settings)
    return world.extra["store"]


async def record_answered_prompt(
    world: BotWorld, author: FakeUser, *, voter: FakeUser, emoji: str, adapter_version: str | None = None
) -> tuple[prompts_service.RecordedPrompt, int, int]:
    """A stored prompt by `author` in the test guild with one answer that `voter` reacted to."""
    harness = store(world)
    prompt = await harness.prompt(
        "what colour is it?",
        guild_id=world.guild.id,
        channel_id=int(world.channel["id"]),
        author_id=author.id,
        images=[make_image(harness.new_id() % 1000)],
    )
    response_id, [message_id] = await harness.answer(prompt.id, "blue", adapter_version=adapter_version)
    await harness.vote(message_id, voter.id, emoji)
    return prompt, response_id, message_id


# ------------------------------------------------------------------------------ registration


async def test_commands_sync_to_the_dev_guild_with_permission_hints(start_bot):
    async with start_bot() as world:
        registered = {c["name"]: c for c in world.fake.commands[world.guild.id]}
        assert {"privacy", "learning", "smolcord"} <= set(registered)
        assert not world.fake.commands.get(None), "nothing is synced globally on start"
        manage_guild = discord.Permissions(manage_guild=True).value
        assert int(registered["learning"]["default_member_permissions"]) == manage_guild
        assert registered["learning"]["contexts"] == [0]  # guild only
        administrator = discord.Permissions(administrator=True).value
        assert int(registered["smolcord"]["default_member_permissions"]) == administrator
        assert {o["name"] for o in registered["privacy"]["options"]} == {
            "info",
            "opt-out",
            "opt-in",
            "forget-me",
        }
        assert {o["name"] for o in registered["smolcord"]["options"]} == {
            "status",
            "retrain",
            "rollback",
            "sync",
            "canary",
        }
        [canary] = [o for o in registered["smolcord"]["options"] if o["name"] == "canary"]
        assert {o["name"] for o in canary["options"]} == {"promote", "abort"}
        assert (world.settings.data_dir / "commands.sha256").is_file()


async def test_commands_sync_at_start_only_when_their_definitions_changed(start_bot):
    async with start_bot() as world:
        fake = world.fake
        assert len(fake.actions_of("commands_sync")) == 1
        start = fake.mark()
        async with restarted(world):  # same data dir, same definitions: no sync
            assert fake.actions_of("commands_sync") == fake.actions_of("commands_sync")[:1]
            assert fake.mark() > start
        (world.settings.data_dir / "commands.sha256").write_text("0" * 64)  # as if a definition changed
        async with restarted(world):
            synced = await fake.wait_for("commands_sync", since=start)
            assert synced.data["guild_id"] == world.guild.id


async def test_the_bot_is_given_its_answerer_and_loads_its_error_handler_first(start_bot):
    async with start_bot(worker=False) as world:
        bot = world.bot
        # one Answerer (one pacer, one set of limits) for asking and for 🔁, the one given to the bot
        assert bot.get_cog("Chat").answerer is bot.answerer is bot.get_cog("Votes").answerer
        assert bot.answerer.client is bot
        assert next(iter(bot.extensions)) == "bot.cogs.errors"
        # load_extension runs the module afresh: the handler is that module's, not this test's import
        assert bot.tree.on_error.__qualname__ == on_app_command_error.__qualname__
        assert bot.tree.on_error.__module__ == "bot.cogs.errors"
        await bot.unload_extension("bot.cogs.errors")
        assert getattr(bot.tree.on_error, "__func__", None) is discord.app_commands.CommandTree.on_error


# ------------------------------------------------------------------------------ /smolcord


async def test_smolcord_is_for_the_owner_and_admin_ids_not_for_guild_administrators(start_bot):
    async with start_bot() as world:
        fake = world.fake
        carol = fake.add_user("carol")
        fake.add_member(world.guild, carol, permissions=discord.Permissions(administrator=True))
        world.settings.admin_ids.append(world.bob.id)  # the bot reads its settings object live

        for subcommand, options in [
            ("status", None),
            ("retrain", {"dry_run": True}),
            ("rollback", None),
            ("sync", None),
        ]:
            _, answer = await run_command(world, f"smolcord {subcommand}", carol, options)
            assert answer.ephemeral
            assert "Only smolcord's owner and its admins" in answer.content, subcommand
        assert world.bot.registry.versions() == []
        assert not fake.actions_of("commands_sync")[1:], "a refused /smolcord sync synced nothing"

        _, owner_answer = await run_command(world, "smolcord status", fake.owner)
        assert owner_answer.ephemeral and "smolcord status" in owner_answer.content
        _, admin_answer = await run_command(world, "smolcord status", world.bob)
        assert "smolcord status" in admin_answer.content
        assert_every_interaction_in_time(world)


async def test_status_shows_worker_adapter_counts_pairs_needed_and_thumbs_share(start_bot):
    async with start_bot(min_new_pairs=5, gate_min_heldout=3) as world:
        await store(world).learning(world.guild.id)
        await record_answered_prompt(world, world.alice, voter=world.bob, emoji="👍")
        await record_answered_prompt(world, world.alice, voter=world.bob, emoji="👎", adapter_version="v1")
        await record_answered_prompt(world, world.bob, voter=world.alice, emoji="👍", adapter_version="v1")

        _, answer = await run_command(world, "smolcord status", world.fake.owner)
        text = answer.content
        assert "Worker: ✅ ok" in text
        assert "adapter none: the base model" in text
        assert "current **base model**" in text
        assert "3 prompts (3 trainable), 3 answers, 3 votes" in text
        assert "(nightly needs 5: 5 still needed)" in text
        assert "(the gate needs 3: 3 still needed)" in text
        assert "Nightly run: 03:00 UTC" in text
        assert "base 100% (1👍 0👎)" in text
        assert "v1 50% (1👍 1👎)" in text
        assert answer.allowed_mentions == {"parse": []}
        assert_every_interaction_in_time(world)


async def test_status_works_with_the_worker_down(start_bot):
    async with start_bot(worker=False, train_at="off") as world:
        _, answer = await run_command(world, "smolcord status", world.fake.owner)
        assert "Worker: ❌ down" in answer.content
        assert "Nightly run: off" in answer.content
        assert "👍 share: no votes yet" in answer.content


async def test_smolcord_sync_dev_guild_for_admins_global_for_the_owner_only(start_bot):
    async with start_bot() as world:
        fake = world.fake
        world.settings.admin_ids.append(world.bob.id)
        start = fake.mark()
        _, answer = await run_command(world, "smolcord sync", world.bob)
        assert f"dev guild ({world.guild.id})" in answer.content
        synced = await fake.wait_for("commands_sync", since=start)
        assert synced.data["guild_id"] == world.guild.id

        _, refused = await run_command(world, "smolcord sync", world.bob, {"globally": True})
        assert "Only the application's owner" in refused.content
        assert not fake.commands.get(None)

        _, answer = await run_command(world, "smolcord sync", fake.owner, {"globally": True})
        assert "every server" in answer.content
        assert {c["name"] for c in fake.commands[None]} >= {"privacy", "learning", "smolcord"}
        assert_every_interaction_in_time(world)


# ------------------------------------------------------------------------------ /learning


async def test_learning_needs_manage_server_or_a_bot_admin_and_changes_the_consent(start_bot):
    async with start_bot() as world:
        fake, guild = world.fake, world.guild

        async def consent() -> consent_service.GuildConsent:
            return await store(world).call(
                consent_service.get_guild_settings, settings=world.settings, guild_id=guild.id
            )

        _, refused = await run_command(world, "learning on", world.bob)
        assert refused.ephemeral and "Manage Server" in refused.content
        assert (await consent()).explicit is False

        carol = fake.add_user("carol")
        fake.add_member(guild, carol, permissions=discord.Permissions(manage_guild=True))
        _, answer = await run_command(world, "learning on", carol)
        assert not answer.ephemeral, "the server sees when learning goes on"
        assert "Learning is now **on**" in answer.content
        assert (await consent()).learning is True

        world.settings.admin_ids.append(world.bob.id)  # bob has no Manage Server, but is a bot admin
        _, answer = await run_command(world, "learning off", world.bob)
        assert "Learning is now **off**" in answer.content
        assert (await consent()).learning is False

        world.settings.admin_ids.remove(world.bob.id)
        _, refused = await run_command(world, "learning on", world.bob)
        assert "Manage Server" in refused.content
        assert (await consent()).learning is False

        # Registered as guild-only, but a DM still gets a refusal from the bot itself.
        await world.bot.sync_commands(None)
        _, refused = await run_command(world, "learning on", fake.owner, guild=None)
        assert "only works in a server" in refused.content
        assert_every_interaction_in_time(world)


async def test_learning_voter_role(start_bot):
    async with start_bot() as world:
        fake, guild = world.fake, world.guild
        # add_member(permissions=...) gives dave a role of his own ("dave's permissions"): our voter role.
        dave = fake.add_user("dave")
        fake.add_member(guild, dave, permissions=discord.Permissions.none())
        role_id = int(guild.role("dave's permissions")["id"])
        await fake.flush()

        _, refused = await run_command(world, "learning voter-role", world.alice, {"role": role_id})
        assert "Manage Server" in refused.content

        _, answer = await run_command(world, "learning voter-role", fake.owner, {"role": role_id})
        assert f"<@&{role_id}>" in answer.content
        assert answer.mentions == [] and answer.allowed_mentions == {"parse": []}
        consent = await store(world).call(
            consent_service.get_guild_settings, settings=world.settings, guild_id=guild.id
        )
        assert consent.voter_role_id == role_id

        _, answer = await run_command(world, "learning voter-role", fake.owner)
        assert "everyone's" in answer.content
        consent = await store(world).call(
            consent_service.get_guild_settings, settings=world.settings, guild_id=guild.id
        )
        assert consent.voter_role_id is None


# ------------------------------------------------------------------------------ /privacy


async def test_privacy_info_says_what_why_and_how_long(start_bot):
    async with start_bot(retention_days=30) as world:
        _, answer = await run_command(world, "privacy info", world.alice)
        assert answer.ephemeral
        for words in ("What smolcord stores", "**Why**", "30 days", "learning is **off** in this server"):
            assert words in answer.content
        await world.bot.sync_commands(None)  # DMs see global commands only
        _, answer = await run_command(world, "privacy info", world.alice, guild=None)
        assert "nothing from DMs ever reaches training" in answer.content


async def test_opt_out_and_opt_in_change_the_store(start_bot):
    async with start_bot() as world:
        harness = store(world)
        _, answer = await run_command(world, "privacy opt-out", world.alice)
        assert answer.ephemeral and "never reach training" in answer.content
        assert (
            await harness.call(consent_service.get_user_status, user_id=world.alice.id)
            == consent_service.OPTED_OUT
        )
        _, answer = await run_command(world, "privacy opt-out", world.alice)
        assert "already" in answer.content

        _, answer = await run_command(world, "privacy info", world.alice)
        assert "you opted out" in answer.content

        await world.bot.sync_commands(None)  # DMs see global commands only
        _, answer = await run_command(world, "privacy opt-in", world.alice, guild=None)
        assert "may help train" in answer.content
        assert await harness.call(consent_service.get_user_status, user_id=world.alice.id) is None

        def broken_store() -> Any:
            raise RuntimeError("the database went away")

        world.bot.sessions = broken_store  # the one error handler answers, briefly and privately
        _, answer = await run_command(world, "privacy opt-out", world.alice)
        assert answer.ephemeral and "Something went wrong on my side" in answer.content
        assert "database" not in answer.content
        assert_every_interaction_in_time(world)


async def test_forget_me_deletes_only_after_the_click_even_after_a_restart(start_bot):
    async with start_bot() as world:
        fake, harness = world.fake, store(world)
        alice_prompt, _, _ = await record_answered_prompt(world, world.alice, voter=world.alice, emoji="👍")
        bob_prompt, _, bob_answer = await record_answered_prompt(
            world, world.bob, voter=world.alice, emoji="👎"
        )
        await harness.vote(bob_answer, world.bob.id, "👍")

        _, ask = await run_command(world, "privacy forget-me", world.alice)
        assert ask.ephemeral and "cannot be undone" in ask.content
        confirm = f"smolcord:forget:confirm:{world.alice.id}"
        cancel = f"smolcord:forget:cancel:{world.alice.id}"
        assert await harness.call(
            prompts_service.get_prompt, settings=world.settings, prompt_id=alice_prompt.id
        )

        stranger = await fake.click(ask, confirm, world.bob)  # not bob's to press
        assert "not yours" in (await stranger.wait_response()).content
        cancelled = await fake.click(ask, cancel, world.alice)
        await cancelled.wait_callback()
        assert "nothing was deleted" in ask.content and ask.get("components") == []
        assert await harness.call(consent_service.get_user_status, user_id=world.alice.id) is None

        _, ask = await run_command(world, "privacy forget-me", world.alice)

        # A restart between the question and the click: the button still works (persistent view).
        async with restarted(world):
            clicked = await fake.click(ask, confirm, world.alice)
            await clicked.wait_callback()
            assert clicked.deferred and clicked.callback_delay < INTERACTION_DEADLINE_S
            await fake.wait_for("message_update", lambda a: "Done." in a.data["content"], timeout=10)
            assert "deleted 1 questions, 1 answers and 2 votes" in ask.content
            assert ask.get("components") == []

        assert (
            await harness.call(consent_service.get_user_status, user_id=world.alice.id)
            == consent_service.FORGOTTEN
        )
        alice_left = await harness.sql("SELECT count(*) FROM prompts WHERE author_id = :a", a=world.alice.id)
        alice_votes = await harness.sql("SELECT count(*) FROM reactions WHERE user_id = :a", a=world.alice.id)
        assert alice_left[0][0] == 0 and alice_votes[0][0] == 0
        # Bob's question, his answer and his own vote stay; only alice's vote on it went.
        kept = await harness.call(
            prompts_service.get_prompt, settings=world.settings, prompt_id=bob_prompt.id
        )
        assert kept.author_id == world.bob.id
        bob_votes = await harness.sql("SELECT count(*) FROM reactions WHERE user_id = :b", b=world.bob.id)
        assert bob_votes[0][0] == 1
