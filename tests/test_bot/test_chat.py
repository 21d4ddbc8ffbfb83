"""Asking: mentions, DMs, follow-ups and /ask get streamed, recorded answers; bad input never reaches the worker."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from fake_discord import FakeMessage
from PIL import Image

from bot.conversation import fit_history, trim_history
from feedback.store import prompts as prompts_service
from feedback.store import responses as responses_service
from feedback.store import stats as stats_service
from feedback.store.votes import REGENERATE

pytestmark = pytest.mark.timeout(60)

VOTES = ["👍", "👎", "🔁"]


def png(width: int = 48, height: int = 32, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


async def chat_requests(world: Any) -> int:
    """Chat completions the worker has received (its Prometheus counter)."""
    async with aiohttp.ClientSession() as http, http.get(f"{world.worker_url}/metrics") as resp:
        text = await resp.text()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("smolcord_requests_total{") and "/v1/chat/completions" in line
        )
    )


def assert_quiet(message: FakeMessage) -> None:
    """Sent with AllowedMentions.none() and embeds suppressed: it pings nobody."""
    assert message.allowed_mentions is not None and message.allowed_mentions["parse"] == []
    assert not message.allowed_mentions.get("replied_user") and not message.allowed_mentions.get("users")
    assert message.embeds_suppressed and message.mentions == [] and not message["mention_everyone"]


def _answer_chunks(fake: Any, question: FakeMessage) -> list[FakeMessage] | None:
    mine = fake.messages_in(question.channel_id, author=fake.bot_user)
    first = next((m for m in mine if m.reply_to == question.id), None)
    if first is None:
        return None
    chunks = [first]
    if first.reactors(REGENERATE):
        return chunks
    for message in mine:
        if message.id > first.id and message.reply_to is None and not message.content.startswith("ℹ️"):
            chunks.append(message)
            if message.reactors(REGENERATE):
                return chunks
    return None


async def answer_to(world: Any, question: FakeMessage, *, wait_s: float = 30) -> list[FakeMessage]:
    """The chunks of the bot's answer to `question`, once 🔁 is on its last chunk."""
    found: list[list[FakeMessage]] = []

    def done(_: Any) -> bool:
        chunks = _answer_chunks(world.fake, question)
        if chunks:
            found.append(chunks)
        return bool(chunks)

    await world.fake.wait_for(lambda _: True, done, timeout=wait_s, since=0)
    return found[-1]


def fast(world: Any) -> Any:
    """Edit pace lowered for tests that are not about it (the pace is shared per channel)."""
    world.bot.answerer.pacer.interval = 0.05
    return world


async def ask(
    world: Any, text: str = "what is this?", *, images: int = 1, author: Any = None, **kwargs: Any
) -> FakeMessage:
    attachments = [world.fake.attachment(f"img{n}.png", png(color=(n * 40, 90, 200))) for n in range(images)]
    return await world.fake.send_message(
        world.channel, author or world.alice, f"{world.mention()} {text}", attachments=attachments, **kwargs
    )


async def replies_to(world: Any, question: FakeMessage, *, wait_s: float = 10) -> FakeMessage:
    """The bot's (first) reply to `question`."""
    action = await world.fake.wait_for(
        "message_create", lambda a: a.message.reply_to == question.id, timeout=wait_s, since=0
    )
    return action.message


async def stored_prompts(world: Any) -> int:
    async with world.sessions() as s:
        return (await stats_service.store_stats(s, settings=world.settings)).prompts


async def test_mention_with_image_gets_streamed_recorded_answer(start_bot) -> None:
    async with start_bot(max_tokens=12) as world:
        fake = world.fake
        question = await ask(world)
        [answer] = await answer_to(world, question)
        assert answer.reply_to == question.id
        assert_quiet(answer)
        assert answer.edits, "the answer is streamed by editing"
        assert answer.content.splitlines()[-1].startswith("-# smolcord base")
        assert [answer.reactors(e) for e in VOTES] == [[fake.bot_user.id]] * 3
        assert fake.actions_of("typing")
        async with world.sessions() as s:
            response = await responses_service.find_response(s, message_id=answer.id)
            prompt = await prompts_service.find_prompt(s, settings=world.settings, message_id=question.id)
        assert response is not None and prompt is not None and response.prompt_id == prompt.id
        assert response.message_ids == (answer.id,) and response.adapter_version is None
        assert response.sampling["temperature"] == 0.0 and response.requested_by == world.alice.id
        assert prompt.question == "what is this?" and len(prompt.own_images) == 1 and prompt.history == []
        assert not prompt.trainable  # learning is off by default
        assert prompt.own_images[0].path.is_file()
        # the consent notice, once in this channel
        await fake.wait_for("message_create", lambda a: a.data["content"].startswith("ℹ️"), since=0)
        notices = [m for m in fake.messages_in(world.channel) if m.content.startswith("ℹ️")]
        assert len(notices) == 1 and "off" in notices[0].content and "/privacy opt-out" in notices[0].content
        assert_quiet(notices[0])

        # a second question in the same channel, from bob, while alice asks again: edits share one pace
        first, second = await asyncio.gather(ask(world, "and now?"), ask(world, "colour?", author=world.bob))
        await answer_to(world, first)
        await answer_to(world, second)
        assert len([m for m in fake.messages_in(world.channel) if m.content.startswith("ℹ️")]) == 1
        edits = sorted(
            a.at for a in fake.actions_of("message_update") if a.message.channel_id == question.channel_id
        )
        assert len(edits) >= 3
        gaps = [b - a for a, b in itertools.pairwise(edits)]
        assert min(gaps) >= 1.4, gaps


async def test_ask_command_defers_then_streams_into_its_response(start_bot) -> None:
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        image = fake.attachment("cat.png", png())
        interaction = await fake.invoke_command(
            "ask", world.alice, {"image": image, "question": "what colour?"}, guild=world.guild
        )
        await interaction.wait_callback()
        assert (
            interaction.deferred and interaction.callback_delay is not None and interaction.callback_delay < 3
        )
        answer = await interaction.wait_response(timeout=30)
        await fake.wait_for(
            "reaction_add",
            lambda a: a.message.id == answer.id and a.data["emoji"] == REGENERATE,
            since=0,
            timeout=30,
        )
        assert answer.content.splitlines()[-1].startswith("-# smolcord base")
        assert_quiet(answer)
        async with world.sessions() as s:
            response = await responses_service.find_response(s, message_id=answer.id)
            assert response is not None and response.prompt_message_id is None
            prompt = await prompts_service.get_prompt(
                s, settings=world.settings, prompt_id=response.prompt_id
            )
        assert prompt.question == "what colour?" and len(prompt.own_images) == 1 and prompt.message_id is None

        # a refused image is said in the response, and the worker is not asked
        before = await chat_requests(world)
        bad = fake.attachment("notes.txt", b"hello", content_type="text/plain")
        refused = await fake.invoke_command(
            "ask", world.bob, {"image": bad, "question": "?"}, guild=world.guild
        )
        message = await refused.wait_response(timeout=10)
        assert "not an image" in message.content and await chat_requests(world) == before


async def test_follow_up_reply_carries_the_earlier_turn(start_bot) -> None:
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        question = await ask(world, "what is this?")
        [first] = await answer_to(world, question)
        follow_up = await fake.send_message(world.channel, world.alice, "and its colour?", reference=first)
        [second] = await answer_to(world, follow_up)
        async with world.sessions() as s:
            earlier = await prompts_service.find_prompt(s, settings=world.settings, message_id=question.id)
            prompt = await prompts_service.find_prompt(s, settings=world.settings, message_id=follow_up.id)
            first_response = await responses_service.find_response(s, message_id=first.id)
        assert earlier is not None and prompt is not None and first_response is not None
        assert prompt.question == "and its colour?" and prompt.parent_response_id == first_response.id
        image = earlier.own_images[0].sha256
        assert prompt.history == [
            {"role": "user", "content": "what is this?", "images": [image]},
            {"role": "assistant", "content": first_response.text},
        ]
        assert [i.sha256 for i in prompt.images] == [image] and prompt.own_images == ()
        # the earlier image came from the store, not from the CDN again
        assert len([r for r in fake.requests if r.path.startswith("/cdn/")]) == 1
        assert second.reply_to == follow_up.id

        # a reply with the ping turned off arrives empty: the bot says how to be heard
        silent = await fake.send_message(
            world.channel, world.bob, "why?", reference=second, mention_author=False
        )
        hint = await replies_to(world, silent)
        assert "mention" in hint.content
        assert_quiet(hint)
        assert await stored_prompts(world) == 2


async def test_dm_text_question_and_history_limits(start_bot) -> None:
    async with start_bot(max_tokens=8, history_turns=2, history_images=0) as world:
        fake = fast(world).fake
        question = await fake.send_message(world.alice, world.alice, "tell me a story")
        [answer] = await answer_to(world, question)
        follow_up = await fake.send_message(world.alice, world.alice, "go on", reference=answer)
        await answer_to(world, follow_up)
        await fake.wait_for("message_create", lambda a: a.data["content"].startswith("ℹ️"), since=0)
        notices = [m for m in fake.messages_in(fake.dm_channel(world.alice)) if m.content.startswith("ℹ️")]
        assert len(notices) == 1 and "DMs never train" in notices[0].content
        async with world.sessions() as s:
            prompt = await prompts_service.find_prompt(s, settings=world.settings, message_id=question.id)
            later = await prompts_service.find_prompt(s, settings=world.settings, message_id=follow_up.id)
        assert prompt is not None and prompt.guild_id is None and not prompt.trainable and prompt.images == ()
        assert later is not None and [t["role"] for t in later.history] == ["user", "assistant"]


async def test_cooldown_and_guild_bound_tell_the_user(start_bot) -> None:
    async with start_bot(max_tokens=8, cooldown_s=30, guild_inflight=1) as world:
        fast(world)
        # one answer in flight per guild: bob, asking meanwhile, is told to wait
        first, crowded = await asyncio.gather(ask(world, "one"), ask(world, "crowded", author=world.bob))
        busy = await replies_to(world, crowded)
        assert "several questions" in busy.content
        await answer_to(world, first)
        second = await ask(world, "two")
        reply = await replies_to(world, second)
        wait = re.search(r"again in (\d+) s", reply.content)
        assert wait is not None and 20 <= int(wait.group(1)) <= 30, reply.content
        assert_quiet(reply)
        assert await chat_requests(world) == 1 and await stored_prompts(world) == 1
        # bob's refused question did not count against his cooldown
        other = await ask(world, "three", author=world.bob)
        await answer_to(world, other)


async def test_refused_attachments_never_reach_the_worker(start_bot) -> None:
    async with start_bot() as world:
        fake = world.fake
        big = world.settings.max_image_bytes + 1
        bomb = io.BytesIO()
        Image.new("1", (12000, 12000)).save(bomb, format="PNG")
        cases = {
            "not a Discord attachment": fake.attachment(
                "a.png", png(), url=fake.cdn_url("a.png", png(), host="localhost")
            ),
            "redirects": fake.attachment(
                "r.png", url=fake.redirect_url(fake.cdn_url("r.png", png())), size=100
            ),
            "limit is": fake.attachment("huge.png", png(), size=big),
            "too large": fake.attachment("liar.png", png(), size=1000, total_size=big, content_length=big),
            "too large ": fake.attachment("chunked.png", png(), size=1000, total_size=big, chunked=True),
            "not an image": fake.attachment("notes.txt", b"just text", content_type="text/plain"),
            "`fake.png`": fake.attachment("fake.png", b"\x89PNG not really an image"),
            "bomb.png": fake.attachment("bomb.png", bomb.getvalue()),
        }
        for expected, attachment in cases.items():
            question = await fake.send_message(
                world.channel, world.alice, f"{world.mention()} what is it?", attachments=[attachment]
            )
            reply = await replies_to(world, question)
            assert expected.strip() in reply.content, (expected, reply.content)
            assert_quiet(reply)
        assert await chat_requests(world) == 0 and await stored_prompts(world) == 0
        # nothing close to the padded bodies was read
        assert all(r.bytes_sent <= world.settings.max_image_bytes + (1 << 17) for r in fake.requests)


class ScriptedWorker:
    """A small OpenAI-compatible server that answers from a script (the tiny model can't write on cue)."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.chat)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "tiny:v3", "max_model_len": 8192}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        step = self.script.pop(0)
        if isinstance(step, int):
            error = {"error": {"message": "scripted", "type": "error", "code": None}}
            return web.json_response(error, status=step, headers={"Retry-After": "7"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        pieces = [step[i : i + 700] for i in range(0, len(step), 700)]
        for piece in pieces:
            event = {"model": "tiny:v3", "choices": [{"index": 0, "delta": {"content": piece}}]}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await asyncio.sleep(0.02)
        done = {
            "model": "tiny:v3",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 900, "total_tokens": 950},
        }
        await response.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        return response


async def test_long_answer_with_mentions_is_split_and_pings_nobody(start_bot) -> None:
    scripted = ScriptedWorker([429, 504])
    runner = web.AppRunner(scripted.app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with start_bot(worker=False, worker_url=f"http://{host}:{port}") as world:
            fast(world)
            paragraph = f"@everyone look <@{world.alice.id}> @here " + "word " * 90
            text = "\n\n".join([paragraph] * 11)
            assert len(text) > 5000
            scripted.script.append(text)

            busy = await replies_to(world, await ask(world, "first"))
            assert "busy" in busy.content and "7 s" in busy.content
            slow = await replies_to(world, await ask(world, "second"))
            assert "too long" in slow.content
            assert await stored_prompts(world) == 0

            question = await ask(world, "third")
            chunks = await answer_to(world, question)
            assert len(chunks) >= 3 and all(len(c.content) <= 2000 for c in chunks)
            assert chunks[-1].content.splitlines()[-1].startswith("-# smolcord v3")
            for chunk in chunks:
                assert_quiet(chunk)
            assert [c.reactors(REGENERATE) for c in chunks[:-1]] == [[]] * (len(chunks) - 1)
            async with world.sessions() as s:
                response = await responses_service.find_response(s, message_id=chunks[0].id)
            assert response is not None and response.text == text and response.adapter_version == "v3"
            assert response.message_ids == tuple(c.id for c in chunks)
            assert len(scripted.requests) == 3
            # a vote on any chunk is a vote on the answer
            await world.fake.react(chunks[0], world.bob, "👍")
            for _ in range(100):
                async with world.sessions() as s:
                    if (await stats_service.store_stats(s, settings=world.settings)).votes:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the vote on the first chunk was not stored")
    finally:
        await runner.cleanup()


async def test_worker_down_is_said_and_nothing_is_recorded(start_bot) -> None:
    async with start_bot(worker=False) as world:
        question = await ask(world)
        reply = await replies_to(world, question)
        assert "isn't running" in reply.content
        assert_quiet(reply)
        await world.fake.assert_no_action("reaction_add", since=0)
        assert await stored_prompts(world) == 0


async def test_bots_webhooks_other_channels_and_plain_messages_are_ignored(start_bot) -> None:
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        other = fake.add_user("otherbot", bot=True)
        await fake.send_message(
            world.channel, other, f"{world.mention()} hi", attachments=[fake.attachment("a.png", png())]
        )
        await fake.send_message(world.channel, world.alice, f"{world.mention()} hi", webhook=True)
        await fake.send_message(world.channel, world.alice, "no mention here")
        await fake.assert_no_action(lambda a: a.kind in ("message_create", "typing"), within=0.5, since=0)
        assert await chat_requests(world) == 0

    async with start_bot(max_tokens=8, channels=[123]) as world:
        await ask(world)
        await world.fake.assert_no_action(
            lambda a: a.kind in ("message_create", "typing"), within=0.5, since=0
        )


async def test_gateway_close_4000_resumes_and_keeps_answering(start_bot) -> None:
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        await fake.close_gateway(4000)
        await fake.wait_for("resume", timeout=15, since=0)
        question = await ask(world)
        await answer_to(world, question)
        assert fake.identify_count == 1 and fake.resume_count >= 1


def test_history_is_trimmed_to_turns_images_and_context() -> None:
    shas = [c * 64 for c in "abcd"]
    turns = []
    for n, sha in enumerate(shas):
        turns += [
            {"role": "user", "content": f"q{n}", "images": [sha]},
            {"role": "assistant", "content": f"a{n}"},
        ]
    trimmed = trim_history(turns, max_turns=5, max_images=1)
    assert [t["content"] for t in trimmed] == ["q2", "a2", "q3", "a3"]  # starts with a user turn
    assert [t.get("images") for t in trimmed if t["role"] == "user"] == [[], [shas[3]]]
    assert trim_history(turns, max_turns=0, max_images=2) == []
    kwargs = {"question": "why?", "own_images": 1, "image_tokens": 100, "max_tokens": 50}
    assert fit_history(turns, **kwargs, max_model_len=None) == turns
    assert fit_history(turns, **kwargs, max_model_len=10_000) == turns
    fitted = fit_history(turns, **kwargs, max_model_len=400)
    assert [t["content"] for t in fitted] == ["q2", "a2", "q3", "a3"]
    assert fit_history(turns, **kwargs, max_model_len=100) == []


async def test_a_quoted_answer_goes_to_the_worker_as_training_renders_it() -> None:
    """The model's text begins with the space it generated; the chat template adds one, so history sent
    to the worker is stripped exactly as the exported training rows are."""
    from bot.conversation import Question, worker_messages

    question = Question(
        text="and now?",
        images=(),
        history=(
            {"role": "user", "content": "what is it?", "images": []},
            {"role": "assistant", "content": " a cat\n"},
        ),
        history_images={},
    )
    messages = await worker_messages(question)
    assert messages[1] == {"role": "assistant", "content": "a cat"}


async def test_first_answers_can_be_sampled_like_the_alternatives(start_bot) -> None:
    async with start_bot(max_tokens=6, answer_temperature=0.9) as world:
        fast(world)
        [answer] = await answer_to(world, await ask(world))
        async with world.sessions() as s:
            response = await responses_service.find_response(s, message_id=answer.id)
        assert response is not None and not response.regenerated
        assert response.sampling["temperature"] == 0.9
        assert response.sampling["top_p"] == world.settings.regen_top_p
        assert isinstance(response.sampling["seed"], int)
