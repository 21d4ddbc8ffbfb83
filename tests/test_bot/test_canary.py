"""The canary rollout through Discord: the real bot against FakeDiscord and the real worker serving
two versions, the registry on disk and the store (bot/rollout.py, cogs/admin.py, cogs/training.py).

Who is in the canary is the product's own sticky hash (smolcord.canary.in_canary); the tests pick
their users by it rather than assume which side a fake user id falls on.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from bot_harness import BotWorld
from fake_discord import FakeUser
from test_bot.test_chat import answer_to, ask, fast
from test_bot.test_training_commands import add_version, run_command, save_lora

from bot.rollout import canary_view, decide_canary
from feedback.store import adapters as adapters_service
from feedback.store import canary as canary_service
from feedback.store import reactions as reactions_service
from feedback.store import responses as responses_service
from feedback.store.votes import REGENERATE, THUMBS_DOWN, THUMBS_UP
from smolcord.canary import in_canary

pytestmark = pytest.mark.timeout(120)


def footer_version(message: Any) -> str:
    """The version the footer names (`-# smolcord <version> · ...`)."""
    return message.content.splitlines()[-1].split()[2]


async def start_canary(world: BotWorld, tiny_engine: Any, tmp_path: Any) -> tuple[str, str]:
    """v1 current and v2 in canary, as a training run leaves them: registry, store and worker."""
    registry = world.bot.registry
    v1 = add_version(registry, save_lora(tiny_engine, tmp_path / "lora1", seed=1))
    with registry.new_version() as staged:
        save_lora(tiny_engine, staged.path, seed=2)
    v2 = str(staged.version)
    registry.start_canary(v2, expected_current=v1)
    async with world.sessions() as session:
        await adapters_service.record_adapter(session, version=v1)
        await adapters_service.promote_adapter(session, version=v1)
        await adapters_service.record_adapter(session, version=v2)
        await canary_service.start_canary(
            session, candidate=v2, current=v1, share=world.settings.canary_share
        )
    await world.bot.worker.load_adapter(v1)
    await world.bot.worker.load_adapter(v2, slot="candidate")
    return v1, v2


def split_users(world: BotWorld, candidate: str) -> tuple[FakeUser, FakeUser]:
    """A member in the candidate's arm and one in current's, drawn by the product's hash."""
    inside = outside = None
    number = 0
    while inside is None or outside is None:
        user = world.fake.add_user(f"member{number}")
        world.fake.add_member(world.guild, user)
        number += 1
        if in_canary(user.id, candidate, world.settings.canary_share):
            inside = inside or user
        else:
            outside = outside or user
    return inside, outside


def reset_engine(tiny_engine: Any) -> None:
    """The engine is shared by every bot test: back to the base, no candidate."""
    tiny_engine.load_adapter(None, version=None)
    tiny_engine.load_candidate(None, version=None)


async def test_askers_in_and_out_of_the_canary_get_their_versions_sticky_across_questions_and_regenerations(
    start_bot, tiny_engine, tmp_path
) -> None:
    async with start_bot(max_tokens=6, learning_default=True, canary_share=0.5) as world:
        fake = fast(world).fake
        try:
            v1, v2 = await start_canary(world, tiny_engine, tmp_path)
            inside, outside = split_users(world, v2)
            versions: dict[str, list[str]] = {"inside": [], "outside": []}
            answers = {}
            for _ in range(2):  # sticky: the same arm for every question
                for label, user in (("inside", inside), ("outside", outside)):
                    [answer] = await answer_to(world, await ask(world, author=user))
                    versions[label].append(footer_version(answer))
                    answers[label] = answer
            assert versions == {"inside": [v2, v2], "outside": [v1, v1]}

            # 🔁 on the canary arm's answer, pressed by a user outside it, comes from the candidate
            mark = fake.mark()
            await fake.react(answers["inside"], outside, REGENERATE)
            action = await fake.wait_for(
                "reaction_add",
                lambda a: a.data["emoji"] == REGENERATE and a.message.id > answers["inside"].id,
                since=mark,
                timeout=60,
            )
            assert footer_version(action.message) == v2

            # votes land on the arm that answered
            await fake.react(answers["inside"], outside, THUMBS_UP)
            await fake.react(answers["outside"], inside, THUMBS_DOWN)
            for message, version in ((answers["inside"], v2), (answers["outside"], v1)):
                async with world.sessions() as s:
                    response = await responses_service.find_response(s, message_id=message.id)
                    assert response is not None and response.adapter_version == version
            view = await wait_for_arms(world, candidate_rated=1, current_rated=1)
            assert (view.candidate_arm.liked, view.current_arm.liked) == (1, 0)

            # a server without learning is never in the experiment
            async with world.sessions() as s:
                from feedback.store import consent as consent_service

                await consent_service.set_learning(
                    s, settings=world.settings, guild_id=world.guild.id, enabled=False
                )
            world.bot.answerer.router.forget()
            [answer] = await answer_to(world, await ask(world, author=inside))
            assert footer_version(answer) == v1
        finally:
            reset_engine(tiny_engine)


async def wait_for_arms(world: BotWorld, *, candidate_rated: int, current_rated: int) -> Any:
    """The canary's view once the votes are stored (reactions are written as they arrive)."""
    import asyncio

    for _ in range(100):
        view = await canary_view(
            settings=world.settings, registry=world.bot.registry, sessions=world.sessions
        )
        assert view is not None
        if (view.candidate_arm.rated, view.current_arm.rated) == (candidate_rated, current_rated):
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"arms never reached {candidate_rated}/{current_rated}: {view}")


async def test_status_shows_both_arms_and_promote_serves_the_candidate_to_everyone(
    start_bot, tiny_engine, tmp_path
) -> None:
    async with start_bot(max_tokens=6, learning_default=True, canary_share=0.5) as world:
        fast(world)
        try:
            v1, v2 = await start_canary(world, tiny_engine, tmp_path)
            _, status = await run_command(world, "smolcord status", world.fake.owner)
            assert f"Canary: **{v2}**" in status.content
            assert f"candidate {v2}: 0 rated answers" in status.content
            assert f"current {v1}: 0 rated answers" in status.content
            assert "Decision: waiting (min_rated)" in status.content

            _, answer = await run_command(world, "smolcord canary promote", world.fake.owner)
            assert f"{v2} promoted to everyone (admin)" in answer.content
            assert world.bot.registry.current() == v2 and world.bot.registry.candidate() is None
            health = await world.bot.worker.health()
            assert health["adapter"] == v2 and health.get("candidate") is None
            async with world.sessions() as s:
                [record] = await canary_service.canary_history(s)
            assert (record.decision, record.rule, record.decided_by) == (
                "promote",
                "admin",
                world.fake.owner.id,
            )
            inside, outside = split_users(world, v2)
            for user in (inside, outside):
                [reply] = await answer_to(world, await ask(world, author=user))
                assert footer_version(reply) == v2

            _, answer = await run_command(world, "smolcord canary abort", world.fake.owner)
            assert "No canary is running" in answer.content
            _, status = await run_command(world, "smolcord status", world.fake.owner)
            assert f"Canary: none running; the last, {v2} against {v1}, ended **promote** (rule admin)" in (
                status.content
            )
        finally:
            reset_engine(tiny_engine)


async def test_abort_drops_the_candidate_and_everyone_keeps_current(start_bot, tiny_engine, tmp_path) -> None:
    async with start_bot(max_tokens=6, learning_default=True, canary_share=0.5) as world:
        fast(world)
        try:
            v1, v2 = await start_canary(world, tiny_engine, tmp_path)
            _, answer = await run_command(world, "smolcord canary abort", world.fake.owner)
            assert f"{v2} aborted (admin)" in answer.content
            assert world.bot.registry.current() == v1 and world.bot.registry.candidate() is None
            assert (await world.bot.worker.health()).get("candidate") is None
            inside, _ = split_users(world, v2)
            [reply] = await answer_to(world, await ask(world, author=inside))
            assert footer_version(reply) == v1
        finally:
            reset_engine(tiny_engine)


async def test_the_nightly_run_decides_by_live_votes_before_training_and_waits_meanwhile(
    start_bot, tiny_engine, tmp_path
) -> None:
    async with start_bot(max_tokens=6, learning_default=True, canary_share=0.5, canary_min_rated=2) as world:
        fast(world)
        training = world.bot.get_cog("Training")
        try:
            _, v2 = await start_canary(world, tiny_engine, tmp_path)
            assert await training.nightly_run() is None  # waiting: no rated answers, nothing trained
            assert training.last_canary is not None and training.last_canary.decision == "waiting"
            assert world.bot.registry.candidate() == v2

            # live votes: the candidate's answers are liked, current's are not
            inside, outside = split_users(world, v2)
            voters = [world.fake.add_user(f"voter{n}") for n in range(2)]
            for voter in voters:
                world.fake.add_member(world.guild, voter)
            for user, emoji in ((inside, THUMBS_UP), (outside, THUMBS_DOWN)):
                for _ in range(2):
                    [reply] = await answer_to(world, await ask(world, author=user))
                    async with world.sessions() as s:
                        for voter in voters:
                            await reactions_service.set_reaction(
                                s, message_id=reply.id, user_id=voter.id, emoji=emoji
                            )
            # a canary still undecided after SMOLCORD_CANARY_MAX_DAYS is judged by the timeout rule;
            # here the live rule decides: 2 rated answers each, 100% against 0%
            outcome = await decide_canary(
                settings=world.settings,
                registry=world.bot.registry,
                sessions=world.sessions,
                worker=world.bot.worker,
                now=dt.datetime.now(dt.UTC),
            )
            assert outcome is not None
            assert (outcome.decision, outcome.rule) == ("promote", "live"), outcome
            assert outcome.numbers["candidate"]["rated"] == 2 and outcome.numbers["current"]["rated"] == 2
            assert world.bot.registry.current() == v2
            assert (await world.bot.worker.health())["adapter"] == v2
        finally:
            reset_engine(tiny_engine)


async def test_a_restart_mid_canary_resumes_it(tiny_engine, tmp_path, migrated_db_template) -> None:
    from bot_harness import running_bot

    first = tmp_path / "first"
    options = {"max_tokens": 6, "learning_default": True, "canary_share": 0.5}
    async with running_bot(
        engine=tiny_engine, tmp_path=first, db_template=migrated_db_template, **options
    ) as world:
        try:
            v1, v2 = await start_canary(world, tiny_engine, tmp_path)
            data_dir = world.settings.data_dir
        finally:
            reset_engine(tiny_engine)
    # A new bot and a new worker (serving what the registry names, as `smolcord worker` does at start)
    # on the same data dir: the canary is still there, from disk and the store alone.
    async with running_bot(
        engine=tiny_engine, tmp_path=tmp_path / "second", db_template=migrated_db_template,
        data_dir=data_dir, worker_settings={"data_dir": data_dir}, **options,
    ) as world:  # fmt: skip
        fast(world)
        try:
            await world.bot.worker.load_adapter(world.bot.registry.current())
            await world.bot.worker.load_adapter(world.bot.registry.candidate(), slot="candidate")
            assert (await world.bot.worker.health())["candidate"] == v2
            view = await canary_view(
                settings=world.settings, registry=world.bot.registry, sessions=world.sessions
            )
            assert view is not None and (view.candidate, view.current) == (v2, v1)
            async with world.sessions() as s:
                [record] = await canary_service.canary_history(s)
            assert record.id == view.record.id and record.decision is None  # the same canary, undecided
            inside, outside = split_users(world, v2)
            [reply] = await answer_to(world, await ask(world, author=inside))
            assert footer_version(reply) == v2
            [reply] = await answer_to(world, await ask(world, author=outside))
            assert footer_version(reply) == v1
        finally:
            reset_engine(tiny_engine)


async def test_with_the_canary_off_everyone_gets_current(start_bot, tiny_engine, tmp_path) -> None:
    async with start_bot(max_tokens=6, learning_default=True, canary_share=0.5, canary=False) as world:
        fast(world)
        try:
            v1, v2 = await start_canary(world, tiny_engine, tmp_path)
            inside, _ = split_users(world, v2)
            [reply] = await answer_to(world, await ask(world, author=inside))
            assert footer_version(reply) == v1
        finally:
            reset_engine(tiny_engine)
