"""The training job's typed way into the feedback store: synchronous calls on one event loop and one engine.

The job is synchronous (trl, the gate, the registry); the store is async. `JobStore` keeps one
event loop (`asyncio.Runner`) and one engine for the whole run, and each method is one service
call in its own session, named and typed so that mypy sees every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from feedback.store import adapters as adapters_service
from feedback.store import canary as canary_service
from feedback.store import runs as runs_service

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from feedback.store.adapters import AdapterRecord
    from feedback.store.pairs import PreferencePair, RatedAnswer
    from feedback.store.runs import TrainingRunView
    from smolcord.settings import Settings

__all__ = ["JobStore"]

T = TypeVar("T")


class JobStore:
    """The store as the job sees it; use as a context manager (it closes its engine and loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._runner = asyncio.Runner()
        self._engine: AsyncEngine | None = None

    def __enter__(self) -> JobStore:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            self._runner.run(engine.dispose())
        self._runner.close()

    def _call(self, call: Callable[[AsyncSession], Awaitable[T]]) -> T:
        from feedback.store.db import create_engine, sessionmaker

        async def in_session() -> T:
            if self._engine is None:  # created inside the loop that will use it
                self._engine = create_engine(self.settings.db_url)
            async with sessionmaker(self._engine)() as session:
                return await call(session)

        return self._runner.run(in_session())

    # ------------------------------------------------------------------ data

    def pairs_and_rated(self, *, with_rated: bool) -> tuple[list[PreferencePair], list[RatedAnswer]]:
        """The preference pairs now (and, for KTO, the rated answers), by the store's consent rules."""
        from feedback.store.pairs import build_pairs, build_rated_answers

        async def read(session: AsyncSession) -> tuple[list[PreferencePair], list[RatedAnswer]]:
            pairs = await build_pairs(session, settings=self.settings)
            rated = await build_rated_answers(session, settings=self.settings) if with_rated else []
            return pairs, rated

        return self._call(read)

    # ------------------------------------------------------------------ runs

    def start_run(
        self,
        *,
        method: str,
        heldout_fraction: float,
        examples: Sequence[PreferencePair | RatedAnswer] = (),
    ) -> int:
        """Record a run as running, with the examples it trains and gates on; its id."""
        return self._call(
            lambda s: runs_service.start_training_run(
                s, method=method, heldout_fraction=heldout_fraction, examples=examples
            )
        )

    def finish_run(
        self,
        *,
        run_id: int,
        status: str,
        metrics: Mapping[str, Any] | None = None,
        adapter_version: str | None = None,
        error: str | None = None,
    ) -> TrainingRunView:
        """Record how a run ended: succeeded, failed or skipped."""
        return self._call(
            lambda s: runs_service.finish_training_run(
                s, run_id=run_id, status=status, metrics=metrics, adapter_version=adapter_version, error=error
            )
        )

    def get_run(self, *, run_id: int) -> TrainingRunView:
        """One run's record."""
        return self._call(lambda s: runs_service.get_training_run(s, run_id=run_id))

    def last_run(self, *, statuses: Collection[str] = ("succeeded",)) -> TrainingRunView | None:
        """The latest run with one of `statuses`, if any."""
        return self._call(lambda s: runs_service.last_training_run(s, statuses=statuses))

    def close_stale_runs(self) -> None:
        """Runs still "running" while we hold the lock were killed: record them as failed."""
        while (stale := self.last_run(statuses=("running",))) is not None:
            self.finish_run(
                run_id=stale.id, status="failed", error="killed: still running when the next run started"
            )

    # ------------------------------------------------------------------ adapters

    def record_adapter(
        self, *, version: str, run_id: int | None, metrics: Mapping[str, Any], promoted: bool
    ) -> AdapterRecord:
        """Record a new version with its metrics, as promoted or rejected."""
        self._call(
            lambda s: adapters_service.record_adapter(s, version=version, run_id=run_id, metrics=metrics)
        )
        if promoted:
            return self._call(lambda s: adapters_service.promote_adapter(s, version=version))
        return self._call(lambda s: adapters_service.reject_adapter(s, version=version))

    def record_canary(
        self, *, version: str, run_id: int | None, metrics: Mapping[str, Any], current: str | None
    ) -> None:
        """Record a new version that passed the gate and went into canary beside `current`."""
        self._call(
            lambda s: adapters_service.record_adapter(s, version=version, run_id=run_id, metrics=metrics)
        )
        self._call(
            lambda s: canary_service.start_canary(
                s, candidate=version, current=current, share=self.settings.canary_share
            )
        )

    def list_adapters(self) -> list[AdapterRecord]:
        """Every recorded version, oldest first."""
        return self._call(adapters_service.list_adapters)
