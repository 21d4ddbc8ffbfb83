"""Limits that count attempts, not successes: the cooldown, the 🔁 quota, bots' reactions, answers in flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from test_bot.test_chat import answer_to, ask, chat_requests, fast, replies_to, stored_prompts
from test_bot.test_votes import settle, stored_votes, votes_become

from feedback.store import responses as responses_service
from feedback.store.votes import REGENERATE

pytestmark = pytest.mark.timeout(60)


class GatedWorker:
    """An OpenAI-compatible server whose answers stream their first words, then wait for `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.chat)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "tiny", "max_model_len": 8192}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.json()
        self.started += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def event(data: dict[str, Any]) -> None:
            await response.write(f"data: {json.dumps(data)}\n\n".encode())

        await event({"model": "tiny", "choices": [{"index": 0, "delta": {"content": "Thinking"}}]})
        await self.release.wait()
        await event({"model": "tiny", "choices": [{"index": 0, "delta": {"content": " done."}}]})
        await event(
            {
                "model": "tiny",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            }
        )
        await response.write(b"data: [DONE]\n\n")
        return response

    async def wait_started(self, count: int) -> None:
        for _ in range(400):
            if self.started >= count:
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"{self.started} answers started, expected {count}")


@contextlib.asynccontextmanager
async def gated_worker() -> AsyncIterator[tuple[GatedWorker, str]]:
    worker = GatedWorker()
    runner = web.AppRunner(worker.app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield worker, f"http://{host}:{port}"
    finally:
        worker.release.set()
        await runner.cleanup()


async def all_done(world: Any) -> None:
    """Wait until no answer is in flight (the slot is let go after the reactions and the notice)."""
    limit = world.bot.answerer.total_inflight
    for _ in range(400):
        if not limit.held(0):
            return
        await asyncio.sleep(0.025)
    raise AssertionError("answers still in flight")


# ------------------------------------------------------------------------------ the cooldown


async def test_a_refused_attachment_spends_the_cooldown(start_bot) -> None:
    async with start_bot(max_tokens=8, cooldown_s=30) as world:
        fake = fast(world).fake
        refused = fake.attachment("notes.txt", b"just text", content_type="text/plain")
        first = await fake.send_message(
            world.channel, world.alice, f"{world.mention()} what is it?", attachments=[refused]
        )
        assert "not an image" in (await replies_to(world, first)).content
        # the bot downloaded and looked at that attachment: the next question waits its turn
        second = await ask(world, "and this one?")
        reply = await replies_to(world, second)
        wait = re.search(r"again in (\d+) s", reply.content)
        assert wait is not None and 20 <= int(wait.group(1)) <= 30, reply.content
        assert await chat_requests(world) == 0 and await stored_prompts(world) == 0


# ------------------------------------------------------------------------------ the 🔁 quota


async def test_regenerations_count_when_asked_for_and_deleting_them_refunds_nothing(start_bot) -> None:
    async with start_bot(max_tokens=8, regen_per_hour=2) as world:
        fake = fast(world).fake
        [first] = await answer_to(world, await ask(world, "one"))
        [other] = await answer_to(world, await ask(world, "two"))

        # two presses at once, on two answers: both are requests, each counted before any await
        mark = fake.mark()
        await asyncio.gather(
            fake.react(first, world.alice, REGENERATE), fake.react(other, world.alice, REGENERATE)
        )
        regenerated = []
        for source in (first, other):
            action = await fake.wait_for(
                "reaction_add",
                lambda a, source=source: a.data["emoji"] == REGENERATE and a.message.reply_to == source.id,
                since=mark,
                timeout=30,
            )
            regenerated.append(action.message)

        # the asker deletes both regenerations with 🗑️: the requests were made, the quota stays spent
        for message in regenerated:
            await fake.react(message, world.alice, "🗑️")
            await fake.wait_for("message_delete", lambda a, m=message: a.data["id"] == m.id, timeout=10)
        async with world.sessions() as s:
            assert all(
                [await responses_service.find_response(s, message_id=m.id) is None for m in regenerated]
            )

        mark = fake.mark()
        await fake.unreact(first, world.alice, REGENERATE)
        await fake.react(first, world.alice, REGENERATE)
        told = await fake.wait_for(
            "message_create", lambda a: "limit is 2" in a.data["content"], since=mark, timeout=10
        )
        assert "asked for 2 other answers" in told.message.content
        # and bob's quota is his own
        await fake.react(other, world.bob, REGENERATE)
        await fake.wait_for(
            "reaction_add",
            lambda a: (
                a.data["emoji"] == REGENERATE
                and a.message.reply_to == other.id
                and a.message.id > regenerated[1].id
            ),
            since=mark,
            timeout=30,
        )


async def test_a_quota_of_one_lets_one_of_two_racing_presses_through(start_bot) -> None:
    async with gated_worker() as (worker, url):
        async with start_bot(worker=False, worker_url=url, regen_per_hour=1) as world:
            fake = fast(world).fake
            questions = [await ask(world, "one"), await ask(world, "two")]
            await worker.wait_started(2)
            worker.release.set()
            answers = [(await answer_to(world, q))[0] for q in questions]
            worker.release.clear()
            mark = fake.mark()
            await asyncio.gather(*(fake.react(a, world.alice, REGENERATE) for a in answers))
            told = await fake.wait_for(
                "message_create", lambda a: "limit is 1" in a.data["content"], since=mark, timeout=10
            )
            assert told.message is not None
            await worker.wait_started(3)
            worker.release.set()
            await settle(world)
            assert worker.started == 3, "both racing presses reached the worker"


# ------------------------------------------------------------------------------ bots' reactions


async def test_reactions_from_other_bots_never_count(start_bot) -> None:
    async with start_bot(max_tokens=8, regen_per_hour=5) as world:
        fake = fast(world).fake
        other_bot = fake.add_user("another-bot", bot=True)
        fake.add_member(world.guild, other_bot)
        question = await ask(world)
        [answer] = await answer_to(world, question)
        await fake.react(answer, other_bot, "👍")
        await fake.react(answer, other_bot, REGENERATE)
        await fake.react(answer, other_bot, "🗑️")
        await fake.react(answer, world.bob, "👎")
        await votes_become(world, {(world.bob.id, "👎")})
        await settle(world)
        assert await chat_requests(world) == 1, "another bot's 🔁 made the bot answer again"
        assert not answer.deleted
        await fake.unreact(answer, other_bot, "👍")
        await fake.unreact(answer, world.bob, "👎")
        await votes_become(world, set())
        # reconciling from Discord's reactions (after downtime) leaves the bot's out too
        await fake.react(answer, other_bot, "👍")
        await fake.react(answer, world.alice, "👍")
        await world.bot.get_cog("Votes").reconcile()
        assert await stored_votes(world) == {(world.alice.id, "👍")}


# ------------------------------------------------------------------------------ answers in flight


async def test_dms_one_answer_per_user_and_one_bound_across_everything(start_bot) -> None:
    async with gated_worker() as (worker, url):
        async with start_bot(worker=False, worker_url=url, total_inflight=2, guild_inflight=4) as world:
            fake = fast(world).fake
            carol = fake.add_user("carol")
            fake.add_member(world.guild, carol)
            in_dm = await fake.send_message(world.alice, world.alice, "what now?")
            await worker.wait_started(1)
            again = await fake.send_message(world.alice, world.alice, "and now?")
            assert "still answering your last question" in (await replies_to(world, again)).content

            in_guild = await ask(world, "busy?", author=world.bob)
            await worker.wait_started(2)
            # two in flight, the bound across DMs and servers: carol waits though her server has room
            crowded = await ask(world, "me too?", author=carol)
            assert "many questions right now" in (await replies_to(world, crowded)).content
            bob_dm = await fake.send_message(world.bob, world.bob, "in private?")
            assert "many questions right now" in (await replies_to(world, bob_dm)).content
            assert worker.started == 2

            worker.release.set()
            for question in (in_dm, in_guild):
                await answer_to(world, question)
            await all_done(world)
            later = await fake.send_message(world.alice, world.alice, "and now, finally?")
            await answer_to(world, later)
            assert worker.started == 3
