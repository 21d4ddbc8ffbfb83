"""The canary rollout as the bot runs it: who gets which version, the nightly decision, an admin's.

A training run whose candidate passes the offline gate puts it in canary (SMOLCORD_CANARY=on): the
registry's `candidate` entry names it and the worker serves it beside `current`. From then on:

- `CanaryRouter.model_for` sends a sticky share of askers (smolcord.canary.in_canary) in servers
  with learning on to the candidate (`<base>:<version>` in the request's `model`); DMs and servers
  without learning always get current, so nobody outside the experiment's consent is in it. A 🔁
  alternative comes from the version of the answer it replaces while that version is served.
- `decide_canary` (the nightly run, before it trains anything) counts both arms' rated answers
  since the canary began (feedback.store.canary.arm_stats) and applies `decide`: promote, reject,
  or keep waiting. `conclude_canary` carries a decision out (also `/smolcord canary promote|abort`):
  registry first (the filesystem is the truth of what is served), then the store's record, then
  the worker.

Nothing lives in memory: the registry's `candidate` + canary.json and the store's `canaries` row
are the whole state, so a restart of the bot, the worker or the machine resumes the canary.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from feedback.store import canary as canary_service
from feedback.store import consent as consent_service
from feedback.store.canary import ArmStats, Canary, CanaryDecision
from feedback.store.errors import CanaryDecided
from smolcord.canary import in_canary, served_model
from smolcord.registry import AdapterRegistry, RegistryConflict, RegistryError
from smolcord.settings import Settings
from smolcord.worker_client import WorkerClient, WorkerDown, WorkerError

__all__ = [
    "CanaryRouter",
    "CanaryView",
    "RolloutOutcome",
    "canary_view",
    "conclude_canary",
    "decide_canary",
]

log = logging.getLogger(__name__)

# How long the router trusts what it read of the registry: the candidate changes once a night at most.
_REGISTRY_TTL_S = 5.0


# ============================================================================== routing


class CanaryRouter:
    """Which version answers a question or a 🔁: the sticky canary split, read from the registry."""

    def __init__(
        self, settings: Settings, registry: AdapterRegistry, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sessions = sessions
        self._read_at = -_REGISTRY_TTL_S
        self._candidate: str | None = None
        self._current: str | None = None

    def _served(self) -> tuple[str | None, str | None]:
        """(current, candidate) as the registry names them, re-read every few seconds."""
        if time.monotonic() - self._read_at >= _REGISTRY_TTL_S:
            try:
                self._current, self._candidate = self.registry.current(), self.registry.candidate()
            except (RegistryError, OSError) as exc:
                log.warning("registry unreadable, asking for current: %s", exc)
                self._current, self._candidate = None, None
            self._read_at = time.monotonic()
        return self._current, self._candidate

    def forget(self) -> None:
        """Re-read the registry at the next question (after a decision this process made)."""
        self._read_at = -_REGISTRY_TTL_S

    async def version_for(self, *, user_id: int, guild_id: int | None) -> str | None:
        """The candidate when this asker is in its canary; None: whatever the worker serves as current."""
        if not self.settings.canary or guild_id is None:
            return None
        _, candidate = self._served()
        if candidate is None or not in_canary(user_id, candidate, self.settings.canary_share):
            return None
        async with self.sessions() as session:
            consent = await consent_service.get_guild_settings(
                session, settings=self.settings, guild_id=guild_id
            )
        return candidate if consent.learning else None

    def replacing(self, version: str | None) -> str | None:
        """The version a 🔁 asks for: the replaced answer's own while it is still served, else current."""
        if version is None:
            return None
        current, candidate = self._served()
        return version if version in (current, candidate) else None

    @staticmethod
    def model(base: str | None, version: str | None) -> str | None:
        """The request's `model` for `version` (None: let the worker choose current)."""
        if version is None or not base:
            return None
        return served_model(base, version)


# ============================================================================== deciding


@dataclass(frozen=True)
class CanaryView:
    """A running canary as the store and the registry see it now: both arms and what they decide."""

    record: Canary
    candidate: str
    current: str | None
    started_at: dt.datetime
    current_arm: ArmStats
    candidate_arm: ArmStats
    decision: CanaryDecision


@dataclass(frozen=True)
class RolloutOutcome:
    """What a decision did: promote | reject | abort | waiting, by which rule, and the worker's news."""

    decision: str
    rule: str
    candidate: str
    current: str | None
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)
    worker: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "rule": self.rule,
            "candidate": self.candidate,
            "current": self.current,
            "message": self.message,
            "numbers": self.numbers,
        }


async def canary_view(
    *,
    settings: Settings,
    registry: AdapterRegistry,
    sessions: async_sessionmaker[AsyncSession],
    now: dt.datetime | None = None,
) -> CanaryView | None:
    """The running canary with both arms counted and the decision they make now; None when none runs."""
    info = await asyncio.to_thread(registry.canary)
    if info is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    candidate = str(info["candidate"])
    current = info.get("current_at_start")
    started = dt.datetime.fromisoformat(str(info["started_at"]))
    if started.tzinfo is None:
        started = started.replace(tzinfo=dt.UTC)
    async with sessions() as session:
        record = await canary_service.active_canary(session)
        if record is None or record.candidate_version != candidate:
            # The registry started it but the store never heard (the job died between the two):
            # the filesystem is the truth, the store's history catches up.
            record = await canary_service.start_canary(
                session, candidate=candidate, current=current, share=settings.canary_share, now=started
            )
        current_arm = await canary_service.arm_stats(
            session, settings=settings, version=current, since=started
        )
        candidate_arm = await canary_service.arm_stats(
            session, settings=settings, version=candidate, since=started
        )
    decision = canary_service.decide(
        current_arm,
        candidate_arm,
        margin=settings.canary_margin,
        min_rated=settings.canary_min_rated,
        confidence=settings.canary_confidence,
        started_at=started,
        now=now,
        max_days=settings.canary_max_days,
    )
    return CanaryView(record, candidate, current, started, current_arm, candidate_arm, decision)


async def decide_canary(
    *,
    settings: Settings,
    registry: AdapterRegistry,
    sessions: async_sessionmaker[AsyncSession],
    worker: WorkerClient,
    now: dt.datetime | None = None,
) -> RolloutOutcome | None:
    """The nightly step: decide the running canary by its votes and carry the decision out (None: none runs)."""
    view = await canary_view(settings=settings, registry=registry, sessions=sessions, now=now)
    if view is None:
        return None
    decision = view.decision
    if decision.decision == "waiting":
        log.info("canary of %s waiting (%s): %s", view.candidate, decision.rule, decision.reason)
        return RolloutOutcome(
            "waiting", decision.rule, view.candidate, view.current, decision.reason, decision.numbers
        )
    return await conclude_canary(
        settings=settings,
        registry=registry,
        sessions=sessions,
        worker=worker,
        view=view,
        decision=decision.decision,
        rule=decision.rule,
        reason=decision.reason,
    )


async def conclude_canary(
    *,
    settings: Settings,
    registry: AdapterRegistry,
    sessions: async_sessionmaker[AsyncSession],
    worker: WorkerClient,
    view: CanaryView,
    decision: str,
    rule: str,
    reason: str,
    decided_by: int | None = None,
) -> RolloutOutcome:
    """Promote the candidate to everyone, or reject/abort it: registry, then store, then worker."""
    numbers = dict(view.decision.numbers)
    try:
        if decision == "promote":
            await asyncio.to_thread(registry.promote_candidate, view.candidate)
        else:
            await asyncio.to_thread(registry.abort_canary, view.candidate)
    except RegistryConflict as exc:
        # current moved since the canary began (a rollback, say): the canary compared against a
        # version no longer served, so it ends without promoting.
        await asyncio.to_thread(registry.abort_canary)
        decision, rule, reason = "abort", "superseded", str(exc)
    async with sessions() as session:
        try:
            await canary_service.record_decision(
                session,
                canary_id=view.record.id,
                decision=decision,
                rule=rule,
                stats={**numbers, "reason": reason},
                decided_by=decided_by,
            )
        except CanaryDecided as exc:  # another process decided first: the registry step above was a no-op
            log.info("canary %d: %s", view.record.id, exc)
    served = view.candidate if decision == "promote" else view.current
    told = await _tell_worker(worker, served)
    verb = {"promote": "promoted to everyone", "reject": "rejected", "abort": "aborted"}[decision]
    message = f"{view.candidate} {verb} ({rule}): {reason}"
    log.info("canary %d: %s", view.record.id, message)
    return RolloutOutcome(decision, rule, view.candidate, view.current, message, numbers, told)


async def _tell_worker(worker: WorkerClient, current: str | None) -> str:
    """Serve `current` and drop the candidate; a worker that is down reads the registry when it starts."""
    served = current or "the base model"
    try:
        await worker.load_adapter(
            current
        )  # a current load also drops a candidate the registry no longer names
        await worker.load_adapter(None, slot="candidate")
    except WorkerDown:
        return f"The worker is not running; it will serve {served} alone when it starts."
    except WorkerError as exc:
        if exc.status == 404:  # a backend without adapter endpoints (vLLM): its operator reloads
            return f"The model backend has no adapter endpoints: load {served} there yourself."
        return f"The worker did not switch ({exc}); it will when it restarts."
    return f"The worker serves {served} to everyone now."
