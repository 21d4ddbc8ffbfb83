"""Votes: reactions on answers reach the store, 🔁 makes comparable answers, deletions and clears are honoured."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select
from test_bot.test_chat import answer_to, ask, fast, replies_to, stored_prompts

from feedback.store import consent as consent_service
from feedback.store import prompts as prompts_service
from feedback.store import responses as responses_service
from feedback.store import stats as stats_service
from feedback.store.export import export
from feedback.store.models import Reaction
from feedback.store.pairs import build_pairs
from feedback.store.votes import REGENERATE

pytestmark = pytest.mark.timeout(60)


async def stored_votes(world: Any) -> set[tuple[int, str]]:
    """(user, emoji) of every stored reaction."""
    async with world.sessions() as s:
        return {(r.user_id, r.emoji) for r in await s.scalars(select(Reaction))}


async def votes_become(world: Any, expected: set[tuple[int, str]], wait_s: float = 5) -> None:
    """Wait until the stored reactions are `expected` (events are handled asynchronously)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while (votes := await stored_votes(world)) != expected:
        assert asyncio.get_running_loop().time() < deadline, votes
        await asyncio.sleep(0.05)


async def settle(world: Any) -> None:
    """Let the bot handle what was sent (a marker action: the bot answers a hint to an empty mention)."""
    marker = await world.fake.send_message(world.channel, world.bob, world.mention())
    await replies_to(world, marker)


async def test_votes_follow_reactions_on_any_chunk(start_bot) -> None:
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        question = await ask(world)
        [answer] = await answer_to(world, question)
        alice, bob = world.alice, world.bob

        await fake.react(answer, alice, "👍")
        await fake.react(question, bob, "👍")  # not an answer: ignored
        await fake.react(answer, bob, "😀")  # not a vote: ignored
        await votes_become(world, {(alice.id, "👍")})
        await fake.unreact(answer, alice, "👍")
        await votes_become(world, set())

        # 👍 and 👎 from one user: both stored, a net vote of 0 (and no bot reaction ever is)
        await fake.react(answer, alice, "👍")
        await fake.react(answer, alice, "👎")
        await fake.react(answer, bob, "👎🏽")
        await votes_become(world, {(alice.id, "👍"), (alice.id, "👎"), (bob.id, "👎🏽")})
        async with world.sessions() as s:
            stats = await stats_service.store_stats(s, settings=world.settings)
        [votes] = stats.by_adapter
        assert (votes.adapter_version, votes.up, votes.down) == (None, 0, 1)

        # a moderator clears one emoji, then all reactions: the stored state follows
        await fake.clear_reactions(answer, "👎🏽")
        await votes_become(world, {(alice.id, "👍"), (alice.id, "👎")})
        await fake.clear_reactions(answer)
        await votes_become(world, set())

        # reactions that changed while the bot was not listening are reconciled from REST
        answer.reactions.update({"👍": [alice.id, bob.id], "👎": [fake.bot_user.id]})
        cog = world.bot.get_cog("Votes")  # reconcile() is what on_ready runs once at start
        assert await cog.reconcile() == 1
        assert await stored_votes(world) == {(alice.id, "👍"), (bob.id, "👍")}
        answer.reactions["👍"].remove(bob.id)
        await cog.reconcile()
        assert await stored_votes(world) == {(alice.id, "👍")}

        # after the bot leaves the guild, its late events are not collected
        await fake.leave_guild(world.guild)
        await fake.react(answer, bob, "👎")
        await asyncio.sleep(0.3)
        assert await stored_votes(world) == {(alice.id, "👍")}


async def test_regenerate_makes_a_pair_with_learning_on(start_bot) -> None:
    async with start_bot(max_tokens=8, max_voter_share=1.0, regen_per_hour=1) as world:
        fake = fast(world).fake
        async with world.sessions() as s:
            await consent_service.set_learning(
                s, settings=world.settings, guild_id=world.guild.id, enabled=True
            )
        question = await ask(world)
        [first] = await answer_to(world, question)
        notice = (
            await fake.wait_for("message_create", lambda a: a.data["content"].startswith("ℹ️"), since=0)
        ).message
        assert "**on**" in notice.content and "/privacy opt-out" in notice.content

        mark = fake.mark()
        await fake.react(first, world.alice, REGENERATE)
        action = await fake.wait_for(
            "reaction_add",
            lambda a: a.data["emoji"] == REGENERATE and a.message.id > first.id,
            since=mark,
            timeout=30,
        )
        second = action.message
        assert second.reply_to == first.id and second.content.splitlines()[-1].startswith("-# smolcord")
        async with world.sessions() as s:
            one = await responses_service.find_response(s, message_id=first.id)
            two = await responses_service.find_response(s, message_id=second.id)
        assert one is not None and two is not None and one.prompt_id == two.prompt_id
        assert two.regenerated and two.requested_by == world.alice.id
        assert two.sampling["temperature"] == world.settings.regen_temperature
        assert isinstance(two.sampling["seed"], int)

        # over the hourly 🔁 quota: the user is told, and no answer is generated
        await fake.unreact(first, world.alice, REGENERATE)
        await fake.react(first, world.alice, REGENERATE)
        told = await fake.wait_for("message_create", lambda a: "limit is 1" in a.data["content"], timeout=10)
        assert told.message is not None and told.message.allowed_mentions["parse"] == []

        await fake.react(first, world.alice, "👍")
        await fake.react(second, world.bob, "👎")
        await votes_become(world, {(world.alice.id, "👍"), (world.bob.id, "👎")})
        async with world.sessions() as s:
            pairs = await build_pairs(s, settings=world.settings)
        assert one.text != two.text, "the tiny model wrote the same text twice"
        [pair] = pairs
        assert (pair.chosen_response_id, pair.rejected_response_id) == (one.id, two.id)

        # learning turned off: nothing reaches training any more
        async with world.sessions() as s:
            await consent_service.set_learning(
                s, settings=world.settings, guild_id=world.guild.id, enabled=False
            )
            assert await build_pairs(s, settings=world.settings) == []
            report = await export(s, settings=world.settings, out=world.settings.data_dir / "out.jsonl")
        assert report.rows == 0


async def test_learning_off_records_nothing_trainable(start_bot) -> None:
    async with start_bot(max_tokens=8, max_voter_share=1.0) as world:
        fake = fast(world).fake
        question = await ask(world)
        [first] = await answer_to(world, question)
        await fake.react(first, world.alice, REGENERATE)
        await fake.wait_for(
            "reaction_add", lambda a: a.data["emoji"] == REGENERATE and a.message.id > first.id, timeout=30
        )
        second = fake.messages_in(world.channel, author=fake.bot_user)[-1]
        await fake.react(first, world.alice, "👍")
        await fake.react(second, world.bob, "👎")
        await votes_become(world, {(world.alice.id, "👍"), (world.bob.id, "👎")})
        async with world.sessions() as s:
            prompt = await prompts_service.find_prompt(s, settings=world.settings, message_id=question.id)
            assert prompt is not None and not prompt.trainable and len(prompt.response_ids) == 2
            # even once the server turns learning on, what was asked while off stays out
            await consent_service.set_learning(
                s, settings=world.settings, guild_id=world.guild.id, enabled=True
            )
            assert await build_pairs(s, settings=world.settings) == []
            report = await export(s, settings=world.settings, out=world.settings.data_dir / "out.jsonl")
        assert report.rows == 0


async def test_deleting_questions_and_answers(start_bot) -> None:
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        # a deleted question takes its answers along: records and the bot's messages
        question = await ask(world, "one")
        [answer] = await answer_to(world, question)
        await fake.react(answer, world.bob, "👍")
        await fake.delete_message(question)
        await fake.wait_for("message_delete", lambda a: a.data["id"] == answer.id, timeout=10)
        assert await stored_prompts(world) == 0 and await stored_votes(world) == set()

        # 🗑️ from someone else is ignored; from the asker it deletes the answer and its record
        question = await ask(world, "two")
        [answer] = await answer_to(world, question)
        await fake.react(answer, world.bob, "🗑️")
        await settle(world)
        assert not answer.deleted
        await fake.react(answer, world.alice, "🗑️")
        await fake.wait_for("message_delete", lambda a: a.data["id"] == answer.id, timeout=10)
        async with world.sessions() as s:
            assert await responses_service.find_response(s, message_id=answer.id) is None
            prompt = await prompts_service.find_prompt(s, settings=world.settings, message_id=question.id)
        assert prompt is not None and prompt.response_ids == ()

        # a bulk delete (a moderator's purge) removes what was stored of each message
        question = await ask(world, "three")
        [answer] = await answer_to(world, question)
        await fake.bulk_delete([question, answer])
        for _ in range(100):
            if await stored_prompts(world) == 1:  # "two", whose answer was deleted
                break
            await asyncio.sleep(0.05)
        async with world.sessions() as s:
            assert (
                await prompts_service.find_prompt(s, settings=world.settings, message_id=question.id) is None
            )
            assert await responses_service.find_response(s, message_id=answer.id) is None
