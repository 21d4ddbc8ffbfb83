"""Privacy through the real bot: quoted history's provenance, deletions that reach every copy,
channel/thread/server removal, /ask with 🗑️, and a consent notice that follows /learning."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update
from test_bot.test_chat import answer_to, ask, fast, png
from test_bot.test_commands import run_command, store
from test_bot.test_votes import votes_become

from bot.consent_notices import ConsentNotices
from feedback.store import consent as consent_service
from feedback.store import prompts as prompts_service
from feedback.store.models import GuildRemoval, utcnow
from feedback.store.pairs import build_pairs
from feedback.store.votes import REGENERATE

pytestmark = pytest.mark.timeout(90)


async def prompt_of(world: Any, message: Any) -> prompts_service.PromptView | None:
    async with world.sessions() as s:
        return await prompts_service.find_prompt(s, settings=world.settings, message_id=message.id)


async def eventually(check: Any, wait_s: float = 10) -> None:
    """Wait until the async `check()` is true (the bot handles events asynchronously)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def texts_stored(world: Any, text: str) -> list[int]:
    """Prompts whose question or history still holds `text`."""
    rows = await store(world).sql("SELECT id, question, history FROM prompts")
    return [row[0] for row in rows if text in row[1] or text in str(row[2])]


def image_files(world: Any) -> set[str]:
    return {path.stem for path in world.settings.images_dir.glob("*/*")}


async def test_a_reply_to_a_question_records_provenance_and_goes_when_the_question_is_deleted(start_bot):
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        question = await ask(world, "alice's secret question")  # with an image
        await answer_to(world, question)
        alice_prompt = await prompt_of(world, question)
        assert alice_prompt is not None
        [alice_image] = [image.sha256 for image in alice_prompt.own_images]
        # bob replies to alice's *question*, not to the bot's answer
        reply = await fake.send_message(
            world.channel, world.bob, f"{world.mention()} and you?", reference=question
        )
        await answer_to(world, reply)
        bob_prompt = await prompt_of(world, reply)
        assert bob_prompt is not None and bob_prompt.history[0]["content"] == "alice's secret question"
        turns = await store(world).sql(
            "SELECT source_prompt_id, author_id, guild_id FROM history_turns WHERE prompt_id = :p",
            p=bob_prompt.id,
        )
        assert turns == [(alice_prompt.id, world.alice.id, world.guild.id)]
        assert alice_image in image_files(world)

        # alice deletes her question: bob's copy of it goes too, with the image file and the bot's answers
        await fake.delete_message(question)
        await eventually(lambda: _none(prompt_of(world, reply)))
        assert await texts_stored(world, "alice's secret") == []
        assert alice_image not in image_files(world)


async def _none(coroutine: Any) -> bool:
    return await coroutine is None


async def test_forget_me_and_opt_out_reach_follow_ups_that_quote_the_user(start_bot):
    async with start_bot(max_tokens=8, max_voter_share=1.0) as world:
        fake = fast(world).fake
        async with world.sessions() as s:
            await consent_service.set_learning(
                s, settings=world.settings, guild_id=world.guild.id, enabled=True
            )
        question = await ask(world, "alice asks")
        [answer] = await answer_to(world, question)
        follow = await fake.send_message(
            world.channel, world.bob, f"{world.mention()} bob goes on", reference=answer
        )
        [first] = await answer_to(world, follow)
        # 🔁 on bob's answer, and votes: a pair from bob's follow-up, whose history quotes alice
        mark = fake.mark()
        await fake.react(first, world.bob, REGENERATE)
        second = (
            await fake.wait_for(
                "reaction_add",
                lambda a: a.data["emoji"] == REGENERATE and a.message.id > first.id,
                since=mark,
                timeout=30,
            )
        ).message
        await fake.react(first, world.bob, "👍")
        await fake.react(second, fake.owner, "👎")
        await votes_become(world, {(world.bob.id, "👍"), (fake.owner.id, "👎")})
        async with world.sessions() as s:
            pairs = await build_pairs(s, settings=world.settings)
        assert first.content != second.content, "the tiny model wrote the same text twice"
        assert [pair.history[0]["content"] for pair in pairs] == ["alice asks"]

        await run_command(world, "privacy opt-out", world.alice)
        async with world.sessions() as s:
            assert await build_pairs(s, settings=world.settings) == []  # not a truncated pair either

        alice_images = {image.sha256 for image in (await prompt_of(world, question)).own_images}
        _, confirm = await run_command(world, "privacy forget-me", world.alice)
        clicked = await fake.click(confirm, f"smolcord:forget:confirm:{world.alice.id}", world.alice)
        await clicked.wait_callback()
        await fake.wait_for("message_update", lambda a: "Done." in a.data["content"], timeout=10)
        assert await prompt_of(world, follow) is None  # bob's follow-up quoted alice: deleted whole
        assert await texts_stored(world, "alice asks") == []
        assert not alice_images & image_files(world)


async def test_channel_and_thread_deletions_take_their_data(start_bot):
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        thread = fake.add_thread(world.channel, "a thread")
        other_thread = fake.add_thread(world.channel, "another")
        in_thread = await fake.send_message(thread, world.alice, f"{world.mention()} in the thread")
        await answer_to(world, in_thread)
        in_other = await fake.send_message(other_thread, world.alice, f"{world.mention()} in the other")
        await answer_to(world, in_other)
        in_channel = await ask(world, "in the channel", images=0)
        await answer_to(world, in_channel)
        recorded = await prompt_of(world, in_thread)
        assert recorded is not None and recorded.channel_id == int(thread["id"])

        await fake.delete_channel(thread)
        await eventually(lambda: _none(prompt_of(world, in_thread)))
        assert await prompt_of(world, in_other) is not None and await prompt_of(world, in_channel) is not None

        await fake.delete_channel(world.channel)  # its remaining thread goes with it
        await eventually(lambda: _none(prompt_of(world, in_channel)))
        assert await prompt_of(world, in_other) is None
        assert await store(world).sql("SELECT count(*) FROM responses") == [(0,)]


async def test_a_removed_servers_data_goes_after_the_grace_period_unless_the_bot_returns(start_bot):
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        question = await ask(world, "before the removal", images=0)
        await answer_to(world, question)
        harness = store(world)

        await fake.leave_guild(world.guild)
        await eventually(lambda: _removals_are(harness, 1))
        [(removed_at, delete_after)] = await harness.sql(
            "SELECT removed_at, delete_after FROM guild_removals"
        )
        assert str(delete_after) > str(removed_at)  # the grace period (7 days by default) is stored
        await fake.rejoin_guild(world.guild)  # invited back within the grace period: nothing is deleted
        await eventually(lambda: _removals_are(harness, 0))
        training = world.bot.get_cog("Training")
        await training.purge()
        assert await prompt_of(world, question) is not None

        await fake.leave_guild(world.guild)
        await eventually(lambda: _removals_are(harness, 1))
        async with world.sessions() as s, s.begin():  # the grace period has passed
            await s.execute(update(GuildRemoval).values(delete_after=utcnow() - timedelta(minutes=1)))
        assert await training.purge() == 1
        assert await prompt_of(world, question) is None
        assert await harness.sql("SELECT count(*) FROM guild_removals") == [(0,)]


async def _removals_are(harness: Any, count: int) -> bool:
    return await harness.sql("SELECT count(*) FROM guild_removals") == [(count,)]


async def test_an_ask_question_goes_when_its_asker_deletes_its_answer(start_bot):
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        image = fake.attachment("cat.png", png())
        interaction = await fake.invoke_command(
            "ask", world.alice, {"image": image, "question": "alice's slash question"}, guild=world.guild
        )
        answer = await interaction.wait_response(timeout=30)
        await fake.wait_for(
            "reaction_add",
            lambda a: a.message.id == answer.id and a.data["emoji"] == REGENERATE,
            since=0,
            timeout=30,
        )
        assert await texts_stored(world, "alice's slash question")
        await fake.react(answer, world.alice, "🗑️")
        await fake.wait_for("message_delete", lambda a: a.data["id"] == answer.id, timeout=10)
        await eventually(lambda: _empty(texts_stored(world, "alice's slash question")))
        assert image_files(world) == set()


async def _empty(coroutine: Any) -> bool:
    return not await coroutine


async def test_the_consent_notice_says_again_when_learning_changes(start_bot):
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake

        def notices() -> list[str]:
            return [m.content for m in fake.messages_in(world.channel) if m.content.startswith("ℹ️")]

        await answer_to(world, await ask(world, "one", images=0))
        await eventually(lambda: _true(len(notices()) == 1))
        await answer_to(world, await ask(world, "two", images=0))
        await run_command(world, "learning on", fake.owner)
        await answer_to(world, await ask(world, "three", images=0))
        await eventually(lambda: _true(len(notices()) == 2))
        await answer_to(world, await ask(world, "four", images=0))
        await asyncio.sleep(0.2)
        said = notices()
        assert len(said) == 2 and "**off**" in said[0] and "**on**" in said[1]


async def _true(value: bool) -> bool:
    return value


async def test_consent_notice_writes_happen_off_the_event_loop(tmp_path, monkeypatch):
    import bot.consent_notices as notices_module

    threads: list[threading.Thread] = []
    write = notices_module.write_json

    def recording(path: Any, data: Any) -> None:
        threads.append(threading.current_thread())
        write(path, data)

    monkeypatch.setattr(notices_module, "write_json", recording)
    notices = ConsentNotices(tmp_path / "consent_notices.json")
    assert notices.due(5, "off")
    await notices.mark(5, "off")
    assert threads and threads[0] is not threading.current_thread()
    again = ConsentNotices(tmp_path / "consent_notices.json")  # kept across a restart
    assert not again.due(5, "off") and again.due(5, "on")
