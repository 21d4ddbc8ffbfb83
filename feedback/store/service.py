"""The feedback store's service functions: everything the bot and the trainer read or write.

Every function takes an `AsyncSession` with no transaction open, and keyword arguments only; it
runs one transaction and commits it, or raises a `feedback.store.errors.FeedbackError` (or lets a
database error through) having written nothing. Results are frozen dataclasses, never ORM
objects, so nothing lazy-loads after the session is gone.

Privacy rules, in one place:
- Prompts and answers are always stored (follow-ups, 🔁 and 🗑️ need them); a prompt is
  `trainable` only if its guild had learning on and its author had not opted out when it was
  recorded, and never in a DM. Pair building checks the guild and the users again (feedback.store.pairs).
- Votes of opted-out or forgotten users are not stored from then on (their earlier votes stay
  stored while opted out, but never reach training; forgetting deletes them).
- Deleting takes along everything that carries the deleted content: a prompt takes its answers,
  their messages and votes, the pairs runs recorded with them, its images once no other prompt
  uses them (rows and files), and every follow-up prompt whose history quotes it; an answer takes
  its messages, votes and follow-ups. Children are deleted explicitly (not only through
  ON DELETE CASCADE), so a connection without foreign keys enforced cannot leave orphans.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import chunks, dialect_insert, transaction
from feedback.store.errors import (
    AlreadyRecorded,
    ImageTooLarge,
    InvalidHistory,
    InvalidImage,
    UnknownPrompt,
    UnknownResponse,
    UnknownRun,
)
from feedback.store.models import (
    AdapterVersion,
    FollowUp,
    GuildSettings,
    Image,
    OptedOutUser,
    Prompt,
    PromptImage,
    Reaction,
    Response,
    ResponseMessage,
    TrainingRun,
    TrainingRunPair,
    utcnow,
)
from feedback.store.votes import THUMBS_DOWN_VARIANTS, THUMBS_UP_VARIANTS, canonical_vote_emoji

if TYPE_CHECKING:
    from feedback.store.pairs import PreferencePair, RatedAnswer
    from smolcord.images import NormalizedImage
    from smolcord.settings import Settings

__all__ = [
    "AdapterRecord",
    "AdapterVotes",
    "Conversation",
    "Deletion",
    "GuildConsent",
    "PromptView",
    "RecordedPrompt",
    "ResponseView",
    "StoreStats",
    "StoredImage",
    "TrainingRunView",
    "add_response_messages",
    "canonical_history",
    "clear_message_reactions",
    "clear_reaction",
    "count_regenerations",
    "delete_message",
    "delete_response",
    "find_prompt",
    "find_response",
    "finish_training_run",
    "forget_user",
    "get_conversation",
    "get_guild_settings",
    "get_prompt",
    "get_response",
    "get_training_run",
    "get_user_status",
    "last_training_run",
    "list_adapters",
    "new_pairs",
    "opt_in",
    "opt_out",
    "promote_adapter",
    "prompt_key",
    "purge_expired",
    "record_adapter",
    "record_prompt",
    "record_response",
    "record_rollback",
    "reject_adapter",
    "run_pair_ids",
    "set_learning",
    "set_reaction",
    "set_voter_role",
    "start_training_run",
    "store_stats",
]

log = logging.getLogger(__name__)

OPTED_OUT = "opted_out"
FORGOTTEN = "forgotten"
RUN_STATUSES = ("running", "succeeded", "failed", "skipped")
# Files younger than this are never swept as orphans: a prompt being recorded writes its image
# file before its transaction commits.
ORPHAN_FILE_GRACE_S = 3600
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"


# ====================================================================== results


@dataclass(frozen=True)
class StoredImage:
    """An image as stored: its hash, type, file, and whether it came with the history."""

    sha256: str
    mime: str
    path: Path
    in_history: bool = False


@dataclass(frozen=True)
class RecordedPrompt:
    """What `record_prompt` stored."""

    id: int
    key: str
    trainable: bool
    images: tuple[StoredImage, ...]


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

    Turns are `{"role": "user", "content": str, "images": [sha256, ...]}` and
    `{"role": "assistant", "content": str}`, oldest first; `images` maps every hash to its file.
    The bot trims them to SMOLCORD_HISTORY_TURNS / _HISTORY_IMAGES before asking the model.
    """

    prompt_id: int
    parent_response_id: int | None  # pass as record_prompt(parent_response_id=...) for the follow-up
    turns: list[dict[str, Any]]
    images: dict[str, StoredImage]


@dataclass(frozen=True)
class Deletion:
    """What a deletion removed; `message_ids` are the Discord messages of deleted responses."""

    prompt_ids: tuple[int, ...] = ()
    response_ids: tuple[int, ...] = ()
    message_ids: tuple[int, ...] = ()
    reactions: int = 0
    images: tuple[str, ...] = ()  # sha256 of images whose rows and files were removed

    @property
    def nothing(self) -> bool:
        return not (self.prompt_ids or self.response_ids or self.reactions)


@dataclass(frozen=True)
class GuildConsent:
    """A guild's learning consent and voter role (`explicit`: its admins set them; else the defaults)."""

    guild_id: int
    learning: bool
    voter_role_id: int | None
    explicit: bool


@dataclass(frozen=True)
class TrainingRunView:
    """A training run and how many pairs (or rated answers) it recorded."""

    id: int
    method: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    adapter_version: str | None
    metrics: dict[str, Any] | None
    error: str | None
    pairs: int
    heldout: int


@dataclass(frozen=True)
class AdapterRecord:
    """One adapter version's history."""

    version: str
    status: str
    run_id: int | None
    metrics: dict[str, Any] | None
    created_at: datetime
    promoted_at: datetime | None
    rolled_back_at: datetime | None


@dataclass(frozen=True)
class AdapterVotes:
    """Votes on the answers of one adapter version (None: the base model)."""

    adapter_version: str | None
    up: int
    down: int

    @property
    def up_share(self) -> float | None:
        """👍 / (👍 + 👎), None before any vote."""
        total = self.up + self.down
        return self.up / total if total else None


@dataclass(frozen=True)
class StoreStats:
    """Counts for `/stats` and the nightly scheduler."""

    prompts: int
    trainable_prompts: int
    responses: int
    votes: int  # (response, user) pairs with a 👍 or 👎 present
    pairs: int  # pairs a run would train on now (after every rule and the voter-share cap)
    new_pairs: int  # of those, not used by the last successful run
    pairs_needed: int  # new pairs still missing before the nightly run trains (SMOLCORD_MIN_NEW_PAIRS)
    last_run: TrainingRunView | None
    by_adapter: tuple[AdapterVotes, ...] = field(default_factory=tuple)


# ====================================================================== prompts and responses


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
        images = list(turn.get("images") or [])
        if role == "assistant":
            if images:
                raise InvalidHistory(f"history turn {number}: assistant turns carry no images")
            turns.append({"role": "assistant", "content": content})
            continue
        for sha in images:
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise InvalidHistory(f"history turn {number}: images are sha256 hex digests, got {sha!r}")
        turns.append({"role": "user", "content": content, "images": images})
    return turns


def prompt_key(*, image_hashes: Sequence[str], question: str, history: Sequence[Mapping[str, Any]]) -> str:
    """The hash that makes prompts comparable: same images, question and history give the same key."""
    canonical = json.dumps(
        {"images": list(image_hashes), "question": question, "history": canonical_history(history)},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _image_file(images_dir: Path, sha256: str, suffix: str) -> Path:
    from smolcord.images import image_path

    return image_path(images_dir, sha256, suffix)


def _accept_image(settings: Settings, image: NormalizedImage | bytes) -> NormalizedImage:
    """The image as the store keeps it: bytes are normalised here, a NormalizedImage is checked."""
    from smolcord.images import ImageError, normalize_for

    if isinstance(image, bytes | bytearray | memoryview):
        try:
            return normalize_for(settings, bytes(image))
        except ImageError as exc:
            error = ImageTooLarge if exc.code in {"too_large", "too_many_pixels"} else InvalidImage
            raise error(exc.message, code=exc.code) from None
    data = image.data
    if len(data) > settings.max_image_bytes:
        raise ImageTooLarge(
            f"image of {len(data)} bytes is over SMOLCORD_MAX_IMAGE_BYTES ({settings.max_image_bytes})"
        )
    if image.width * image.height > settings.max_image_pixels:
        raise ImageTooLarge(
            f"image of {image.width}×{image.height} is over SMOLCORD_MAX_IMAGE_PIXELS", code="too_many_pixels"
        )
    if max(image.width, image.height) > settings.max_image_edge:
        raise ImageTooLarge(
            f"image of {image.width}×{image.height} is over SMOLCORD_MAX_IMAGE_EDGE "
            f"({settings.max_image_edge}): normalise it first",
            code="too_large_edge",
        )
    if image.mime not in {"image/png", "image/jpeg"}:
        raise InvalidImage(f"not a normalised image type: {image.mime!r}", code="unsupported_image")
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise InvalidImage("the image bytes do not match their sha256", code="hash_mismatch")
    return image


def _write_image_file(path: Path, data: bytes) -> bool:
    """Write a content-addressed file once (temp + fsync + rename); True if it was written now."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


async def _opt_out_reason(session: AsyncSession, user_id: int) -> str | None:
    return await session.scalar(select(OptedOutUser.reason).where(OptedOutUser.user_id == user_id))


async def _guild_consent(session: AsyncSession, settings: Settings, guild_id: int) -> GuildConsent:
    row = await session.get(GuildSettings, guild_id)
    if row is None:
        return GuildConsent(guild_id, settings.learning_default, None, explicit=False)
    return GuildConsent(guild_id, row.learning, row.voter_role_id, explicit=True)


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
) -> RecordedPrompt:
    """Store a question as the model saw it; images are saved once by hash; trainable is decided here."""
    # Everything that can be refused is checked before the first write.
    if len(images) > settings.max_images:
        raise InvalidImage(
            f"{len(images)} images is over SMOLCORD_MAX_IMAGES ({settings.max_images})", code="too_many"
        )
    accepted = [_accept_image(settings, image) for image in images]
    turns = canonical_history(history)
    history_hashes = [sha for turn in turns for sha in turn.get("images", [])]
    key = prompt_key(image_hashes=[image.sha256 for image in accepted], question=question, history=turns)

    async with transaction(session):
        kind = None if message_id is None else await _message_kind(session, message_id)
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
        trainable = False
        if guild_id is not None:  # never for DMs
            consent = await _guild_consent(session, settings, guild_id)
            trainable = consent.learning and await _opt_out_reason(session, author_id) is None

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
        if parent_response_id is not None:
            session.add(FollowUp(prompt_id=prompt.id, parent_response_id=parent_response_id))
            await session.flush()
        # Files last, while this transaction holds the write lock: a concurrent deletion of the
        # same image either committed before (we write the file again) or waits for us.
        stored = []
        for image in accepted:
            path = _image_file(settings.images_dir, image.sha256, image.suffix)
            await asyncio.to_thread(_write_image_file, path, image.data)
            stored.append(StoredImage(image.sha256, image.mime, path))
    log.info(
        "recorded prompt %s (guild %s, %d images, trainable=%s)", prompt.id, guild_id, len(stored), trainable
    )
    return RecordedPrompt(prompt.id, key, trainable, tuple(stored))


async def _message_kind(session: AsyncSession, message_id: int) -> str | None:
    if await session.scalar(select(Prompt.id).where(Prompt.message_id == message_id)) is not None:
        return "a prompt"
    if await session.get(ResponseMessage, message_id) is not None:
        return "a response"
    return None


async def _insert_messages(
    session: AsyncSession, response_id: int, message_ids: Sequence[int], start: int
) -> None:
    for message_id in message_ids:
        kind = await _message_kind(session, message_id)
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


# ====================================================================== reactions


def _response_of(message_id: int) -> Any:
    """The response id that a Discord message carries (a scalar subquery)."""
    return (
        select(ResponseMessage.response_id).where(ResponseMessage.message_id == message_id).scalar_subquery()
    )


async def set_reaction(
    session: AsyncSession,
    *,
    message_id: int,
    user_id: int,
    emoji: str,
    member_role_ids: Collection[int] | None = None,
) -> bool:
    """Record a 👍/👎 on a response message with the voter's eligibility; False if ignored (opted out)."""
    emoji = canonical_vote_emoji(emoji)  # NotAVote before anything is read or written
    async with transaction(session):
        # One read for all that decides the write (the bot calls this for every reaction).
        opted_out = select(OptedOutUser.user_id).where(OptedOutUser.user_id == user_id).exists()
        found = (
            await session.execute(
                select(ResponseMessage.response_id, GuildSettings.voter_role_id, opted_out)
                .join(Response, Response.id == ResponseMessage.response_id)
                .join(Prompt, Prompt.id == Response.prompt_id)
                .outerjoin(GuildSettings, GuildSettings.guild_id == Prompt.guild_id)
                .where(ResponseMessage.message_id == message_id)
            )
        ).first()
        if found is None:
            raise UnknownResponse(f"message {message_id} is not a stored response")
        response_id, role_id, is_opted_out = found
        if is_opted_out:
            return False
        holds = role_id is not None and member_role_ids is not None and role_id in member_role_ids
        now = utcnow()
        insert = dialect_insert(session, Reaction).values(
            response_id=response_id,
            user_id=user_id,
            emoji=emoji,
            voter_role_id=role_id,
            holds_voter_role=holds,
            created_at=now,
            updated_at=now,
        )
        # One statement, race-free: a concurrent add of the same reaction updates instead of failing.
        upsert = insert.on_conflict_do_update(
            index_elements=["response_id", "user_id", "emoji"],
            set_={
                "voter_role_id": insert.excluded.voter_role_id,
                "holds_voter_role": insert.excluded.holds_voter_role,
                "updated_at": insert.excluded.updated_at,
            },
        )
        try:
            await session.execute(upsert)
        except IntegrityError:  # the response was deleted between the lookup and the upsert
            raise UnknownResponse(f"message {message_id} is not a stored response") from None
    return True


async def clear_reaction(session: AsyncSession, *, message_id: int, user_id: int, emoji: str) -> bool:
    """Record that a user removed a 👍/👎; False if nothing was stored (an unknown message is no error)."""
    emoji = canonical_vote_emoji(emoji)
    async with transaction(session):
        result = await session.execute(
            delete(Reaction).where(
                Reaction.response_id == _response_of(message_id),
                Reaction.user_id == user_id,
                Reaction.emoji == emoji,
            )
        )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def clear_message_reactions(session: AsyncSession, *, message_id: int, emoji: str | None = None) -> int:
    """Remove every stored vote on a response message (or only those of one emoji); returns how many."""
    if emoji is not None:
        try:
            emoji = canonical_vote_emoji(emoji)
        except ValueError:
            return 0  # a cleared 🔁 or 🗑️: nothing of it is stored
    async with transaction(session):
        statement = delete(Reaction).where(Reaction.response_id == _response_of(message_id))
        if emoji is not None:
            statement = statement.where(Reaction.emoji == emoji)
        result = await session.execute(statement)
    return int(result.rowcount)  # type: ignore[attr-defined]


# ====================================================================== lookups


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
            StoredImage(sha, mime, _image_file(settings.images_dir, sha, suffix), in_history)
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
    turns = [dict(turn) for turn in view.history]
    turns.append({"role": "user", "content": view.question, "images": [i.sha256 for i in view.own_images]})
    if response is not None:
        turns.append({"role": "assistant", "content": response.text})
    return Conversation(
        prompt_id=view.id,
        parent_response_id=response.id if response is not None else None,
        turns=turns,
        images={image.sha256: image for image in view.images},
    )


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


# ====================================================================== deletion


async def _ids(session: AsyncSession, column: Any, where_column: Any, values: Iterable[Any]) -> set[Any]:
    found: set[Any] = set()
    for batch in chunks(sorted(set(values))):
        found.update(await session.scalars(select(column).where(where_column.in_(batch))))
    return found


async def _delete_where_in(session: AsyncSession, model: Any, column: Any, values: Iterable[Any]) -> int:
    count = 0
    for batch in chunks(sorted(set(values))):
        result = await session.execute(delete(model).where(column.in_(batch)))
        count += int(result.rowcount)  # type: ignore[attr-defined]
    return count


async def _delete_everything_of(
    session: AsyncSession,
    settings: Settings,
    *,
    prompt_ids: Iterable[int] = (),
    response_ids: Iterable[int] = (),
) -> Deletion:
    """Delete prompts and responses with everything that depends on or quotes them (in the caller's transaction)."""
    prompts, responses = set(prompt_ids), set(response_ids)
    # Closure: a prompt's responses; the follow-up prompts of a response (their history quotes it).
    frontier_prompts, frontier_responses = set(prompts), set(responses)
    while frontier_prompts or frontier_responses:
        more_responses = await _ids(session, Response.id, Response.prompt_id, frontier_prompts) - responses
        responses |= more_responses
        frontier_responses |= more_responses
        more_prompts = (
            await _ids(session, FollowUp.prompt_id, FollowUp.parent_response_id, frontier_responses) - prompts
        )
        prompts |= more_prompts
        frontier_prompts, frontier_responses = more_prompts, set()
    if not prompts and not responses:
        return Deletion()

    message_ids = await _ids(session, ResponseMessage.message_id, ResponseMessage.response_id, responses)
    image_shas = await _ids(session, PromptImage.image_sha256, PromptImage.prompt_id, prompts)

    await _delete_where_in(session, TrainingRunPair, TrainingRunPair.chosen_response_id, responses)
    await _delete_where_in(session, TrainingRunPair, TrainingRunPair.rejected_response_id, responses)
    reactions = await _delete_where_in(session, Reaction, Reaction.response_id, responses)
    await _delete_where_in(session, ResponseMessage, ResponseMessage.response_id, responses)
    await _delete_where_in(session, FollowUp, FollowUp.parent_response_id, responses)
    await _delete_where_in(session, FollowUp, FollowUp.prompt_id, prompts)
    await _delete_where_in(session, Response, Response.id, responses)
    await _delete_where_in(session, PromptImage, PromptImage.prompt_id, prompts)
    await _delete_where_in(session, Prompt, Prompt.id, prompts)
    removed_images = await _delete_unused_images(session, settings, image_shas)
    return Deletion(
        prompt_ids=tuple(sorted(prompts)),
        response_ids=tuple(sorted(responses)),
        message_ids=tuple(sorted(message_ids)),
        reactions=reactions,
        images=tuple(sorted(removed_images)),
    )


async def _delete_unused_images(session: AsyncSession, settings: Settings, candidates: set[str]) -> list[str]:
    """Delete the rows and files of candidate images no prompt uses any more (in the caller's transaction)."""
    if not candidates:
        return []
    used = await _ids(session, PromptImage.image_sha256, PromptImage.image_sha256, candidates)
    unused = sorted(candidates - used)
    if not unused:
        return []
    suffixes = dict(
        (await session.execute(select(Image.sha256, Image.suffix).where(Image.sha256.in_(unused)))).all()
    )
    await _delete_where_in(session, Image, Image.sha256, unused)
    await session.flush()
    # Unlinked inside the transaction, while it holds the rows' locks: a prompt recorded
    # concurrently with the same image waits, then writes the file again. Should the commit fail
    # after this, the rows stay and the next prompt with the image rewrites its file.
    for sha in unused:
        if sha in suffixes:
            path = _image_file(settings.images_dir, sha, suffixes[sha])
            await asyncio.to_thread(path.unlink, True)
    return unused


async def delete_message(session: AsyncSession, *, settings: Settings, message_id: int) -> Deletion:
    """Delete what was stored of a deleted Discord message: a question takes its answers along."""
    async with transaction(session):
        prompt_id = await session.scalar(select(Prompt.id).where(Prompt.message_id == message_id))
        if prompt_id is not None:
            deletion = await _delete_everything_of(session, settings, prompt_ids=[prompt_id])
        else:
            response_id = await session.scalar(
                select(ResponseMessage.response_id).where(ResponseMessage.message_id == message_id)
            )
            if response_id is None:
                return Deletion()
            deletion = await _delete_everything_of(session, settings, response_ids=[response_id])
    log.info(
        "deleted message %s: %d prompts, %d responses",
        message_id,
        len(deletion.prompt_ids),
        len(deletion.response_ids),
    )
    return deletion


async def delete_response(session: AsyncSession, *, settings: Settings, response_id: int) -> Deletion:
    """Delete one answer (🗑️): its messages, votes and follow-ups; UnknownResponse if there is none."""
    async with transaction(session):
        if await session.get(Response, response_id) is None:
            raise UnknownResponse(f"no response {response_id}")
        return await _delete_everything_of(session, settings, response_ids=[response_id])


async def forget_user(session: AsyncSession, *, settings: Settings, user_id: int) -> Deletion:
    """Delete a user's prompts (with their answers, votes, follow-ups and unshared images) and votes; remember them as forgotten."""
    async with transaction(session):
        upsert = dialect_insert(session, OptedOutUser).values(
            user_id=user_id, reason=FORGOTTEN, since=utcnow()
        )
        await session.execute(
            upsert.on_conflict_do_update(
                index_elements=["user_id"],
                set_={"reason": upsert.excluded.reason, "since": upsert.excluded.since},
            )
        )
        prompt_ids = list(await session.scalars(select(Prompt.id).where(Prompt.author_id == user_id)))
        deletion = await _delete_everything_of(session, settings, prompt_ids=prompt_ids)
        votes = await session.execute(delete(Reaction).where(Reaction.user_id == user_id))
        # Who pressed 🔁 on someone else's prompt is the user's data too; the answer itself is not.
        await session.execute(
            update(Response).where(Response.requested_by == user_id).values(requested_by=None)
        )
    log.info("forgot user %s: %d prompts", user_id, len(deletion.prompt_ids))
    return Deletion(
        prompt_ids=deletion.prompt_ids,
        response_ids=deletion.response_ids,
        message_ids=deletion.message_ids,
        reactions=deletion.reactions + int(votes.rowcount),  # type: ignore[attr-defined]
        images=deletion.images,
    )


async def purge_expired(
    session: AsyncSession, *, settings: Settings, now: datetime | None = None
) -> Deletion:
    """Delete prompts older than SMOLCORD_RETENTION_DAYS with all that depends on them; sweep orphan image files."""
    cutoff = (now or utcnow()) - timedelta(days=settings.retention_days)
    async with transaction(session):
        prompt_ids = list(await session.scalars(select(Prompt.id).where(Prompt.created_at < cutoff)))
        deletion = await _delete_everything_of(session, settings, prompt_ids=prompt_ids)
    async with transaction(session):
        known = set(await session.scalars(select(Image.sha256)))
    swept = await asyncio.to_thread(_sweep_image_files, settings.images_dir, known)
    if deletion.prompt_ids or swept:
        log.info(
            "purged %d prompts older than %s, swept %d orphan files", len(deletion.prompt_ids), cutoff, swept
        )
    return deletion


def _sweep_image_files(images_dir: Path, known: set[str], grace_s: float = ORPHAN_FILE_GRACE_S) -> int:
    """Remove image files without a row and stale temporary files (older than the grace period)."""
    if not images_dir.is_dir():
        return 0
    removed = 0
    deadline = time.time() - grace_s
    for path in images_dir.glob("*/*"):
        if not path.is_file():
            continue
        orphan = path.name.startswith(_TMP_PREFIX) or path.stem not in known
        try:
            if orphan and path.stat().st_mtime < deadline:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


# ====================================================================== consent


async def get_user_status(session: AsyncSession, *, user_id: int) -> str | None:
    """ "opted_out", "forgotten", or None for a user whose data may be used."""
    async with transaction(session):
        return await _opt_out_reason(session, user_id)


async def opt_out(session: AsyncSession, *, user_id: int) -> bool:
    """Keep a user's prompts and votes out of training from now on; False if they already were."""
    async with transaction(session):
        insert = dialect_insert(session, OptedOutUser).values(
            user_id=user_id, reason=OPTED_OUT, since=utcnow()
        )
        result = await session.execute(insert.on_conflict_do_nothing(index_elements=["user_id"]))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def opt_in(session: AsyncSession, *, user_id: int) -> bool:
    """Let a user's new prompts and votes reach training again (also ends "forgotten"); False if nothing changed."""
    async with transaction(session):
        result = await session.execute(delete(OptedOutUser).where(OptedOutUser.user_id == user_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def get_guild_settings(session: AsyncSession, *, settings: Settings, guild_id: int) -> GuildConsent:
    """A guild's learning consent and voter role (the defaults if its admins never set them)."""
    async with transaction(session):
        return await _guild_consent(session, settings, guild_id)


async def _upsert_guild(
    session: AsyncSession, settings: Settings, guild_id: int, **values: Any
) -> GuildConsent:
    async with transaction(session):
        row: dict[str, Any] = {
            "guild_id": guild_id,
            "learning": settings.learning_default,
            "voter_role_id": None,
        }
        row.update(values, updated_at=utcnow())
        insert = dialect_insert(session, GuildSettings).values(**row)
        await session.execute(
            insert.on_conflict_do_update(
                index_elements=["guild_id"], set_={**values, "updated_at": insert.excluded.updated_at}
            )
        )
        return await _guild_consent(session, settings, guild_id)


async def set_learning(
    session: AsyncSession, *, settings: Settings, guild_id: int, enabled: bool
) -> GuildConsent:
    """Turn a guild's learning on or off (off also keeps what was recorded while on out of training)."""
    return await _upsert_guild(session, settings, guild_id, learning=bool(enabled))


async def set_voter_role(
    session: AsyncSession, *, settings: Settings, guild_id: int, role_id: int | None
) -> GuildConsent:
    """Name the role whose holders' votes count in a guild (None: everyone's)."""
    return await _upsert_guild(session, settings, guild_id, voter_role_id=role_id)


# ====================================================================== training runs


def _run_view(run: TrainingRun, pairs: int, heldout: int) -> TrainingRunView:
    return TrainingRunView(
        id=run.id,
        method=run.method,
        status=run.status,
        started_at=run.started_at,
        finished_at=run.finished_at,
        adapter_version=run.adapter_version,
        metrics=run.metrics,
        error=run.error,
        pairs=pairs,
        heldout=heldout,
    )


async def _load_run(session: AsyncSession, run: TrainingRun) -> TrainingRunView:
    counts = (
        await session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((TrainingRunPair.heldout.is_(True), 1), else_=0)), 0),
            )
            .select_from(TrainingRunPair)
            .where(TrainingRunPair.run_id == run.id)
        )
    ).one()
    return _run_view(run, int(counts[0]), int(counts[1]))


async def start_training_run(
    session: AsyncSession,
    *,
    method: str,
    examples: Sequence[PreferencePair | RatedAnswer] = (),
    heldout_fraction: float,
) -> int:
    """Record a run as started with the pairs (DPO), rated answers (KTO) or both (sft+dpo: the liked answers
    of its supervised pass) it uses, and their held-out split."""
    from feedback.store.pairs import PreferencePair, is_heldout

    if method not in ("dpo", "kto", "sft+dpo"):
        raise ValueError(f"method must be 'dpo', 'kto' or 'sft+dpo', not {method!r}")
    rows: list[dict[str, Any]] = []
    for example in examples:
        heldout = is_heldout(example.prompt_key, heldout_fraction)
        chosen: int | None
        rejected: int | None
        if isinstance(example, PreferencePair):
            chosen, rejected = example.chosen_response_id, example.rejected_response_id
        else:
            chosen, rejected = (example.response_id, None) if example.label else (None, example.response_id)
        rows.append({"chosen_response_id": chosen, "rejected_response_id": rejected, "heldout": heldout})
    async with transaction(session):
        run = TrainingRun(method=method, status="running", started_at=utcnow())
        session.add(run)
        await session.flush()
        if rows:
            try:
                await session.execute(
                    dialect_insert(session, TrainingRunPair), [{**r, "run_id": run.id} for r in rows]
                )
            except IntegrityError:  # a response was deleted after the pairs were built
                raise UnknownResponse(
                    "a pair names a response that no longer exists: build the pairs again"
                ) from None
    log.info("training run %s started (%s, %d examples)", run.id, method, len(rows))
    return run.id


async def finish_training_run(
    session: AsyncSession,
    *,
    run_id: int,
    status: str,
    metrics: Mapping[str, Any] | None = None,
    adapter_version: str | None = None,
    error: str | None = None,
) -> TrainingRunView:
    """Record how a run ended: "succeeded" (trained; the gate's verdict is in metrics), "failed" or "skipped"."""
    if status not in RUN_STATUSES or status == "running":
        raise ValueError(f"status must be one of succeeded, failed, skipped, not {status!r}")
    async with transaction(session):
        run = await session.get(TrainingRun, run_id)
        if run is None:
            raise UnknownRun(f"no training run {run_id}")
        run.status = status
        run.finished_at = utcnow()
        run.metrics = dict(metrics) if metrics is not None else run.metrics
        run.adapter_version = adapter_version or run.adapter_version
        run.error = error
        await session.flush()
        view = await _load_run(session, run)
    log.info("training run %s %s (adapter %s)", run_id, status, adapter_version)
    return view


async def get_training_run(session: AsyncSession, *, run_id: int) -> TrainingRunView:
    """A training run by id; UnknownRun if there is none."""
    async with transaction(session):
        run = await session.get(TrainingRun, run_id)
        if run is None:
            raise UnknownRun(f"no training run {run_id}")
        return await _load_run(session, run)


async def last_training_run(
    session: AsyncSession, *, statuses: Collection[str] = ("succeeded",)
) -> TrainingRunView | None:
    """The newest run with one of these statuses (default: the last one that trained), or None."""
    async with transaction(session):
        run = await session.scalar(
            select(TrainingRun)
            .where(TrainingRun.status.in_(list(statuses)))
            .order_by(TrainingRun.id.desc())
            .limit(1)
        )
        return None if run is None else await _load_run(session, run)


async def run_pair_ids(session: AsyncSession, *, run_id: int) -> list[tuple[int | None, int | None, bool]]:
    """The (chosen, rejected, heldout) response ids a run recorded (KTO: one side None)."""
    async with transaction(session):
        rows = await session.execute(
            select(
                TrainingRunPair.chosen_response_id,
                TrainingRunPair.rejected_response_id,
                TrainingRunPair.heldout,
            )
            .where(TrainingRunPair.run_id == run_id)
            .order_by(TrainingRunPair.id)
        )
        return [(row[0], row[1], bool(row[2])) for row in rows]


async def _used_by_last_run(session: AsyncSession) -> set[tuple[int | None, int | None]]:
    last = await session.scalar(
        select(TrainingRun.id)
        .where(TrainingRun.status == "succeeded")
        .order_by(TrainingRun.id.desc())
        .limit(1)
    )
    if last is None:
        return set()
    rows = await session.execute(
        select(TrainingRunPair.chosen_response_id, TrainingRunPair.rejected_response_id).where(
            TrainingRunPair.run_id == last
        )
    )
    return {(row[0], row[1]) for row in rows}


async def new_pairs(session: AsyncSession, *, pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """The pairs the last successful run did not use (what SMOLCORD_MIN_NEW_PAIRS counts)."""
    async with transaction(session):
        used = await _used_by_last_run(session)
    return [pair for pair in pairs if (pair.chosen_response_id, pair.rejected_response_id) not in used]


# ====================================================================== adapter history


def _adapter_record(row: AdapterVersion) -> AdapterRecord:
    return AdapterRecord(
        version=row.version,
        status=row.status,
        run_id=row.run_id,
        metrics=row.metrics,
        created_at=row.created_at,
        promoted_at=row.promoted_at,
        rolled_back_at=row.rolled_back_at,
    )


async def _adapter_row(session: AsyncSession, version: str) -> AdapterVersion:
    row = await session.get(AdapterVersion, version)
    if row is None:  # the registry on disk is the truth: history follows it, even for unseen versions
        row = AdapterVersion(version=version, status="candidate")
        session.add(row)
        await session.flush()
    return row


async def record_adapter(
    session: AsyncSession,
    *,
    version: str,
    run_id: int | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> AdapterRecord:
    """Record a new candidate adapter version (written by a run, not yet promoted)."""
    async with transaction(session):
        row = await _adapter_row(session, version)
        row.run_id = run_id if run_id is not None else row.run_id
        row.metrics = dict(metrics) if metrics is not None else row.metrics
        await session.flush()
        return _adapter_record(row)


async def promote_adapter(session: AsyncSession, *, version: str) -> AdapterRecord:
    """Record that a version is now served; the one served before becomes "superseded"."""
    async with transaction(session):
        await session.execute(
            update(AdapterVersion)
            .where(AdapterVersion.status == "promoted", AdapterVersion.version != version)
            .values(status="superseded")
        )
        row = await _adapter_row(session, version)
        row.status, row.promoted_at = "promoted", utcnow()
        await session.flush()
        return _adapter_record(row)


async def reject_adapter(session: AsyncSession, *, version: str) -> AdapterRecord:
    """Record that the gate refused a candidate version."""
    async with transaction(session):
        row = await _adapter_row(session, version)
        row.status = "rejected"
        await session.flush()
        return _adapter_record(row)


async def record_rollback(session: AsyncSession, *, from_version: str | None, to_version: str | None) -> None:
    """Record a rollback: `from_version` is rolled back, `to_version` served again (None: the base model)."""
    async with transaction(session):
        now = utcnow()
        if from_version is not None:
            row = await _adapter_row(session, from_version)
            row.status, row.rolled_back_at = "rolled_back", now
        if to_version is not None:
            row = await _adapter_row(session, to_version)
            row.status, row.promoted_at = "promoted", now


async def list_adapters(session: AsyncSession) -> list[AdapterRecord]:
    """Every recorded adapter version, oldest first."""
    async with transaction(session):
        rows = await session.scalars(
            select(AdapterVersion).order_by(AdapterVersion.created_at, AdapterVersion.version)
        )
        return [_adapter_record(row) for row in rows]


# ====================================================================== stats


async def store_stats(session: AsyncSession, *, settings: Settings) -> StoreStats:
    """Prompts, votes, pairs, new pairs still needed before the nightly run, and 👍 share per adapter version."""
    from feedback.store.pairs import build_pairs

    pairs = await build_pairs(session, settings=settings)
    fresh = await new_pairs(session, pairs=pairs)
    async with transaction(session):
        prompts, trainable = (
            await session.execute(
                select(
                    func.count(), func.coalesce(func.sum(case((Prompt.trainable.is_(True), 1), else_=0)), 0)
                )
            )
        ).one()
        responses = await session.scalar(select(func.count()).select_from(Response))
        # one vote per (response, user): (👍 present) − (👎 present), as pairs count them
        up = func.max(case((Reaction.emoji.in_(THUMBS_UP_VARIANTS), 1), else_=0))
        down = func.max(case((Reaction.emoji.in_(THUMBS_DOWN_VARIANTS), 1), else_=0))
        per_user = (
            select(Reaction.response_id, (up - down).label("vote"))
            .group_by(Reaction.response_id, Reaction.user_id)
            .subquery()
        )
        rows = (
            await session.execute(
                select(
                    Response.adapter_version,
                    func.sum(case((per_user.c.vote > 0, 1), else_=0)),
                    func.sum(case((per_user.c.vote < 0, 1), else_=0)),
                )
                .join(per_user, per_user.c.response_id == Response.id)
                .group_by(Response.adapter_version)
            )
        ).all()
        last = await session.scalar(
            select(TrainingRun)
            .where(TrainingRun.status == "succeeded")
            .order_by(TrainingRun.id.desc())
            .limit(1)
        )
        last_view = None if last is None else await _load_run(session, last)
    by_adapter = tuple(
        sorted(
            (AdapterVotes(version, int(u or 0), int(d or 0)) for version, u, d in rows),
            key=lambda votes: (votes.adapter_version is not None, votes.adapter_version or ""),
        )
    )
    return StoreStats(
        prompts=int(prompts),
        trainable_prompts=int(trainable),
        responses=int(responses or 0),
        votes=sum(v.up + v.down for v in by_adapter),
        pairs=len(pairs),
        new_pairs=len(fresh),
        pairs_needed=max(0, settings.min_new_pairs - len(fresh)),
        last_run=last_view,
        by_adapter=by_adapter,
    )
