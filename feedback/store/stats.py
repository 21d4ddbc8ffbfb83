"""Store statistics (`/smolcord status`, the nightly decision), the training data counted in SQL, cheaply.

`feedback.store.pairs` builds every pair with its texts, images and voters, and caps voter share: a few
seconds of Python at 10⁵ responses, fine in the training job's own process but not on the bot's
event loop (a thread would not help: it holds the GIL). The bot only needs how many pairs there
are, how many no successful run used yet, and how many are held out; the database counts those
and the bot reads one row per prompt key with pairs (to hash it for the held-out split) in batches,
so the loop runs between them.

The counts follow `feedback.store.pairs` rule for rule (one pair per distinct (chosen text, rejected text)
of a prompt key, each identified by the lowest response id of either text, the way the builder
keeps the first it meets), except the voter-share cap, which needs every pair's voters: a count
is what the rules allow *before* that cap, so a run may use fewer when one voter decides too much.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Subquery, and_, case, func, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import transaction
from feedback.store.models import Prompt, Reaction, Response, TrainingRun, TrainingRunPair
from feedback.store.runs import TrainingRunView, load_run
from feedback.store.votes import THUMBS_DOWN_VARIANTS, THUMBS_UP_VARIANTS

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = ["AdapterVotes", "PairCounts", "StoreStats", "count_pairs", "store_stats", "trainable_scores"]

_BATCH = 1_000  # (key, count) rows read and hashed between two yields to the event loop (a few ms)


@dataclass(frozen=True)
class PairCounts:
    """Preference pairs the rules allow now (before the voter-share cap), new ones, held-out ones."""

    pairs: int
    new_pairs: int  # not used by the last successful run (what SMOLCORD_MIN_NEW_PAIRS counts)
    heldout_pairs: int


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
    pairs: int  # pairs the rules allow now, before the voter-share cap (feedback.store.stats)
    new_pairs: int  # of those, not used by the last successful run
    pairs_needed: int  # new pairs still missing before the nightly run trains (SMOLCORD_MIN_NEW_PAIRS)
    last_run: TrainingRunView | None
    by_adapter: tuple[AdapterVotes, ...] = field(default_factory=tuple)
    heldout_pairs: int = 0  # of `pairs`, those in the permanent held-out split (the gate's)


def trainable_scores(settings: Settings) -> Subquery:
    """(response_id, score, ...) of every response whose votes may train now: the one eligibility rule here.

    Every consent rule (learning on when recorded and now, no DM, author and voters not opted
    out, the voter role) is `feedback.store.pairs`'s own SQL, so the counts can never drift from the
    pairs a run builds. A further rule on training rows belongs in that SQL, or here.
    """
    from feedback.store.pairs import _response_scores

    return union_all(
        _response_scores(settings, with_voter_role=False), _response_scores(settings, with_voter_role=True)
    ).subquery("trainable_scores")


async def count_pairs(session: AsyncSession, *, settings: Settings) -> PairCounts:
    """How many preference pairs a run would find now (before the voter-share cap), new and held out."""
    from feedback.store.pairs import is_heldout

    scores = trainable_scores(settings)
    chosen = (scores.c.score > 0).label("chosen")
    # one row per (key, text, side): the builder keeps one pair per distinct text pair of a key
    sides = (
        select(Prompt.key, Response.text, chosen, func.min(Response.id).label("response_id"))
        .join(Response, Response.id == scores.c.response_id)
        .join(Prompt, Prompt.id == Response.prompt_id)
        .group_by(Prompt.key, Response.text, chosen)
        .cte("sides")
    )
    good, bad = sides.alias("good"), sides.alias("bad")
    last_run = (
        select(TrainingRun.id)
        .where(TrainingRun.status == "succeeded")
        .order_by(TrainingRun.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    pairs = (
        select(
            good.c.key,
            good.c.response_id.label("chosen_id"),
            bad.c.response_id.label("rejected_id"),
        )
        .join(bad, and_(bad.c.key == good.c.key, bad.c.text != good.c.text))
        .where(good.c.chosen.is_(True), bad.c.chosen.is_(False))
        .subquery("pairs")
    )
    is_used = (
        select(TrainingRunPair.id)
        .where(
            TrainingRunPair.run_id == last_run,
            TrainingRunPair.chosen_response_id == pairs.c.chosen_id,
            TrainingRunPair.rejected_response_id == pairs.c.rejected_id,
        )
        .exists()
    )
    statement = select(pairs.c.key, func.count(), func.sum(case((is_used, 0), else_=1))).group_by(pairs.c.key)
    total = new = heldout = 0
    async with transaction(session):
        connection = await session.connection()
        # streamed in batches: turning ~10⁴ rows into Python objects at once would hold the loop
        result = await connection.stream(statement)
        async for rows in result.partitions(_BATCH):
            for key, count, fresh in rows:
                total += count
                new += fresh or 0
                if is_heldout(key, settings.heldout_fraction):  # a hash: only Python can split
                    heldout += count
    return PairCounts(pairs=total, new_pairs=new, heldout_pairs=heldout)


async def store_stats(session: AsyncSession, *, settings: Settings) -> StoreStats:
    """Prompts, votes, pairs, new pairs still needed before the nightly run, and 👍 share per adapter version."""
    # counted in SQL, never built: this runs on the bot's event loop (feedback.store.stats)
    counts = await count_pairs(session, settings=settings)
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
        last_view = None if last is None else await load_run(session, last)
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
        pairs=counts.pairs,
        new_pairs=counts.new_pairs,
        pairs_needed=max(0, settings.min_new_pairs - counts.new_pairs),
        last_run=last_view,
        by_adapter=by_adapter,
        heldout_pairs=counts.heldout_pairs,
    )
