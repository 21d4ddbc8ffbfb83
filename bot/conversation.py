"""What the model is asked: a question, its images and the reply-chain history, fitted to the model's context."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from feedback.store.images import StoredImage
from smolcord.images import NormalizedImage, to_data_url

# Used until the first answer with images measures the real cost: SmolVLM-256M tiles a large
# image into 4×4 crops plus a global view, 64 tokens each.
IMAGE_TOKENS_GUESS = 1088
CHARS_PER_TOKEN = 3  # a pessimistic average for English with SmolVLM's tokenizer
TURN_OVERHEAD_TOKENS = 8  # role markers and separators of the chat template, per turn
# Asked when an image comes without a question: the stored prompt says what the model saw.
DEFAULT_IMAGE_QUESTION = "What is in this image?"


@dataclass(frozen=True)
class Question:
    """A question as the model will see it.

    `images` are the question's own (normalised, in memory, or stored files for 🔁); `history`
    holds turns in the store's shape (`{"role", "content", "images": [sha256]}`), oldest first,
    and `history_images` maps each hash it names to its stored file.
    """

    text: str
    images: tuple[NormalizedImage | StoredImage, ...] = ()
    history: tuple[dict[str, Any], ...] = ()
    history_images: Mapping[str, StoredImage] = field(default_factory=dict)

    def with_history(self, history: Sequence[dict[str, Any]]) -> Question:
        return Question(self.text, self.images, tuple(history), self.history_images)


def text_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + TURN_OVERHEAD_TOKENS


def trim_history(
    turns: Sequence[Mapping[str, Any]], *, max_turns: int, max_images: int
) -> list[dict[str, Any]]:
    """The last `max_turns` turns, starting with a user turn, keeping only the last `max_images` images."""
    kept = [dict(turn) for turn in turns[-max_turns:]] if max_turns > 0 else []
    while kept and kept[0]["role"] != "user":
        kept.pop(0)
    budget = max_images
    for turn in reversed(kept):
        if turn["role"] != "user":
            continue
        images = list(turn.get("images") or [])
        keep = images[len(images) - budget :] if budget > 0 else []
        budget -= len(keep)
        turn["images"] = keep
    return kept


def drop_oldest_exchange(turns: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history without its oldest user turn (and the answer to it)."""
    rest = list(turns[1:])
    while rest and rest[0]["role"] != "user":
        rest.pop(0)
    return rest


def fit_history(
    turns: Sequence[dict[str, Any]],
    *,
    question: str,
    own_images: int,
    image_tokens: int,
    max_tokens: int,
    max_model_len: int | None,
) -> list[dict[str, Any]]:
    """Drop the oldest exchanges until history, question, images and the answer fit the context."""
    history = list(turns)
    if not max_model_len:
        return history

    def estimate(history: Sequence[dict[str, Any]]) -> int:
        images = own_images + sum(len(turn.get("images") or ()) for turn in history)
        texts = sum(text_tokens(turn["content"]) for turn in history) + text_tokens(question)
        return texts + images * image_tokens + max_tokens

    while history and estimate(history) > max_model_len:
        history = drop_oldest_exchange(history)
    return history


async def _data_url(image: NormalizedImage | StoredImage) -> str:
    if isinstance(image, NormalizedImage):
        return to_data_url(image)
    data = await asyncio.to_thread(image.path.read_bytes)  # stored files are normalised already
    return f"data:{image.mime};base64,{base64.b64encode(data).decode('ascii')}"


async def _user_turn(text: str, images: Sequence[NormalizedImage | StoredImage]) -> dict[str, Any]:
    if not images:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": await _data_url(image)}} for image in images
    ]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


async def worker_messages(question: Question) -> list[dict[str, Any]]:
    """The OpenAI-style messages for the worker: history turns with their images, then the question."""
    messages = []
    for turn in question.history:
        if turn["role"] == "assistant":
            # Stripped as training renders it (feedback.store.export): the template adds the space itself.
            messages.append({"role": "assistant", "content": turn["content"].strip()})
        else:
            images = [question.history_images[sha] for sha in turn.get("images") or ()]
            messages.append(await _user_turn(turn["content"], images))
    messages.append(await _user_turn(question.text, question.images))
    return messages
