"""Adapter history (candidate, promoted, rejected, rolled back) and serving an earlier adapter again.

`/smolcord rollback` and `smolcord adapters rollback` both call `roll_back`, so the operator's
two paths cannot drift apart: `current` moves (under the registry's lock, off the event loop), the
store records which version was rolled back and which is served again, and the worker is told to
load it (one that is down picks `current` up when it starts).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.db import transaction
from feedback.store.models import AdapterVersion, utcnow

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from smolcord.registry import AdapterRegistry
    from smolcord.settings import Settings
    from smolcord.worker_client import WorkerClient

__all__ = [
    "AdapterRecord",
    "Rollback",
    "RollbackRefused",
    "list_adapters",
    "promote_adapter",
    "record_adapter",
    "record_rollback",
    "reject_adapter",
    "roll_back",
]

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------- rollback


class RollbackRefused(Exception):
    """Nothing was rolled back; the message says why, for the operator."""


@dataclass(frozen=True)
class Rollback:
    """What a rollback did: served before, served now (None: the base model), and the worker's part."""

    before: str | None
    now: str | None
    gate_rejected: bool  # the gate had rejected the version served now
    worker: str  # what the worker did, in a sentence

    def describe(self) -> str:
        served = self.now or "the base model"
        note = f" (note: the gate had rejected {self.now})" if self.gate_rejected else ""
        return f"Rolled back from {self.before or 'the base model'} to **{served}**{note}. {self.worker}"


async def roll_back(
    *,
    settings: Settings,
    registry: AdapterRegistry,
    sessions: async_sessionmaker[AsyncSession],
    worker: WorkerClient,
    version: str | None = None,
) -> Rollback:
    """Serve `version` (default: the newest older one the gate did not reject): registry, store, worker."""
    from smolcord.registry import RegistryError

    try:
        before = registry.current()
    except RegistryError as exc:
        raise RollbackRefused(f"Rollback refused: {exc}") from exc
    if version is None and before is None:
        raise RollbackRefused("Nothing to roll back: the base model is served already.")
    if version is not None and version == before:
        raise RollbackRefused(f"{version} is served already.")
    try:
        # The registry's lock is short, but it is a blocking flock: keep it off the event loop.
        now = await asyncio.to_thread(registry.rollback, version)
    except (RegistryError, KeyError) as exc:
        raise RollbackRefused(f"Rollback refused: {exc}") from exc
    async with sessions() as session:
        await record_rollback(session, from_version=before, to_version=now)
    log.info("rolled back from %s to %s", before or "base", now or "base")
    rejected = now is not None and registry.metrics(now).get("status") == "rejected"
    return Rollback(before, now, rejected, await _tell_worker(settings, worker, now))


async def _tell_worker(settings: Settings, worker: WorkerClient, version: str | None) -> str:
    from smolcord.worker_client import WorkerDown, WorkerError

    served = version or "the base model"
    try:
        await worker.load_adapter(version)
    except WorkerDown:
        return f"The worker is not running; it will serve {served} when it starts."
    except WorkerError as exc:
        if exc.status == 404:  # an OpenAI-compatible backend without adapter endpoints (vLLM, say)
            return (
                f"The model backend at {settings.worker_url} has no adapter endpoint, so it still "
                f"serves what it served: make it serve {served} yourself (the README's vLLM runbook)."
            )
        return f"The worker did not switch ({exc.message}); it will serve {served} when it restarts."
    return f"The worker serves {served} now."
