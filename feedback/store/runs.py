"""Training runs: their start, end and the pairs (or rated answers) each used."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import (
    dialect_insert,
    transaction,
)
from feedback.store.errors import (
    UnknownResponse,
    UnknownRun,
)
from feedback.store.models import (
    TrainingRun,
    TrainingRunPair,
    utcnow,
)

if TYPE_CHECKING:
    from feedback.store.pairs import PreferencePair, RatedAnswer

__all__ = [
    "RUN_STATUSES",
    "TrainingRunView",
    "finish_training_run",
    "get_training_run",
    "last_training_run",
    "new_pairs",
    "run_pair_ids",
    "start_training_run",
]

log = logging.getLogger(__name__)


RUN_STATUSES = ("running", "succeeded", "failed", "skipped")


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


async def load_run(session: AsyncSession, run: TrainingRun) -> TrainingRunView:
    """A run's view with its pair counts, in the caller's transaction."""
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
        view = await load_run(session, run)
    log.info("training run %s %s (adapter %s)", run_id, status, adapter_version)
    return view


async def get_training_run(session: AsyncSession, *, run_id: int) -> TrainingRunView:
    """A training run by id; UnknownRun if there is none."""
    async with transaction(session):
        run = await session.get(TrainingRun, run_id)
        if run is None:
            raise UnknownRun(f"no training run {run_id}")
        return await load_run(session, run)


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
        return None if run is None else await load_run(session, run)


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
