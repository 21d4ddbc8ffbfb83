"""The whole loop, as a server lives it: consent, questions about images, votes, 🔁, retraining, the
candidate in canary, an admin promoting it, the new adapter answering, rollback.

Everything is real but Discord: the discord.py client against FakeDiscord, the worker on the tiny
model, a SQLite file, and `/smolcord retrain` running the real `python -m smolcord train` child
process, which trains, gates, puts v1 in canary through the registry and tells the worker to serve
it beside current; `/smolcord canary promote` then serves it to everyone.
The gate is opened wide (one held-out pair, a margin of -1): a handful of votes on a random tiny
model cannot show a real improvement, and what is under test here is the plumbing between the
parts (the gate has tests of its own in tests/test_feedback/test_training/test_train.py).
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import discord
import pytest
from bot_harness import BotWorld, running_bot
from fake_discord import FakeMessage, FakeUser
from PIL import Image
from sqlalchemy import func, select
from test_bot.test_chat import answer_to, fast
from test_bot.test_training_commands import run_command

from bot.nightly import training_readiness
from feedback.store.models import Reaction
from feedback.store.votes import REGENERATE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COLOURS = "red green blue yellow purple orange white black cyan magenta pink brown".split()
TRAIN_PAIRS_NEEDED = 4  # the job's min_train_pairs: with fewer it trains nothing


def solid_png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buffer, "PNG")
    return buffer.getvalue()


async def ask(
    world: BotWorld, user: FakeUser, colour: str, question: str = "what colour is this?"
) -> FakeMessage:
    attachment = world.fake.attachment(f"{colour}.png", solid_png(colour))
    return await world.fake.send_message(
        world.channel, user, f"{world.mention()} {question}", attachments=[attachment]
    )


def footer_version(answer: FakeMessage) -> str:
    last = answer.content.splitlines()[-1]
    assert last.startswith("-# smolcord "), answer.content
    return last.removeprefix("-# smolcord ").split(" ", 1)[0]


async def regenerate(world: BotWorld, answer: FakeMessage, user: FakeUser) -> FakeMessage:
    """🔁 on `answer`: another answer to the same prompt, sampled."""
    mark = world.fake.mark()
    await world.fake.react(answer, user, REGENERATE)
    action = await world.fake.wait_for(
        "reaction_add",
        lambda a: (
            a.data["emoji"] == REGENERATE and a.message.id > answer.id and a.message.reply_to == answer.id
        ),
        since=mark,
        timeout=30,
    )
    return action.message


async def stored_votes(world: BotWorld) -> int:
    async with world.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Reaction)) or 0)


async def wait_for_votes(world: BotWorld, count: int) -> None:
    for _ in range(200):
        if await stored_votes(world) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {await stored_votes(world)} of {count} votes were stored")


async def test_consent_votes_retrain_promote_serve_and_roll_back(tiny_engine, tmp_path, migrated_db_template):
    async with running_bot(
        engine=tiny_engine,
        tmp_path=tmp_path,
        db_template=migrated_db_template,
        max_tokens=8,
        max_voter_share=1.0,  # two voters here; the default cap is for real servers
        regen_per_hour=100,
        heldout_fraction=0.3,
        gate_min_heldout=1,
        gate_margin=-1.0,
        gate_confidence=0.0,  # the loop must promote whatever trained: the gate has tests of its own
        min_new_pairs=1,
    ) as world:
        fake = fast(world).fake
        try:
            await _the_loop(world, fake)
        finally:
            tiny_engine.load_adapter(None, version=None)  # the engine is shared by every test in the session


async def _the_loop(world: BotWorld, fake: Any) -> None:
    alice, bob, owner = world.alice, world.bob, fake.owner

    # ---- a server admin (Manage Server, not a bot admin) turns learning on
    carol = fake.add_user("carol")
    fake.add_member(world.guild, carol, permissions=discord.Permissions(manage_guild=True))
    _, answer = await run_command(world, "learning on", carol)
    assert "Learning is now **on**" in answer.content

    # ---- users ask about images, 🔁 for a second answer, 👍 one and 👎 the other
    votes = 0
    for colour in COLOURS:
        question = await ask(world, alice, colour)
        [first] = await answer_to(world, question)
        assert footer_version(first) == "base"
        second = await regenerate(world, first, bob)
        await fake.react(first, alice, "👍")
        await fake.react(second, bob, "👎")
        votes += 2
        await wait_for_votes(world, votes)
        readiness = await training_readiness(world.sessions, world.settings)
        if readiness.heldout_pairs >= 1 and readiness.pairs - readiness.heldout_pairs >= TRAIN_PAIRS_NEEDED:
            break
    else:
        raise AssertionError(f"too few pairs after {len(COLOURS)} prompts: {readiness}")

    _, status = await run_command(world, "smolcord status", owner)
    assert f"Pairs: {readiness.pairs}, of which {readiness.new_pairs} new" in status.content

    # ---- a bot admin retrains: the real training job, in a child process
    _, started = await run_command(world, "smolcord retrain", owner)
    assert "Started" in started.content, started.content
    verdict = await fake.wait_for(
        "message_update",
        lambda a: (
            a.message is not None
            and "Training run" in a.message.content
            and any(
                word in a.data.get("content", "")
                for word in ("promoted", "canary", "rejected", "failed", "skipped")
            )
        ),
        timeout=180,
        since=0,
    )
    report = verdict.message
    # SMOLCORD_CANARY is on by default: the gated candidate first serves a share of users
    assert "🐤 **canary**: v1" in report.content and "in canary for 20% of users" in report.content, (
        report.content
    )
    assert "the worker serves v1 beside current now" in report.content
    assert [name for name, _ in report.files] == ["v1-report.png"]
    assert world.bot.registry.current() is None and world.bot.registry.candidate() == "v1"
    assert (await world.bot.worker.health())["candidate"] == "v1"
    _, status = await run_command(world, "smolcord status", owner)
    assert "Canary: **v1**" in status.content and "Decision: waiting (min_rated)" in status.content

    # ---- the admin does not wait for the live votes: promote now
    _, decided = await run_command(world, "smolcord canary promote", owner)
    assert "v1 promoted to everyone (admin)" in decided.content, decided.content
    assert world.bot.registry.current() == "v1" and world.bot.registry.candidate() is None

    # ---- the new adapter is served: /health, /smolcord status and the answers' footer name it
    assert (await world.bot.worker.health())["adapter"] == "v1"
    _, status = await run_command(world, "smolcord status", owner)
    assert "(adapter v1)" in status.content and "current **v1**" in status.content
    [later] = await answer_to(world, await ask(world, bob, "grey", "and this one?"))
    assert footer_version(later) == "v1"

    # ---- an admin rolls back: the base model answers again
    _, rolled = await run_command(world, "smolcord rollback", owner)
    assert "Rolled back from v1 to **the base model**" in rolled.content, rolled.content
    assert "The worker serves the base model now." in rolled.content
    assert world.bot.registry.current() is None
    assert (await world.bot.worker.health())["adapter"] is None
    [after] = await answer_to(world, await ask(world, alice, "navy", "and now?"))
    assert footer_version(after) == "base"
