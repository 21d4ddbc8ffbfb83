"""Questions: recording them with their images and history, and reading them back (🔁, follow-ups)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.consent import guild_consent, opt_out_reason
from feedback.store.db import (
    dialect_insert,
    hold_writes,
    transaction,
)
from feedback.store.errors import (
    AlreadyRecorded,
    InvalidHistory,
    InvalidImage,
    UnknownPrompt,
    UnknownResponse,
)
from feedback.store.history import canonical_history, history_turn_rows, prompt_key
from feedback.store.images import StoredImage, accept_image, image_file, write_image_file
from feedback.store.models import (
    FollowUp,
    HistoryTurn,
    Image,
    Prompt,
    PromptImage,
    Response,
    ResponseMessage,
    utcnow,
)
from feedback.store.responses import message_kind

if TYPE_CHECKING:
    from smolcord.images import NormalizedImage
    from smolcord.settings import Settings

__all__ = [
    "Conversation",
    "PromptView",
    "RecordedPrompt",
    "find_prompt",
    "get_conversation",
    "get_prompt",
    "record_prompt",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordedPrompt:
    """What `record_prompt` stored."""

    id: int
    key: str
    trainable: bool
    images: tuple[StoredImage, ...]


@dataclass(frozen=True)
class PromptView:
    """A stored prompt with everything needed to ask the model again (🔁) or to build a follow-up."""

    id: int
    key: str
    guild_id: int | None
    channel_id: int
    message_id: int | None
    author_id: int
    question: str
    history: list[dict[str, Any]]
    images: tuple[StoredImage, ...]  # the history's images first, then the question's own
    trainable: bool
    created_at: datetime
    response_ids: tuple[int, ...]
    parent_response_id: int | None

    @property
    def own_images(self) -> tuple[StoredImage, ...]:
        """The images attached to the question itself."""
        return tuple(image for image in self.images if not image.in_history)


@dataclass(frozen=True)
class Conversation:
    """The turns a reply to a message continues: pass `turns` as the new prompt's history.

    Turns are `{"role": "user", "content": str, "images": [sha256, ...], "source_prompt_id": id}`
    and `{"role": "assistant", "content": str, "source_response_id": id}`, oldest first (a turn
    whose source is unknown has no source key); `images` maps every hash to its file.
    The bot trims them to SMOLCORD_HISTORY_TURNS / _HISTORY_IMAGES before asking the model.
    """

    prompt_id: int
    parent_response_id: int | None  # pass as record_prompt(parent_response_id=...) for the follow-up
    turns: list[dict[str, Any]]
    images: dict[str, StoredImage]


async def record_prompt(
    session: AsyncSession,
    *,
    settings: Settings,
    guild_id: int | None,
    channel_id: int,
    message_id: int | None,
    author_id: int,
    question: str,
    images: Sequence[NormalizedImage | bytes] = (),
    history: Sequence[Mapping[str, Any]] = (),
    parent_response_id: int | None = None,
    parent_channel_id: int | None = None,
) -> RecordedPrompt:
    """Store a question as the model saw it, with where each history turn came from; trainable is decided here.

    A history turn names its source as `get_conversation` gives it: `source_prompt_id` (a user
    turn: that prompt's question) or `source_response_id` (an assistant turn: that answer). The
    source's author and guild are read here, not taken from the caller; a source that no longer
    exists refuses the prompt (UnknownPrompt / UnknownResponse: it was deleted meanwhile, and its
    words must not be stored again). A turn without a source is stored as unknown, which keeps
    the prompt out of training.
    """
    # Everything that can be refused is checked before the first write.
    if len(images) > settings.max_images:
        raise InvalidImage(
            f"{len(images)} images is over SMOLCORD_MAX_IMAGES ({settings.max_images})", code="too_many"
        )
    accepted = [accept_image(settings, image) for image in images]
    turns = canonical_history(history)
    history_hashes = [sha for turn in turns for sha in turn.get("images", [])]
    key = prompt_key(image_hashes=[image.sha256 for image in accepted], question=question, history=turns)

    async with transaction(session):
        # Sources are checked and the prompt written under one lock: a deletion of a quoted row
        # either finished before (the source is gone: refused) or waits and then finds this prompt.
        await hold_writes(session)
        kind = None if message_id is None else await message_kind(session, message_id)
        if kind is not None and message_id is not None:
            raise AlreadyRecorded(message_id, kind)
        if history_hashes:
            known = set(
                await session.scalars(select(Image.sha256).where(Image.sha256.in_(set(history_hashes))))
            )
            missing = sorted(set(history_hashes) - known)
            if missing:
                raise InvalidHistory(f"the history names images the store does not have: {missing[:3]}")
        if parent_response_id is not None and await session.get(Response, parent_response_id) is None:
            raise UnknownResponse(f"no response {parent_response_id} to follow up on")
        provenance = await history_turn_rows(session, history, turns)
        trainable = False
        if guild_id is not None:  # never for DMs
            consent = await guild_consent(session, settings, guild_id)
            trainable = consent.learning and await opt_out_reason(session, author_id) is None

        if accepted:
            insert_images = dialect_insert(session, Image).on_conflict_do_nothing(index_elements=["sha256"])
            await session.execute(
                insert_images,
                [
                    {
                        "sha256": image.sha256,
                        "mime": image.mime,
                        "suffix": image.suffix,
                        "width": image.width,
                        "height": image.height,
                        "size_bytes": len(image.data),
                        "created_at": utcnow(),
                    }
                    for image in accepted
                ],
            )
        prompt = Prompt(
            key=key,
            guild_id=guild_id,
            channel_id=channel_id,
            parent_channel_id=parent_channel_id,
            message_id=message_id,
            author_id=author_id,
            question=question,
            history=turns,
            trainable=trainable,
        )
        session.add(prompt)
        try:
            await session.flush()
        except IntegrityError:  # the same message recorded concurrently
            raise AlreadyRecorded(message_id or 0, "a prompt") from None
        links = [(sha, True) for sha in history_hashes] + [(image.sha256, False) for image in accepted]
        if links:
            await session.execute(
                dialect_insert(session, PromptImage),
                [
                    {"prompt_id": prompt.id, "position": n, "image_sha256": sha, "in_history": in_history}
                    for n, (sha, in_history) in enumerate(links)
                ],
            )
        if provenance:
            try:
                await session.execute(
                    dialect_insert(session, HistoryTurn),
                    [{"prompt_id": prompt.id, "position": n, **row} for n, row in enumerate(provenance)],
                )
            except IntegrityError:  # a source deleted concurrently (PostgreSQL): do not store its words
                raise UnknownPrompt("a quoted turn was deleted while the prompt was recorded") from None
        if parent_response_id is not None:
            session.add(FollowUp(prompt_id=prompt.id, parent_response_id=parent_response_id))
            await session.flush()
        # Files last, while this transaction holds the write lock: a concurrent deletion of the
        # same image either committed before (we write the file again) or waits for us.
        stored = []
        for image in accepted:
            path = image_file(settings.images_dir, image.sha256, image.suffix)
            await asyncio.to_thread(write_image_file, path, image.data)
            stored.append(StoredImage(image.sha256, image.mime, path))
    log.info(
        "recorded prompt %s (guild %s, %d images, trainable=%s)", prompt.id, guild_id, len(stored), trainable
    )
    return RecordedPrompt(prompt.id, key, trainable, tuple(stored))


async def _prompt_view(session: AsyncSession, settings: Settings, prompt: Prompt) -> PromptView:
    image_rows = (
        await session.execute(
            select(PromptImage.image_sha256, PromptImage.in_history, Image.mime, Image.suffix)
            .join(Image, Image.sha256 == PromptImage.image_sha256)
            .where(PromptImage.prompt_id == prompt.id)
            .order_by(PromptImage.position)
        )
    ).all()
    response_ids = tuple(
        await session.scalars(
            select(Response.id).where(Response.prompt_id == prompt.id).order_by(Response.id)
        )
    )
    parent = await session.scalar(select(FollowUp.parent_response_id).where(FollowUp.prompt_id == prompt.id))
    return PromptView(
        id=prompt.id,
        key=prompt.key,
        guild_id=prompt.guild_id,
        channel_id=prompt.channel_id,
        message_id=prompt.message_id,
        author_id=prompt.author_id,
        question=prompt.question,
        history=list(prompt.history),
        images=tuple(
            StoredImage(sha, mime, image_file(settings.images_dir, sha, suffix), in_history)
            for sha, in_history, mime, suffix in image_rows
        ),
        trainable=prompt.trainable,
        created_at=prompt.created_at,
        response_ids=response_ids,
        parent_response_id=parent,
    )


async def get_prompt(session: AsyncSession, *, settings: Settings, prompt_id: int) -> PromptView:
    """A prompt with its question, images (files) and history, to ask again (🔁); UnknownPrompt if none."""
    async with transaction(session):
        prompt = await session.get(Prompt, prompt_id)
        if prompt is None:
            raise UnknownPrompt(f"no prompt {prompt_id}")
        return await _prompt_view(session, settings, prompt)


async def find_prompt(session: AsyncSession, *, settings: Settings, message_id: int) -> PromptView | None:
    """The prompt recorded for a question's Discord message, or None."""
    async with transaction(session):
        prompt = await session.scalar(select(Prompt).where(Prompt.message_id == message_id))
        return None if prompt is None else await _prompt_view(session, settings, prompt)


async def get_conversation(
    session: AsyncSession, *, settings: Settings, message_id: int
) -> Conversation | None:
    """The conversation a reply to `message_id` continues (an answer's chunk, or a question); None if unknown."""
    async with transaction(session):
        response_id = await session.scalar(
            select(ResponseMessage.response_id).where(ResponseMessage.message_id == message_id)
        )
        response = await session.get(Response, response_id) if response_id is not None else None
        if response is not None:
            prompt = await session.get(Prompt, response.prompt_id)
        else:
            prompt = await session.scalar(select(Prompt).where(Prompt.message_id == message_id))
        if prompt is None:
            return None
        view = await _prompt_view(session, settings, prompt)
        sources = {
            row.position: row
            for row in await session.scalars(select(HistoryTurn).where(HistoryTurn.prompt_id == prompt.id))
        }
    turns = []
    for position, turn in enumerate(view.history):
        turn = dict(turn)
        source = sources.get(position)
        # the quoted turns keep naming where they came from (an unknown source stays unknown)
        if source is not None and turn["role"] == "user" and source.source_prompt_id is not None:
            turn["source_prompt_id"] = source.source_prompt_id
        elif source is not None and turn["role"] == "assistant" and source.source_response_id is not None:
            turn["source_response_id"] = source.source_response_id
        turns.append(turn)
    turns.append(
        {
            "role": "user",
            "content": view.question,
            "images": [i.sha256 for i in view.own_images],
            "source_prompt_id": view.id,
        }
    )
    if response is not None:
        turns.append({"role": "assistant", "content": response.text, "source_response_id": response.id})
    return Conversation(
        prompt_id=view.id,
        parent_response_id=response.id if response is not None else None,
        turns=turns,
        images={image.sha256: image for image in view.images},
    )
