"""Ask the model and stream its answer to a destination (bot/display.py); shared by mentions, follow-ups, /ask and 🔁.

An answer is shown as it is generated: the first text becomes a reply (or the /ask response), then
the reply is edited, at most once per `ChannelPacer` interval in its channel (all answers streaming
in a channel share that pace). Long answers continue in new messages; the last one carries the
footer and 👍 👎 🔁. Only finished answers are recorded: a failed one leaves a clear message and
nothing in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import discord
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.consent_notices import ConsentNotices, consent_text, notice_state
from bot.conversation import (
    IMAGE_TOKENS_GUESS,
    Question,
    drop_oldest_exchange,
    fit_history,
    text_tokens,
    trim_history,
    worker_messages,
)
from bot.display import Destination, Display
from bot.limits import ChannelPacer, Cooldown, InflightLimit
from bot.recent_answers import RecentAnswers
from bot.rollout import CanaryRouter
from bot.text import CURSOR, base_name, footer, served_version, split_message
from feedback.store import consent as consent_service
from feedback.store import deletion as deletion_service
from feedback.store import images as images_service
from feedback.store import prompts as prompts_service
from feedback.store import responses as responses_service
from feedback.store.errors import FeedbackError
from feedback.store.votes import REGENERATE, THUMBS_DOWN, THUMBS_UP
from smolcord.registry import AdapterRegistry
from smolcord.settings import Settings
from smolcord.worker_client import (
    ChatResult,
    WorkerBusy,
    WorkerClient,
    WorkerDown,
    WorkerError,
    WorkerTimeout,
)

log = logging.getLogger(__name__)

BUSY_HERE = "⏳ I'm answering several questions in this server already. Please try again in a moment."
BUSY_DM = "⏳ I'm still answering your last question here; ask again once it is done."
BUSY_EVERYWHERE = "⏳ I'm answering many questions right now. Please try again in a moment."
VOTE_REACTIONS = (THUMBS_UP, THUMBS_DOWN, REGENERATE)
EDIT_INTERVAL_S = 1.5  # Discord's per-channel edit limit, with room for other bots' edits


# ====================================================================== errors users see


def is_context_error(exc: WorkerError) -> bool:
    """The prompt does not fit the model's context (the worker's code, or vLLM's wording)."""
    return exc.status == 400 and (exc.code == "context_length_exceeded" or "context" in exc.message.lower())


def worker_error_text(exc: WorkerError) -> str:
    """What to tell the user when the worker could not answer."""
    if isinstance(exc, WorkerBusy):
        wait = f"{exc.retry_after:.0f} s" if exc.retry_after else "a minute"
        return f"⏳ I'm busy answering other questions right now. Please try again in {wait}."
    if isinstance(exc, WorkerDown):
        return "🔌 My model isn't running right now (it may be restarting). Please try again in a minute."
    if isinstance(exc, WorkerTimeout):
        return "⌛ My model took too long to answer. Please try again, perhaps with a shorter question."
    if is_context_error(exc):
        return "📏 That is too much for my model at once: try a shorter question or fewer images."
    if exc.status in (400, 413):
        return f"⚠️ My model refused this question: {exc.message[:300]}"
    return "⚠️ Something went wrong while answering (the model broke off). Please try again."


# ====================================================================== the answerer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 512

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
        }


@dataclass(frozen=True)
class Answer:
    """A finished answer, as shown and recorded."""

    response_id: int | None
    text: str
    version: str
    message_ids: tuple[int, ...]


class Answerer:
    """Streams answers with the bot's limits, records them, and adds the vote reactions.

    One per bot, shared by the chat and votes cogs (one pacer, one set of limits): `main()` builds it
    with the store and the worker and gives it to the bot, whose constructor attaches itself as the
    Discord client that answers' messages are reached through.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        worker: WorkerClient,
        router: CanaryRouter | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.worker = worker
        # Which version answers whom while a candidate is in canary (bot.rollout).
        self.router = router or CanaryRouter(
            settings, AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir), sessions
        )
        self._base_name: str | None = None
        self._client: discord.Client | None = None
        self.pacer = ChannelPacer(EDIT_INTERVAL_S)
        self.cooldown = Cooldown(self.settings.cooldown_s)
        self.inflight = InflightLimit(self.settings.guild_inflight)  # per guild
        self.dm_inflight = InflightLimit(1)  # per user, in DMs
        self.total_inflight = InflightLimit(self.settings.total_inflight)  # everything together
        self.notices = ConsentNotices(self.settings.data_dir / "consent_notices.json")
        self.recent = RecentAnswers(self.settings.data_dir / "recent_answers.json")
        # Questions deleted while their answer was being written: the answer goes too once recorded.
        self.deleted_questions: deque[int] = deque(maxlen=1000)
        self._max_model_len: int | None = None
        self._image_tokens: int | None = None  # measured from the worker's usage; None: not yet

    def attach(self, client: discord.Client) -> None:
        """Reach messages by id through this client (the bot, once it is built)."""
        self._client = client

    @property
    def client(self) -> discord.Client:
        if self._client is None:
            raise RuntimeError("this Answerer is not attached to a bot")
        return self._client

    # ------------------------------------------------------------------ limits

    @contextlib.contextmanager
    def slot(self, guild_id: int | None, user_id: int) -> Iterator[str | None]:
        """Hold an answer in flight: yields None when one is free, else what to tell the user.

        A server has SMOLCORD_GUILD_INFLIGHT answers in flight at most, a DM user one, and all of
        them together SMOLCORD_TOTAL_INFLIGHT, so no single place can occupy the worker.
        """
        local, key, busy = (
            (self.dm_inflight, user_id, BUSY_DM) if guild_id is None else (self.inflight, guild_id, BUSY_HERE)
        )
        held: list[tuple[InflightLimit, int]] = []
        refusal: str | None = None
        if not local.try_acquire(key):
            refusal = busy
        else:
            held.append((local, key))
            if self.total_inflight.try_acquire(0):
                held.append((self.total_inflight, 0))
            else:
                refusal = BUSY_EVERYWHERE
        try:
            yield refusal
        finally:
            for limit, held_key in held:
                limit.release(held_key)

    # ------------------------------------------------------------------ context length

    async def max_model_len(self) -> int | None:
        """The worker's context length from /v1/models, asked once (None while the worker is not ready)."""
        if self._max_model_len is None:
            try:
                info = await self.worker.ready()
            except WorkerError:
                return None
            self._max_model_len = int(info.get("max_model_len") or 0) or None
            self._base_name = base_name(self.settings.worker_model or str(info.get("id") or ""))
        return self._max_model_len

    async def _model(self, version: str | None) -> str | None:
        """The request's `model` that asks for `version` (None: the worker's current)."""
        if version is None:
            return None
        if self._base_name is None:
            await self.max_model_len()
        return self.router.model(self._base_name, version)

    def _measure_images(self, messages_text: str, images: int, prompt_tokens: int) -> None:
        """Learn what an image costs in tokens from an answer's usage (the largest cost seen wins)."""
        if images and prompt_tokens:
            cost = max(1, (prompt_tokens - text_tokens(messages_text)) // images)
            self._image_tokens = max(cost, self._image_tokens or 0)

    @property
    def image_tokens(self) -> int:
        return self._image_tokens or IMAGE_TOKENS_GUESS

    # ------------------------------------------------------------------ asking

    async def ask(
        self,
        destination: Destination,
        question: Question,
        *,
        guild_id: int | None,
        channel_id: int,
        message_id: int | None,
        author_id: int,
        parent_response_id: int | None = None,
    ) -> Answer | None:
        """Answer a new question (with its reply-chain history), record it, and add the vote reactions."""
        settings = self.settings
        history = trim_history(
            question.history, max_turns=settings.history_turns, max_images=settings.history_images
        )
        history = fit_history(
            history,
            question=question.text,
            own_images=len(question.images),
            image_tokens=self.image_tokens,
            max_tokens=settings.max_tokens,
            max_model_len=await self.max_model_len(),
        )
        if settings.answer_temperature > 0:
            sampling = Sampling(
                temperature=settings.answer_temperature,
                top_p=settings.regen_top_p,
                seed=random.randrange(2**31),
                max_tokens=settings.max_tokens,
            )
        else:
            sampling = Sampling(max_tokens=settings.max_tokens)
        model = await self._model(await self.router.version_for(user_id=author_id, guild_id=guild_id))
        display = Display(destination, self.pacer)
        while True:
            asked = question.with_history(history)
            try:
                result, latency_ms = await self._generate(display, asked, sampling, model)
                break
            except WorkerError as exc:
                if is_context_error(exc) and history and not display.messages:
                    history = drop_oldest_exchange(history)  # the estimate was off: try with less
                    continue
                log.info("answer in channel %s failed: %s", channel_id, type(exc).__name__)
                await display.fail(worker_error_text(exc))
                return None
            except OSError:  # an earlier turn's image file is gone (purged): answer without the history
                if not history:
                    raise
                history = []
        version = served_version(result.model)
        try:
            async with self.sessions() as session:
                prompt = await prompts_service.record_prompt(
                    session,
                    settings=settings,
                    guild_id=guild_id,
                    channel_id=channel_id,
                    message_id=message_id,
                    author_id=author_id,
                    question=asked.text,
                    images=[
                        image for image in asked.images if not isinstance(image, images_service.StoredImage)
                    ],
                    history=asked.history,
                    parent_response_id=parent_response_id,
                    parent_channel_id=destination.parent_channel_id,
                )
            response_id = await self._record_response(
                prompt.id, result, version, display, sampling, latency_ms, author_id, regenerated=False
            )
        except FeedbackError as exc:  # e.g. the question, or the answer it follows up, was deleted meanwhile
            log.warning("answer in channel %s not recorded: %s", channel_id, type(exc).__name__)
            return Answer(None, result.text, version, tuple(display.message_ids))
        if message_id is not None and message_id in self.deleted_questions:
            await self.forget_message(channel_id, message_id)
            return Answer(None, result.text, version, ())
        await self._finish(destination, display, response_id, guild_id, channel_id)
        return Answer(response_id, result.text, version, tuple(display.message_ids))

    async def regenerate(
        self,
        destination: Destination,
        prompt: prompts_service.PromptView,
        *,
        user_id: int,
        seed: int | None = None,
        version: str | None = None,
    ) -> Answer | None:
        """Another answer to a stored prompt (same images, question and history), sampled with a new seed.

        `version` is the replaced answer's adapter version: a canary arm's answers are replaced by
        that arm's while it is served.
        """
        settings = self.settings
        question = Question(
            text=prompt.question,
            images=prompt.own_images,
            history=tuple(prompt.history),
            history_images={image.sha256: image for image in prompt.images},
        )
        sampling = Sampling(
            temperature=settings.regen_temperature,
            top_p=settings.regen_top_p,
            seed=seed if seed is not None else random.randrange(2**31),
            max_tokens=settings.max_tokens,
        )
        model = await self._model(self.router.replacing(version))
        display = Display(destination, self.pacer)
        try:
            result, latency_ms = await self._generate(display, question, sampling, model)
        except (WorkerError, OSError) as exc:  # OSError: a stored image file is gone
            log.info("regeneration for prompt %s failed: %s", prompt.id, type(exc).__name__)
            text = (
                worker_error_text(exc)
                if isinstance(exc, WorkerError)
                else "⚠️ I can't find that question's images any more."
            )
            await display.fail(text)
            return None
        version = served_version(result.model)
        try:
            response_id = await self._record_response(
                prompt.id, result, version, display, sampling, latency_ms, user_id, regenerated=True
            )
        except FeedbackError as exc:
            log.warning("regeneration for prompt %s not recorded: %s", prompt.id, type(exc).__name__)
            return Answer(None, result.text, version, tuple(display.message_ids))
        await self._finish(destination, display, response_id, prompt.guild_id, prompt.channel_id)
        return Answer(response_id, result.text, version, tuple(display.message_ids))

    # ------------------------------------------------------------------ streaming

    async def _generate(
        self, display: Display, question: Question, sampling: Sampling, model: str | None = None
    ) -> tuple[ChatResult, float]:
        """Stream one answer into `display`; raises WorkerError (then `display` may show partial text)."""
        messages = await worker_messages(question)
        parts: list[str] = []
        finished: list[ChatResult] = []
        changed = asyncio.Event()
        started = time.monotonic()

        async def pump() -> None:
            try:
                async for item in self.worker.stream_chat(
                    messages,
                    max_tokens=sampling.max_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    seed=sampling.seed,
                    model=model,
                ):
                    if isinstance(item, str):
                        parts.append(item)
                    else:
                        finished.append(item)
                    changed.set()
            finally:
                changed.set()

        def render() -> list[str]:
            if finished:
                version = served_version(finished[0].model)
                return split_message(finished[0].text, footer_line=footer(version))
            return split_message("".join(parts) + CURSOR)

        async def news() -> None:
            """Wait for more text, or for the stream to end."""
            waiter = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait({waiter, stream}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            changed.clear()

        stream = asyncio.create_task(pump())
        try:
            async with display.destination.typing():
                while not stream.done() and not parts:
                    await news()
            while not stream.done():
                await display.show(render)
                if not stream.done():
                    await news()
            stream.result()  # raises the worker's error, if any
            if not finished:
                raise WorkerError(0, "the worker's stream ended without a result")
            latency_ms = (time.monotonic() - started) * 1000
            await display.show(render)
        finally:
            if not stream.done():
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError, WorkerError):
                    await stream
        image_count = len(question.images) + sum(len(t.get("images") or ()) for t in question.history)
        all_text = question.text + "".join(t["content"] for t in question.history)
        self._measure_images(all_text, image_count, finished[0].usage.prompt_tokens)
        return finished[0], latency_ms

    # ------------------------------------------------------------------ recording

    async def _record_response(
        self,
        prompt_id: int,
        result: ChatResult,
        version: str,
        display: Display,
        sampling: Sampling,
        latency_ms: float,
        requested_by: int,
        *,
        regenerated: bool,
    ) -> int:
        async with self.sessions() as session:
            return await responses_service.record_response(
                session,
                prompt_id=prompt_id,
                text=result.text,
                message_ids=display.message_ids,
                adapter_version=None if version == "base" else version,
                sampling={**sampling.as_dict(), "finish_reason": result.finish_reason},
                latency_ms=round(latency_ms, 1),
                prompt_tokens=result.usage.prompt_tokens or None,
                completion_tokens=result.usage.completion_tokens or None,
                requested_by=requested_by,
                regenerated=regenerated,
            )

    async def _finish(
        self,
        destination: Destination,
        display: Display,
        response_id: int,
        guild_id: int | None,
        channel_id: int,
    ) -> None:
        """Vote reactions on the last chunk, the answer remembered for reconciling, the consent notice."""
        log.info(
            "answered in channel %s: response %s, %d messages", channel_id, response_id, len(display.messages)
        )
        try:
            await destination.add_reactions(display.message_ids[-1], VOTE_REACTIONS)
        except discord.HTTPException as exc:  # no Add Reactions permission, or the answer was deleted
            log.warning("could not add vote reactions in channel %s (%s)", channel_id, exc.status)
        self.recent.add(response_id=response_id, channel_id=channel_id, guild_id=guild_id)
        await self.post_consent_notice(destination, guild_id, channel_id)

    async def post_consent_notice(
        self, destination: Destination, guild_id: int | None, channel_id: int
    ) -> None:
        """Say what is kept and whether this server's votes may train the model: in each channel's first
        answer, and again in the next answer after the server's learning changed (`/learning`)."""
        learning = False
        if guild_id is not None:
            async with self.sessions() as session:
                consent = await consent_service.get_guild_settings(
                    session, settings=self.settings, guild_id=guild_id
                )
            learning = consent.learning
        state = notice_state(in_dm=guild_id is None, learning=learning)
        if not self.notices.due(channel_id, state):
            return
        try:
            await destination.post(consent_text(in_dm=guild_id is None, learning=learning), first=False)
        except discord.HTTPException as exc:
            log.warning("could not post the consent notice in channel %s (%s)", channel_id, exc.status)
            return
        await self.notices.mark(channel_id, state)

    # ------------------------------------------------------------------ deleting

    async def forget_message(self, channel_id: int, message_id: int) -> deletion_service.Deletion:
        """Delete what was stored of a deleted message, and the bot's answer messages that went with it."""
        async with self.sessions() as session:
            deletion = await deletion_service.delete_message(
                session, settings=self.settings, message_id=message_id
            )
        await self.delete_answer_messages(channel_id, [m for m in deletion.message_ids if m != message_id])
        self.recent.forget(set(deletion.response_ids))
        return deletion

    async def delete_answer_messages(self, channel_id: int, message_ids: list[int]) -> None:
        """Delete the bot's own messages (no permission needed for those); gone already is fine."""
        channel = self.client.get_partial_messageable(channel_id)
        for message_id in message_ids:
            with contextlib.suppress(discord.NotFound, discord.Forbidden):
                await channel.get_partial_message(message_id).delete()
