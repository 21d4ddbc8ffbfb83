"""Answers: recording them with their Discord messages, and looking them up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import (
    dialect_insert,
    transaction,
)
from feedback.store.errors import (
    AlreadyRecorded,
    UnknownPrompt,
    UnknownResponse,
)
from feedback.store.models import (
    Prompt,
    Response,
    ResponseMessage,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "ResponseView",
    "add_response_messages",
    "count_regenerations",
    "find_response",
    "get_response",
    "record_response",
]


@dataclass(frozen=True)
class ResponseView:
    """A stored response with where it was posted and who asked."""

    id: int
    prompt_id: int
    text: str
    message_ids: tuple[int, ...]
    adapter_version: str | None
    sampling: dict[str, Any]
    regenerated: bool
    requested_by: int | None
    created_at: datetime
    guild_id: int | None
    channel_id: int
    prompt_message_id: int | None
    prompt_author_id: int


async def message_kind(session: AsyncSession, message_id: int) -> str | None:
    """What a Discord message is stored as ("a prompt", "a response"), or None; in the caller's transaction."""
    if await session.scalar(select(Prompt.id).where(Prompt.message_id == message_id)) is not None:
        return "a prompt"
    if await session.get(ResponseMessage, message_id) is not None:
        return "a response"
    return None


async def _insert_messages(
    session: AsyncSession, response_id: int, message_ids: Sequence[int], start: int
) -> None:
    for message_id in message_ids:
        kind = await message_kind(session, message_id)
        if kind is not None:
            raise AlreadyRecorded(message_id, kind)
    if len(set(message_ids)) != len(message_ids):
        raise ValueError("message_ids has duplicates")
    if message_ids:
        try:
            await session.execute(
                dialect_insert(session, ResponseMessage),
                [
                    {"message_id": message_id, "response_id": response_id, "position": start + n}
                    for n, message_id in enumerate(message_ids)
                ],
            )
        except IntegrityError:  # recorded concurrently
            raise AlreadyRecorded(message_ids[0], "a response") from None


async def record_response(
    session: AsyncSession,
    *,
    prompt_id: int,
    text: str,
    message_ids: Sequence[int] = (),
    adapter_version: str | None = None,
    sampling: Mapping[str, Any] | None = None,
    latency_ms: float | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    requested_by: int | None = None,
    regenerated: bool = False,
) -> int:
    """Store an answer to a prompt with the Discord message ids of its chunks; returns its id."""
    message_ids = list(message_ids)
    async with transaction(session):
        if await session.get(Prompt, prompt_id) is None:
            raise UnknownPrompt(f"no prompt {prompt_id} (deleted or forgotten since it was asked?)")
        response = Response(
            prompt_id=prompt_id,
            text=text,
            adapter_version=adapter_version,
            sampling=dict(sampling or {}),
            latency_ms=latency_ms,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            requested_by=requested_by,
            regenerated=regenerated,
        )
        session.add(response)
        try:
            await session.flush()
        except IntegrityError:  # the prompt was deleted between the check and the insert
            raise UnknownPrompt(f"no prompt {prompt_id}") from None
        await _insert_messages(session, response.id, message_ids, 0)
    return response.id


async def add_response_messages(
    session: AsyncSession, *, response_id: int, message_ids: Sequence[int]
) -> None:
    """Add the Discord message ids of more chunks of a response (ids it already has are skipped)."""
    async with transaction(session):
        if await session.get(Response, response_id) is None:
            raise UnknownResponse(f"no response {response_id}")
        existing = list(
            await session.scalars(
                select(ResponseMessage.message_id).where(ResponseMessage.response_id == response_id)
            )
        )
        fresh = [message_id for message_id in dict.fromkeys(message_ids) if message_id not in existing]
        await _insert_messages(session, response_id, fresh, len(existing))


async def _response_view(session: AsyncSession, where: Any) -> ResponseView | None:
    row = (
        await session.execute(
            select(Response, Prompt.guild_id, Prompt.channel_id, Prompt.message_id, Prompt.author_id)
            .join(Prompt, Prompt.id == Response.prompt_id)
            .where(where)
        )
    ).first()
    if row is None:
        return None
    response: Response = row[0]
    message_ids = tuple(
        await session.scalars(
            select(ResponseMessage.message_id)
            .where(ResponseMessage.response_id == response.id)
            .order_by(ResponseMessage.position)
        )
    )
    return ResponseView(
        id=response.id,
        prompt_id=response.prompt_id,
        text=response.text,
        message_ids=message_ids,
        adapter_version=response.adapter_version,
        sampling=dict(response.sampling or {}),
        regenerated=response.regenerated,
        requested_by=response.requested_by,
        created_at=response.created_at,
        guild_id=row[1],
        channel_id=row[2],
        prompt_message_id=row[3],
        prompt_author_id=row[4],
    )


async def find_response(session: AsyncSession, *, message_id: int) -> ResponseView | None:
    """The response that any of its Discord messages belongs to, or None."""
    async with transaction(session):
        response_id = await session.scalar(
            select(ResponseMessage.response_id).where(ResponseMessage.message_id == message_id)
        )
        if response_id is None:
            return None
        return await _response_view(session, Response.id == response_id)


async def get_response(session: AsyncSession, *, response_id: int) -> ResponseView:
    """A response by id; UnknownResponse if there is none."""
    async with transaction(session):
        view = await _response_view(session, Response.id == response_id)
    if view is None:
        raise UnknownResponse(f"no response {response_id}")
    return view


async def count_regenerations(session: AsyncSession, *, user_id: int, since: datetime) -> int:
    """How many 🔁 answers a user asked for since a time (for SMOLCORD_REGEN_PER_HOUR)."""
    async with transaction(session):
        return int(
            await session.scalar(
                select(func.count())
                .select_from(Response)
                .where(
                    Response.requested_by == user_id,
                    Response.regenerated.is_(True),
                    Response.created_at >= since,
                )
            )
            or 0
        )
