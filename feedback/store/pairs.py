"""Preference pairs (DPO) and rated answers (KTO), derived from the stored votes when asked.

Rules, all applied here at build time (so a later opt-out or `/learning off` counts at once):

- A vote counts if its prompt is eligible (feedback.store.eligibility: recorded `trainable`, its guild
  still has learning on, its author has not opted out or been forgotten since, and the same holds
  for the source of every turn its history quotes; otherwise the whole prompt is left out, never
  a truncated history), the voter has not opted out or been forgotten either, and, where the
  guild names a voter role, the voter held that role when voting (the role recorded with the
  vote must be the one named now).
- A user's vote on a response is (a 👍 present) − (a 👎 present); a response's score is the sum.
- Responses are compared within a prompt key (same images, question and history: feedback.store.history
  .prompt_key), so a 🔁 alternative and the first answer form pairs, and so do answers to the same
  question asked twice. Every chosen (score > 0) × rejected (score < 0) whose texts differ is a
  pair; within a key, one pair per distinct (chosen text, rejected text).
- Voter share: a voter *decides* a pair if removing their vote would flip either side, that is they
  voted 👍 on a chosen whose score is exactly +1, or 👎 on a rejected whose score is exactly −1
  (with scores of 2 or more nobody decides alone). No voter may decide more than
  SMOLCORD_MAX_VOTER_SHARE of the set: while one does, the voter deciding the most pairs loses
  just enough of them (the fewest that bring them within the cap of the shrunken set), taken in a
  fixed pseudo-random order (a hash of key and response ids), so the result is deterministic and
  not biased towards old or new pairs. Rated answers (KTO) are capped the same way, a voter
  deciding an answer whose score is ±1.
- The held-out split is permanent: `is_heldout(prompt_key, fraction)` hashes the key, so a prompt
  never moves between training and evaluation as data grows.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from math import ceil
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    Text,
    case,
    cast,
    func,
    select,
    tuple_,
    type_coerce,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import transaction
from feedback.store.eligibility import eligible_prompt
from feedback.store.models import GuildSettings, Image, OptedOutUser, Prompt, PromptImage, Reaction, Response
from feedback.store.votes import THUMBS_DOWN_VARIANTS, THUMBS_UP_VARIANTS

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = [
    "LeftOut",
    "PreferencePair",
    "RatedAnswer",
    "build_pairs",
    "build_rated_answers",
    "cap_voter_share",
    "is_heldout",
    "left_out",
]


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """Two answers to the same prompt: the chosen scored > 0, the rejected < 0.

    `prompt_id` is the chosen answer's prompt (the rejected one may answer another prompt with the
    same key, hence the same question, images and history).
    """

    prompt_id: int
    prompt_key: str
    guild_id: int
    question: str
    history: list[dict[str, Any]]
    images: tuple[Path, ...]  # every image the model saw, in order: the history's, then the question's
    chosen_response_id: int
    chosen_text: str
    chosen_score: int
    rejected_response_id: int
    rejected_text: str
    rejected_score: int
    deciders: frozenset[int]  # voters whose vote was needed for either side

    @property
    def drop_rank(self) -> str:
        return _rank(self.prompt_key, self.chosen_response_id, self.rejected_response_id)


@dataclass(frozen=True, slots=True)
class RatedAnswer:
    """One answer with a nonzero score, for KTO: `label` is True for 👍 (score > 0)."""

    prompt_id: int
    prompt_key: str
    guild_id: int
    question: str
    history: list[dict[str, Any]]
    images: tuple[Path, ...]
    response_id: int
    text: str
    score: int
    deciders: frozenset[int]

    @property
    def label(self) -> bool:
        return self.score > 0

    @property
    def drop_rank(self) -> str:
        return _rank(self.prompt_key, self.response_id)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a build allocates its ~10⁵ rows and objects.

    Its collections would otherwise rescan everything built so far, again and again: a quarter of
    the CPU time at 100,000 responses. Reference counting frees memory as usual meanwhile, and a
    build makes no reference cycles; other tasks running during the build's awaits only see
    their collections delayed by about a second. Nested or overlapping builds leave it enabled.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _rank(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def is_heldout(prompt_key: str, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out set: a fixed hash of its key, so the split never changes."""
    digest = hashlib.sha256(f"heldout:{prompt_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


# ---------------------------------------------------------------------------------- votes


@dataclass
class _Scores:
    net: dict[int, int]  # response id -> score (only nonzero scores)
    texts: dict[int, str]  # response id -> text
    decided_by: dict[int, frozenset[int]]  # response id -> voters who decide its sign alone
    prompt_of: dict[int, tuple[int, str]]  # response id -> (prompt id, key)
    # prompt id -> (guild id, question, history as JSON text (or decoded), number of images)
    prompt_rows: dict[int, tuple[int, str, Any, int]]

    def deciders(self, response_id: int) -> frozenset[int]:
        return self.decided_by.get(response_id, frozenset())


def _response_scores(settings: Settings, *, with_voter_role: bool) -> Select[int, int, str, str]:
    """(response, score, 👍 voters, 👎 voters) for every eligible response with a nonzero score.

    A score is the number of counting voters with a 👍 present minus those with a 👎 present: the
    sum of everyone's (👍 present) − (👎 present), computed per response in one pass over the
    reactions in primary-key order. Guilds without a voter role (the usual case) find their
    eligible responses through one IN (subquery); guilds with one match each vote against the role
    they name now. The two sets of responses are disjoint.
    """
    r, s, p, g = Reaction, Response, Prompt, GuildSettings
    is_up, is_down = r.emoji.in_(THUMBS_UP_VARIANTS), r.emoji.in_(THUMBS_DOWN_VARIANTS)
    score = (
        func.count(case((is_up, r.user_id)).distinct()) - func.count(case((is_down, r.user_id)).distinct())
    ).label("score")
    # the voters of each side (a voter with two thumbs-up variants appears twice: sets fix that)
    voter = cast(r.user_id, String)
    ups = func.aggregate_strings(case((is_up, voter)), ",").label("ups")
    downs = func.aggregate_strings(case((is_down, voter)), ",").label("downs")
    prompt_ok = eligible_prompt(settings)
    counted = r.user_id.not_in(select(OptedOutUser.user_id))
    if not with_voter_role:
        eligible = (
            select(s.id)
            .join(p, p.id == s.prompt_id)
            .outerjoin(g, g.guild_id == p.guild_id)
            .where(prompt_ok, g.voter_role_id.is_(None))
        )
        where: list[ColumnElement[bool]] = [r.response_id.in_(eligible), counted]
    else:
        # (response, the role its guild names now): the vote must have been cast holding that role
        with_role = (
            select(s.id, g.voter_role_id)
            .join(p, p.id == s.prompt_id)
            .join(g, g.guild_id == p.guild_id)
            .where(prompt_ok, g.voter_role_id.is_not(None))
        )
        where = [tuple_(r.response_id, r.voter_role_id).in_(with_role), r.holds_voter_role.is_(True), counted]
    return select(r.response_id, score, ups, downs).where(*where).group_by(r.response_id).having(score != 0)


def _unrestricted_scores() -> Select[int, int, str, str]:
    """`_response_scores` for every response and every voter, as if no consent rule applied (for `left_out`)."""
    r = Reaction
    is_up, is_down = r.emoji.in_(THUMBS_UP_VARIANTS), r.emoji.in_(THUMBS_DOWN_VARIANTS)
    score = (
        func.count(case((is_up, r.user_id)).distinct()) - func.count(case((is_down, r.user_id)).distinct())
    ).label("score")
    voter = cast(r.user_id, String)
    ups = func.aggregate_strings(case((is_up, voter)), ",").label("ups")
    downs = func.aggregate_strings(case((is_down, voter)), ",").label("downs")
    return select(r.response_id, score, ups, downs).group_by(r.response_id).having(score != 0)


async def _scores(session: AsyncSession, settings: Settings, *, consent: bool = True) -> _Scores:
    """Every nonzero score with its text and the voters who decide it, in one statement (one snapshot).

    `consent=False` ignores every consent rule (prompts and voters): only to count what they leave out.
    """
    scores = (
        union_all(
            _response_scores(settings, with_voter_role=False),
            _response_scores(settings, with_voter_role=True),
        ).subquery()
        if consent
        else _unrestricted_scores().subquery()
    )
    statement = (
        select(
            scores.c.response_id,
            scores.c.score,
            # voters are only needed where one of them can decide: a score of exactly ±1
            case((func.abs(scores.c.score) == 1, scores.c.ups)),
            case((func.abs(scores.c.score) == 1, scores.c.downs)),
            Response.prompt_id,
            Prompt.key,
            Response.text,
            Prompt.guild_id,
            Prompt.question,
            # as text: decoded once per prompt below, not once per answer
            type_coerce(Prompt.history, Text),
            # to tell a prompt without images from one deleted before its images were read
            select(func.count()).where(PromptImage.prompt_id == Prompt.id).scalar_subquery(),
        )
        .join(Response, Response.id == scores.c.response_id)
        .join(Prompt, Prompt.id == Response.prompt_id)
    )
    connection = await session.connection()  # Core rows: no ORM result processing for ~100k rows
    rows = (await connection.execute(statement)).all()
    net_of: dict[int, int] = {}
    texts: dict[int, str] = {}
    decided_by: dict[int, frozenset[int]] = {}
    prompt_of: dict[int, tuple[int, str]] = {}
    prompt_rows: dict[int, tuple[int, str, Any, int]] = {}
    for response_id, score, ups, downs, prompt_id, key, text, guild_id, question, history, images in rows:
        net_of[response_id] = score = int(score)
        texts[response_id] = text
        prompt_of[response_id] = (prompt_id, key)
        prompt_rows[prompt_id] = (guild_id, question, history, images)
        if score == 1 or score == -1:
            # a decider voted the score's way and not the other (both present: their vote is 0)
            up = set(map(int, ups.split(","))) if ups else set()
            down = set(map(int, downs.split(","))) if downs else set()
            decided_by[response_id] = frozenset(up - down if score == 1 else down - up)
    return _Scores(net_of, texts, decided_by, prompt_of, prompt_rows)


@dataclass(frozen=True)
class _PromptData:
    guild_id: int
    question: str
    history: list[dict[str, Any]]
    images: tuple[Path, ...]


async def _prompts(
    session: AsyncSession, settings: Settings, scores: _Scores, wanted: set[int]
) -> dict[int, _PromptData]:
    """Question, history and image files of the wanted prompts (the first two came with the scores).

    Images are read by scanning the eligible prompts that have any reaction rather than by a list
    of ids: at this scale a list of tens of thousands of ids costs more to send than the scan.
    """
    from smolcord.images import image_path

    p, g = Prompt, GuildSettings
    voted = (
        select(Response.id)
        .join(Reaction, Reaction.response_id == Response.id)
        .where(Response.prompt_id == p.id)
        .exists()
    )
    candidates = select(p.id).outerjoin(g, g.guild_id == p.guild_id).where(eligible_prompt(settings), voted)
    connection = await session.connection()
    image_rows = (
        await connection.execute(
            select(PromptImage.prompt_id, Image.sha256, Image.suffix)
            .join(Image, Image.sha256 == PromptImage.image_sha256)
            .where(PromptImage.prompt_id.in_(candidates))
            .order_by(PromptImage.prompt_id, PromptImage.position)
        )
    ).all()
    paths: dict[str, Path] = {}
    images: dict[int, list[Path]] = defaultdict(list)
    for prompt_id, sha, suffix in image_rows:
        if prompt_id in wanted:
            if sha not in paths:
                paths[sha] = image_path(settings.images_dir, sha, suffix)
            images[prompt_id].append(paths[sha])
    found = {}
    for prompt_id in wanted:
        guild_id, question, history, image_count = scores.prompt_rows[prompt_id]
        paths_of = tuple(images.get(prompt_id, ()))
        if len(paths_of) != image_count:
            continue  # deleted since the scores were read
        turns = history
        if isinstance(history, str):  # JSON text on SQLite; asyncpg decodes JSON itself
            turns = [] if history == "[]" else json.loads(history)
        found[prompt_id] = _PromptData(guild_id, question, turns, paths_of)
    return found


# ---------------------------------------------------------------------------------- building


async def build_pairs(session: AsyncSession, *, settings: Settings) -> list[PreferencePair]:
    """Every preference pair the rules allow now, capped by voter share, ordered by (key, chosen, rejected)."""
    with _gc_paused():
        # the build's intermediates die with `_build_pairs`'s frame, before the collector resumes:
        # its first collection then scans only the result, not ~10⁵ rows and tuples besides
        return await _build_pairs(session, settings)


async def _build_pairs(session: AsyncSession, settings: Settings) -> list[PreferencePair]:
    async with transaction(session):
        scores = await _scores(session, settings)
        candidates = _candidate_pairs(scores)
        kept = _cap(
            candidates,
            [candidate[3] for candidate in candidates],
            # ranks are computed only for the pairs of a voter who must lose some
            lambda index: _rank(*candidates[index][:3]),
            settings.max_voter_share,
        )
        wanted = {scores.prompt_of[chosen][0] for _, chosen, _, _ in kept}
        prompts = await _prompts(session, settings, scores, wanted)
    texts, net, prompt_of = scores.texts, scores.net, scores.prompt_of
    pairs: list[PreferencePair] = []
    append = pairs.append
    for key, chosen, rejected, deciders in kept:
        prompt_id = prompt_of[chosen][0]
        data = prompts.get(prompt_id)
        if data is None:
            continue
        # positional, in field order: keyword parsing costs a tenth of the build at 50k pairs
        append(
            PreferencePair(
                prompt_id,
                key,
                data.guild_id,
                data.question,
                data.history,
                data.images,
                chosen,
                texts[chosen],
                net[chosen],
                rejected,
                texts[rejected],
                net[rejected],
                deciders,
            )
        )
    return pairs


def _candidate_pairs(scores: _Scores) -> list[tuple[str, int, int, frozenset[int]]]:
    """(key, chosen, rejected, deciders) for every chosen × rejected of a key with different texts."""
    by_key: dict[str, tuple[list[int], list[int]]] = {}
    prompt_of = scores.prompt_of
    for response_id, net in scores.net.items():
        key = prompt_of[response_id][1]
        sides = by_key.get(key)
        if sides is None:
            sides = by_key[key] = ([], [])
        sides[0 if net > 0 else 1].append(response_id)
    texts, decided_by = scores.texts, scores.decided_by
    empty: frozenset[int] = frozenset()
    candidates: list[tuple[str, int, int, frozenset[int]]] = []
    append = candidates.append
    for key in sorted(by_key):
        chosen_ids, rejected_ids = by_key[key]
        if not chosen_ids or not rejected_ids:
            continue
        chosen_ids.sort()
        # each answer's text and deciders looked up once per key, not once per pair
        rejected_sides = [(r, texts[r], decided_by.get(r, empty)) for r in sorted(rejected_ids)]
        seen: set[tuple[str, str]] = set()
        for chosen in chosen_ids:
            chosen_text = texts[chosen]
            chosen_deciders = decided_by.get(chosen, empty)
            for rejected, rejected_text, rejected_deciders in rejected_sides:
                if chosen_text == rejected_text:
                    continue
                text_pair = (chosen_text, rejected_text)
                if text_pair in seen:
                    continue
                seen.add(text_pair)
                if chosen_deciders and rejected_deciders:
                    deciders = chosen_deciders | rejected_deciders
                else:  # the usual case: one side has none, so no new set is needed
                    deciders = chosen_deciders or rejected_deciders
                append((key, chosen, rejected, deciders))
    return candidates


async def build_rated_answers(session: AsyncSession, *, settings: Settings) -> list[RatedAnswer]:
    """Every answer with a nonzero score under the same rules (for KTO), capped by voter share."""
    with _gc_paused():
        # the build's intermediates die with `_build_rated_answers`'s frame, before the collector resumes:
        # its first collection then scans only the result, not ~10⁵ rows and tuples besides
        return await _build_rated_answers(session, settings)


async def _build_rated_answers(session: AsyncSession, settings: Settings) -> list[RatedAnswer]:
    async with transaction(session):
        scores = await _scores(session, settings)
        rated = sorted((scores.prompt_of[response_id][1], response_id) for response_id in scores.net)
        kept = _cap(
            rated,
            [scores.deciders(response_id) for _, response_id in rated],
            lambda index: _rank(*rated[index]),
            settings.max_voter_share,
        )
        prompts = await _prompts(session, settings, scores, {scores.prompt_of[r][0] for _, r in kept})
    answers = []
    for key, response_id in kept:
        prompt_id = scores.prompt_of[response_id][0]
        data = prompts.get(prompt_id)
        if data is None:
            continue
        answers.append(
            RatedAnswer(
                prompt_id=prompt_id,
                prompt_key=key,
                guild_id=data.guild_id,
                question=data.question,
                history=data.history,
                images=data.images,
                response_id=response_id,
                text=scores.texts[response_id],
                score=scores.net[response_id],
                deciders=scores.deciders(response_id),
            )
        )
    return answers


@dataclass(frozen=True)
class LeftOut:
    """Training rows the votes would give but the rules leave out, by reason (for `smolcord export`)."""

    consent: int  # learning off or never on, DMs, opted-out or forgotten askers, voters or quoted authors, voter role
    voter_share: int  # dropped so that no voter decides more than SMOLCORD_MAX_VOTER_SHARE


async def left_out(session: AsyncSession, *, settings: Settings, kind: str = "pairs") -> LeftOut:
    """How many pairs (or, `kind="unpaired"`, rated answers) the consent rules and the voter-share cap leave out.

    A pair is counted by (prompt key, chosen text, rejected text), so the same pair found through
    other answer ids is not counted as left out.
    """
    async with transaction(session):
        everyone = await _scores(session, settings, consent=False)
        eligible = await _scores(session, settings)
    if kind == "pairs":
        candidates = _candidate_pairs(eligible)
        kept = _cap(
            candidates,
            [candidate[3] for candidate in candidates],
            lambda index: _rank(*candidates[index][:3]),
            settings.max_voter_share,
        )

        def identities(scores: _Scores) -> set[tuple[str, str, str]]:
            return {(k, scores.texts[c], scores.texts[r]) for k, c, r, _ in _candidate_pairs(scores)}

        consent = len(identities(everyone) - identities(eligible))
        return LeftOut(consent=consent, voter_share=len(candidates) - len(kept))
    if kind != "unpaired":
        raise ValueError(f"kind must be 'pairs' or 'unpaired', not {kind!r}")
    rated = sorted((eligible.prompt_of[response_id][1], response_id) for response_id in eligible.net)
    kept_rated = _cap(
        rated,
        [eligible.deciders(response_id) for _, response_id in rated],
        lambda index: _rank(*rated[index]),
        settings.max_voter_share,
    )
    consent = sum(1 for response_id in everyone.net if response_id not in eligible.net)
    return LeftOut(consent=consent, voter_share=len(rated) - len(kept_rated))


# ---------------------------------------------------------------------------------- voter share

T = TypeVar("T")


def cap_voter_share(
    items: Sequence[T],
    *,
    deciders: Sequence[frozenset[int]] | None = None,
    ranks: Sequence[str] | None = None,
    share: float,
) -> list[T]:
    """The items left once no voter decides more than `share` of them (order kept; see the module docstring).

    `deciders` and `ranks` default to each item's `.deciders` and `.drop_rank`.
    """
    decided = list(deciders) if deciders is not None else [item.deciders for item in items]  # type: ignore[attr-defined]
    if ranks is not None:
        return _cap(items, decided, ranks.__getitem__, share)
    return _cap(items, decided, lambda index: items[index].drop_rank, share)  # type: ignore[attr-defined]


def _cap(
    items: Sequence[T], decided: Sequence[frozenset[int]], rank_of: Callable[[int], str], share: float
) -> list[T]:
    """`cap_voter_share` with each item's rank computed on demand: only the items of a voter who
    loses some are ranked, and each voter's items are sorted only then."""
    n = len(items)
    limit = Fraction(str(share))
    if limit >= 1 or n == 0:
        return list(items)
    by_voter: dict[int, list[int]] = defaultdict(list)
    for index, voters in enumerate(decided):
        for voter in voters:
            by_voter[voter].append(index)
    ranks: dict[int, str] = {}

    def rank(index: int) -> str:
        value = ranks.get(index)
        if value is None:
            value = ranks[index] = rank_of(index)
        return value

    counts = {voter: len(indexes) for voter, indexes in by_voter.items()}
    cursor = dict.fromkeys(by_voter, 0)
    alive = [True] * n
    size = n
    ranked: set[int] = set()
    # Max-heap of (count, voter), with stale entries skipped: counts only ever go down.
    heap = [(-count, voter) for voter, count in counts.items()]
    heapq.heapify(heap)
    while heap:
        negative, voter = heap[0]
        if -negative != counts[voter]:
            heapq.heapreplace(heap, (-counts[voter], voter))
            continue
        count = counts[voter]
        if count <= limit * size:
            break  # the most deciding voter is within the cap, so everyone is
        # the fewest drops k with (count - k) <= limit * (size - k)
        drop = ceil((count - limit * size) / (1 - limit))
        indexes = by_voter[voter]
        if voter not in ranked:
            ranked.add(voter)
            # dropped first: the highest rank (the items dropped so far stay skipped as before)
            indexes.sort(key=rank, reverse=True)
        while drop > 0:
            index = indexes[cursor[voter]]
            cursor[voter] += 1
            if not alive[index]:
                continue
            alive[index] = False
            size -= 1
            drop -= 1
            for other in decided[index]:
                counts[other] -= 1
    return [item for item, keep in zip(items, alive, strict=True) if keep]
