"""The history of a prompt: its stored shape, the prompt key, and where each quoted turn came from."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import (
    chunks,
)
from feedback.store.errors import (
    InvalidHistory,
    UnknownPrompt,
    UnknownResponse,
)
from feedback.store.models import (
    Prompt,
    PromptImage,
    Response,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "canonical_history",
    "prompt_key",
]


_SHA256 = re.compile(r"[0-9a-f]{64}")  # fullmatch only: `$` would accept a trailing newline


def canonical_history(history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The history in its stored shape (user turns with `images`, assistant turns without); InvalidHistory otherwise."""
    if isinstance(history, str | bytes | Mapping):
        raise InvalidHistory("history must be a list of turns")
    turns: list[dict[str, Any]] = []
    for number, turn in enumerate(history):
        if not isinstance(turn, Mapping):
            raise InvalidHistory(f"history turn {number} is not a mapping")
        role, content = turn.get("role"), turn.get("content")
        if role not in ("user", "assistant"):
            raise InvalidHistory(f"history turn {number}: role must be 'user' or 'assistant', not {role!r}")
        if not isinstance(content, str):
            raise InvalidHistory(f"history turn {number}: content must be a string")
        for key, value in _turn_source(turn).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidHistory(f"history turn {number}: {key} must be an id")
        wrong = "source_response_id" if role == "user" else "source_prompt_id"
        if turn.get(wrong) is not None:
            raise InvalidHistory(f"history turn {number}: a {role} turn has no {wrong}")
        images = list(turn.get("images") or [])
        if role == "assistant":
            if images:
                raise InvalidHistory(f"history turn {number}: assistant turns carry no images")
            turns.append({"role": "assistant", "content": content})
            continue
        for sha in images:
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
                raise InvalidHistory(f"history turn {number}: images are sha256 hex digests, got {sha!r}")
        turns.append({"role": "user", "content": content, "images": images})
    return turns


def _turn_source(turn: Mapping[str, Any]) -> dict[str, Any]:
    return {key: turn.get(key) for key in ("source_prompt_id", "source_response_id")}


def prompt_key(*, image_hashes: Sequence[str], question: str, history: Sequence[Mapping[str, Any]]) -> str:
    """The hash that makes prompts comparable: same images, question and history give the same key."""
    canonical = json.dumps(
        {"images": list(image_hashes), "question": question, "history": canonical_history(history)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


async def history_turn_rows(
    session: AsyncSession, history: Sequence[Mapping[str, Any]], turns: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One history_turns row per turn: its source as named, checked against the store, with the source's author and guild."""
    sources = [_turn_source(turn) for turn in history]
    prompt_ids = {s["source_prompt_id"] for s in sources if s["source_prompt_id"] is not None}
    response_ids = {s["source_response_id"] for s in sources if s["source_response_id"] is not None}
    prompts: dict[int, tuple[str, int, int | None]] = {}
    own_images: dict[int, set[str]] = {}
    for batch in chunks(sorted(prompt_ids)):
        found_prompts = await session.execute(
            select(Prompt.id, Prompt.question, Prompt.author_id, Prompt.guild_id).where(Prompt.id.in_(batch))
        )
        prompts.update({row[0]: (row[1], row[2], row[3]) for row in found_prompts})
        links = await session.execute(
            select(PromptImage.prompt_id, PromptImage.image_sha256).where(
                PromptImage.prompt_id.in_(batch), PromptImage.in_history.is_(False)
            )
        )
        for prompt_id, sha in links:
            own_images.setdefault(prompt_id, set()).add(sha)
    responses: dict[int, tuple[str, int, int, int | None]] = {}
    for batch in chunks(sorted(response_ids)):
        found_responses = await session.execute(
            select(Response.id, Response.text, Response.prompt_id, Prompt.author_id, Prompt.guild_id)
            .join(Prompt, Prompt.id == Response.prompt_id)
            .where(Response.id.in_(batch))
        )
        responses.update({row[0]: (row[1], row[2], row[3], row[4]) for row in found_responses})
    rows: list[dict[str, Any]] = []
    for number, (turn, source) in enumerate(zip(turns, sources, strict=True)):
        row: dict[str, Any] = {
            "source_prompt_id": None,
            "source_response_id": None,
            "author_id": None,
            "guild_id": None,
        }
        if source["source_prompt_id"] is not None:
            found = prompts.get(source["source_prompt_id"])
            if found is None:
                raise UnknownPrompt(
                    f"history turn {number} quotes prompt {source['source_prompt_id']}, which is gone"
                )
            question, author_id, guild_id = found
            if turn["content"] != question or not set(turn["images"]) <= own_images.get(
                source["source_prompt_id"], set()
            ):
                raise InvalidHistory(f"history turn {number} is not what its source prompt asked")
            row.update(source_prompt_id=source["source_prompt_id"], author_id=author_id, guild_id=guild_id)
        elif source["source_response_id"] is not None:
            answer = responses.get(source["source_response_id"])
            if answer is None:
                raise UnknownResponse(
                    f"history turn {number} quotes response {source['source_response_id']}, which is gone"
                )
            text, answered_prompt, author_id, guild_id = answer
            if turn["content"] != text:
                raise InvalidHistory(f"history turn {number} is not what its source response said")
            row.update(
                source_prompt_id=answered_prompt,
                source_response_id=source["source_response_id"],
                author_id=author_id,
                guild_id=guild_id,
            )
        rows.append(row)
    return rows
