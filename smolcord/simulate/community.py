"""The simulated community at work: asking through the bot's Answerer, voting and pressing 🔁 as people do.

Nothing here reimplements a step of the bot: a question goes through `Answerer.ask` (the same
history fitting, streaming, recording and consent rules as a mention in Discord), a 🔁 through
`Answerer.regenerate` (what the votes cog calls), and a vote through the store's `set_reaction`
(what the votes cog calls for a reaction). Only Discord itself is replaced: answers are "posted"
to a `SimulatedChannel`, which keeps the messages in memory. Each question gets a channel of its
own (a thread, say), so Discord's per-channel edit pacing never makes questions wait for each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from bot.answering import Answer, Answerer
    from smolcord.settings import Settings
    from smolcord.simulate.world import Scene, SimulatedUser

__all__ = ["Community", "RoundTraffic", "SimulatedChannel", "SimulatedMessage"]

log = logging.getLogger(__name__)

# Snowflake-sized ids of the simulated server, its channels and messages, far from real ones.
GUILD_ID = 810_000_000_000_000_001
_FIRST_CHANNEL_ID = 820_000_000_000_000_000
_FIRST_MESSAGE_ID = 830_000_000_000_000_000


class SimulatedMessage:
    """A posted message: its id and what it says now."""

    def __init__(self, message_id: int, content: str) -> None:
        self.id, self.content, self.deleted = message_id, content, False

    async def edit(self, *, content: str, **_: Any) -> SimulatedMessage:
        self.content = content
        return self

    async def delete(self) -> None:
        self.deleted = True


class SimulatedChannel:
    """A `bot.display.Destination` without Discord: messages kept in memory, reactions counted."""

    parent_channel_id: int | None = None

    def __init__(self, channel_id: int, message_ids: itertools.count[int]) -> None:
        self.channel_id = channel_id
        self.messages: list[SimulatedMessage] = []
        self.reactions = 0
        self._ids = message_ids

    async def post(self, content: str, *, first: bool) -> SimulatedMessage:
        message = SimulatedMessage(next(self._ids), content)
        self.messages.append(message)
        return message

    async def add_reactions(self, message_id: int, emojis: Sequence[str]) -> None:
        self.reactions += len(emojis)

    def typing(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return contextlib.nullcontext()


@dataclass
class RoundTraffic:
    """What a round's community did: questions, answers (first and 🔁), and votes."""

    questions: int = 0
    answers: int = 0
    regenerations: int = 0
    liked: int = 0
    disliked: int = 0
    first_liked: int = 0  # first answers liked: the served model's 👍 share on the round's own traffic
    failed: int = 0  # answers the worker could not give (none expected)
    bystander_votes: int = 0  # votes by people who saw an answer to someone else's question
    bystanders_liked: int = 0
    by_version: dict[str, list[int]] = field(default_factory=dict)  # version -> [answers, liked]

    def as_dict(self) -> dict[str, Any]:
        return {
            "questions": self.questions,
            "answers": self.answers,
            "regenerations": self.regenerations,
            "votes_up": self.liked,
            "votes_down": self.disliked,
            "first_answer_up_share": round(self.first_liked / self.questions, 4) if self.questions else None,
            "failed": self.failed,
            "bystander_votes": self.bystander_votes,
            "bystanders_liked": self.bystanders_liked,
            "by_version": {
                version: {"answers": answers, "liked": liked, "up_share": round(liked / answers, 4)}
                for version, (answers, liked) in sorted(self.by_version.items())
            },
        }


class Community:
    """Simulated users asking about scenes through the Answerer and voting on what they get back."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        answerer: Answerer,
        users: Sequence[SimulatedUser],
        max_regenerations: int = 3,
        bystanders: int = 0,
        concurrency: int = 8,
        seed: int = 0,
    ) -> None:
        self.settings, self.sessions, self.answerer, self.users = settings, sessions, answerer, list(users)
        self.max_regenerations = max_regenerations
        if not 0 <= bystanders < len(self.users):
            raise ValueError(f"bystanders must be between 0 and the other users ({len(self.users) - 1})")
        # Others in the channel who also vote on each answer a user gets: the next users after them.
        self._bystanders = {
            user.id: [self.users[(at + k) % len(self.users)] for k in range(1, bystanders + 1)]
            for at, user in enumerate(self.users)
        }
        self._concurrency = concurrency
        self._channels = itertools.count(_FIRST_CHANNEL_ID + seed * 10**9)
        self._messages = itertools.count(_FIRST_MESSAGE_ID + seed * 10**9)

    async def open_server(self) -> None:
        """The simulated server, with learning turned on by its admins (`/learning on`)."""
        from feedback.store import consent as consent_service

        async with self.sessions() as session:
            await consent_service.set_learning(
                session, settings=self.settings, guild_id=GUILD_ID, enabled=True
            )

    async def live_a_round(self, scenes: Sequence[Scene], *, round: int) -> RoundTraffic:
        """Each scene asked by one user (in turn), answered, voted on, and 🔁 pressed on dislikes."""
        traffic = RoundTraffic()
        gate = asyncio.Semaphore(self._concurrency)  # several at once, so the worker batches them

        # Users ask in turn, each as often as their activity says (a round-robin over the weighted list).
        askers = [user for user in self.users for _ in range(user.activity)]

        async def one(index: int, scene: Scene) -> None:
            async with gate:
                await self._ask(scene, askers[(round * len(scenes) + index) % len(askers)], traffic)

        await asyncio.gather(*(one(i, scene) for i, scene in enumerate(scenes)))
        return traffic

    async def _ask(self, scene: Scene, user: SimulatedUser, traffic: RoundTraffic) -> None:
        from bot.conversation import Question
        from feedback.store import prompts as prompts_service
        from smolcord.images import normalize_image

        settings = self.settings
        image = normalize_image(
            scene.png,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_edge=settings.max_image_edge,
        )
        channel = SimulatedChannel(next(self._channels), self._messages)
        traffic.questions += 1
        answer = await self.answerer.ask(
            channel,
            Question(text=scene.question, images=(image,)),
            guild_id=GUILD_ID,
            channel_id=channel.channel_id,
            message_id=next(self._messages),  # the question's own message
            author_id=user.id,
        )
        liked = await self._vote(answer, user, scene, traffic)
        if liked is None:
            return
        traffic.first_liked += liked
        assert answer is not None  # voted on
        prompt_id = await self._prompt_of(answer)
        version = None if answer.version == "base" else answer.version  # 🔁 comes from the same arm
        for _ in range(self.max_regenerations):
            if not user.wants_another(liked):
                return
            async with self.sessions() as session:
                prompt = await prompts_service.get_prompt(session, settings=settings, prompt_id=prompt_id)
            traffic.regenerations += 1
            answer = await self.answerer.regenerate(
                channel,
                prompt,
                user_id=user.id,
                seed=user.rng.randrange(2**31),
                version=version,
            )
            liked = await self._vote(answer, user, scene, traffic)
            if liked is None:
                return

    async def _vote(
        self, answer: Answer | None, user: SimulatedUser, scene: Scene, traffic: RoundTraffic
    ) -> bool | None:
        """The user's 👍 or 👎 on an answer, stored as a reaction on its last message; None: no answer."""
        from feedback.store import reactions as reactions_service
        from feedback.store.votes import THUMBS_DOWN, THUMBS_UP

        if answer is None or answer.response_id is None or not answer.message_ids:
            traffic.failed += 1
            return None
        traffic.answers += 1
        liked = user.vote(answer.text, scene.truth)
        # The asker votes; so do their bystanders, by their own rule and noise (they never press 🔁:
        # the question is not theirs). The store sums the votes per answer.
        others = self._bystanders[user.id]
        votes = [(user.id, liked), *((other.id, other.vote(answer.text, scene.truth)) for other in others)]
        async with self.sessions() as session:
            for voter_id, up in votes:
                await reactions_service.set_reaction(
                    session,
                    message_id=answer.message_ids[-1],
                    user_id=voter_id,
                    emoji=THUMBS_UP if up else THUMBS_DOWN,
                )
        traffic.bystander_votes += len(votes) - 1
        traffic.bystanders_liked += sum(up for _, up in votes[1:])
        if liked:
            traffic.liked += 1
        else:
            traffic.disliked += 1
        arm = traffic.by_version.setdefault(answer.version, [0, 0])
        arm[0] += 1
        arm[1] += liked
        return liked

    async def _prompt_of(self, answer: Answer) -> int:
        from feedback.store import responses as responses_service

        assert answer.response_id is not None
        async with self.sessions() as session:
            response = await responses_service.get_response(session, response_id=answer.response_id)
        return response.prompt_id
