"""Whether and when the nightly run trains: SMOLCORD_TRAIN_AT, and the pairs a run would find now.

The loop that acts on it is in cogs/training.py; `/smolcord stats` shows the same readiness.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from feedback.store.stats import PairCounts, StoreStats, count_pairs
from smolcord.settings import Settings

__all__ = ["TrainingReadiness", "next_nightly_run", "nightly_time", "should_train", "training_readiness"]


def nightly_time(settings: Settings) -> dt.time | None:
    """SMOLCORD_TRAIN_AT as an aware UTC time, None when the nightly run is off."""
    if settings.train_at is None:
        return None
    hour, minute = (int(part) for part in settings.train_at.split(":"))
    return dt.time(hour, minute, tzinfo=dt.UTC)


def next_nightly_run(settings: Settings, now: dt.datetime | None = None) -> dt.datetime | None:
    """When the nightly check fires next (UTC), None when it is off."""
    at = nightly_time(settings)
    if at is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    today = dt.datetime.combine(now.date(), at)
    return today if today > now else today + dt.timedelta(days=1)


@dataclass(frozen=True)
class TrainingReadiness:
    """What the nightly decision looks at: pairs now, those no successful run used yet, and held-out ones."""

    pairs: int
    new_pairs: int
    heldout_pairs: int
    min_new_pairs: int
    min_heldout: int

    @classmethod
    def of(cls, counts: PairCounts | StoreStats, settings: Settings) -> TrainingReadiness:
        """The readiness those counts mean under these settings."""
        return cls(
            pairs=counts.pairs,
            new_pairs=counts.new_pairs,
            heldout_pairs=counts.heldout_pairs,
            min_new_pairs=settings.min_new_pairs,
            min_heldout=settings.gate_min_heldout,
        )

    @property
    def new_pairs_needed(self) -> int:
        return max(0, self.min_new_pairs - self.new_pairs)

    @property
    def heldout_needed(self) -> int:
        return max(0, self.min_heldout - self.heldout_pairs)


async def training_readiness(
    sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> TrainingReadiness:
    """Count the pairs a run would find now (every consent rule applied) and their held-out split.

    Counted in SQL (feedback.store.stats), never built: this runs on the bot's event loop. The count is
    taken before the voter-share cap, which only the training job applies.
    """
    async with sessions() as session:
        counts = await count_pairs(session, settings=settings)
    return TrainingReadiness.of(counts, settings)


def should_train(readiness: TrainingReadiness) -> tuple[bool, str]:
    """Whether the nightly run trains, and why (or why not), in words for the log."""
    missing = []
    if readiness.new_pairs_needed:
        missing.append(
            f"{readiness.new_pairs} new pairs of the {readiness.min_new_pairs} needed (SMOLCORD_MIN_NEW_PAIRS)"
        )
    if readiness.heldout_needed:
        missing.append(
            f"{readiness.heldout_pairs} held-out pairs of the {readiness.min_heldout} needed "
            "(SMOLCORD_GATE_MIN_HELDOUT)"
        )
    if missing:
        return False, "only " + " and ".join(missing)
    return True, f"{readiness.new_pairs} new pairs, {readiness.heldout_pairs} held out"
