"""Serving an earlier adapter again: registry, store history and worker in one call.

`/smolcord rollback` and `smolcord adapters rollback` both call `roll_back`, so the operator's
two paths cannot drift apart: `current` moves (under the registry's lock, off the event loop), the
store records which version was rolled back and which is served again, and the worker is told to
load it (one that is down picks `current` up when it starts).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from feedback.store import service

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from smolcord.registry import AdapterRegistry
    from smolcord.settings import Settings
    from smolcord.worker_client import WorkerClient

__all__ = ["Rollback", "RollbackRefused", "roll_back"]

log = logging.getLogger(__name__)


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
        await service.record_rollback(session, from_version=before, to_version=now)
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
