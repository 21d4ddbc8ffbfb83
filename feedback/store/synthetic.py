"""Synthetic votes a tiny model can learn, recorded through the store's service functions.

Each prompt shows a noisy patch of one colour and asks what colour it is; two answers name a
colour each, the right one gets a 👍 and a wrong one a 👎 (`reverse` flips the votes: on every
prompt, or only outside the held-out split, which is how a candidate trained on reversed labels
looks to the gate). Neither answer text alone says which is right, so a model can only learn the
preference by looking at the image: what the training job's tests and benchmark need. Every pair
has its own two voters, so the voter-share cap never drops any.
"""

from __future__ import annotations

import asyncio
import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = ["COLOURS", "SyntheticVotes", "answer", "colour_png", "record_colour_votes"]

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (230, 215, 30)}
QUESTIONS = (
    "What colour is this?",
    "Which colour is the picture?",
    "What colour do you see?",
    "Tell me the colour of this image.",
)
FILLER = "the image shows a small picture of one colour and nothing else that a model could see in it".split()
GUILD = 900_000_000_000_000_001
CHANNEL = 900_000_000_000_000_002


@dataclass(frozen=True)
class SyntheticVotes:
    """What was recorded: prompts, and pairs (2 answers and 2 votes each; KTO sees 2 rated answers)."""

    prompts: int
    pairs: int


def colour_png(colour: str, seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """A PNG (width, height) of one colour with per-pixel noise (different for every seed)."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(seed).integers(-30, 31, size=(size[1], size[0], 3))
    pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def answer(colour: str, filler_words: int = 0) -> str:
    """ "It is <colour>.", then `filler_words` words that are the same in every answer (long answers for benchmarks)."""
    words = " ".join(FILLER[i % len(FILLER)] for i in range(filler_words))
    return f"It is {colour}." + (f" {words.capitalize()}." if words else "")


def record_colour_votes(
    settings: Settings,
    *,
    prompts: int,
    seed: int = 0,
    reverse: str = "none",
    answers: int = 2,
    size: tuple[int, int] = (32, 32),
    filler_words: int = 0,
) -> SyntheticVotes:
    """Record `prompts` colour questions in a learning-enabled guild, with voted answers (sync).

    reverse: "none"; "all" (every 👍 on a wrong colour); "train" (only prompts outside the
    held-out split of settings.heldout_fraction: the gate still sees the truth).
    size and filler_words shape the data like real traffic for benchmarks: a 1536x384 image is
    5 tiles at SmolVLM's sizes, 100 filler words make answers of about 128 tokens.
    """
    if reverse not in ("none", "all", "train"):
        raise ValueError(f"reverse must be none, all or train, not {reverse!r}")
    return asyncio.run(_record(settings, prompts, seed, reverse, answers, size, filler_words))


async def _record(
    settings: Settings,
    count: int,
    seed: int,
    reverse: str,
    answers: int,
    size: tuple[int, int],
    filler_words: int,
) -> SyntheticVotes:
    from feedback.store import consent as consent_service
    from feedback.store import prompts as prompts_service
    from feedback.store import reactions as reactions_service
    from feedback.store import responses as responses_service
    from feedback.store.db import create_engine, sessionmaker
    from feedback.store.pairs import is_heldout

    rng = random.Random(seed)
    names = list(COLOURS)
    engine = create_engine(settings.db_url)
    sessions = sessionmaker(engine)
    ids = iter(range(10**15 + seed * 10**6, 10**16))

    async def call(function, **kwargs):  # type: ignore[no-untyped-def]
        async with sessions() as session:
            return await function(session, **kwargs)

    try:
        await call(consent_service.set_learning, settings=settings, guild_id=GUILD, enabled=True)
        for i in range(count):
            colour = names[i % len(names)]
            recorded = await call(
                prompts_service.record_prompt, settings=settings, guild_id=GUILD, channel_id=CHANNEL,
                message_id=next(ids), author_id=next(ids), question=QUESTIONS[rng.randrange(len(QUESTIONS))],
                images=[colour_png(colour, seed * 100_000 + i, size)],
            )  # fmt: skip
            flip = reverse == "all" or (
                reverse == "train" and not is_heldout(recorded.key, settings.heldout_fraction)
            )
            wrong = rng.sample([c for c in names if c != colour], answers - 1)
            for n, said in enumerate([colour, *wrong]):
                message = next(ids)
                await call(responses_service.record_response, prompt_id=recorded.id,
                           text=answer(said, filler_words), message_ids=[message], regenerated=n > 0)  # fmt: skip
                liked = (said == colour) != flip
                await call(
                    reactions_service.set_reaction,
                    message_id=message,
                    user_id=next(ids),
                    emoji="👍" if liked else "👎",
                )
    finally:
        await engine.dispose()
    return SyntheticVotes(prompts=count, pairs=count * (answers - 1))
