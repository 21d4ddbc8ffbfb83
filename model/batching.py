"""Batching: a bounded queue on the event loop and one generation thread that runs batches and jobs.

Two schedulers (SMOLCORD_SCHEDULER), on a single dedicated thread so the event loop stays free
while the model works:

- **continuous** (default): iteration-level scheduling. The thread runs the engine's
  `ContinuousBatch` step by step; before every step it admits waiting requests into free slots
  (up to `max_batch` rows), which join the running batch at once, and rows that ended leave.
- **static** (the baseline): requests that arrive together are gathered (up to `max_batch`,
  waiting at most `batch_wait_s` for more) into one `Engine.run_batch`, which runs until its
  longest row ends while new requests wait.

Either way a batch starting from idle waits up to `batch_wait_s` for requests arriving together.

Two versions (the canary): each request names the version it wants (`CompletionRequest.version`),
resolved to an engine when it starts (`Engine.engine_for`). The current and the candidate engine have
their own model copies and their own batches: the continuous loop steps both batches, one forward each,
and a static batch takes only requests of the engine its oldest request needs. A forward pass never
mixes versions, and each batch computes exactly what it would with the other version idle.
Jobs (adapter swaps) run on the same thread only when no row is in flight: once one waits, the
continuous loop admits nobody and drains its rows first, so no request is ever generated across a swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from model.engine import Engine
from model.generation import Completion, Encoding, Event, Failed, SamplingParams

__all__ = ["BatchScheduler", "CompletionRequest", "QueueFull"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long past batch_wait a batch about to start still waits for admitted requests whose images
# are being decoded: far less than the batch they would otherwise wait out.
_ARRIVAL_GRACE_S = 0.25


class QueueFull(Exception):
    """Too many requests are waiting; the client should come back after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"{depth} requests are already waiting")
        self.retry_after = retry_after


@dataclass(eq=False)
class CompletionRequest:
    """One chat completion on its way through the scheduler; its events arrive on `events`."""

    id: str
    encoding: Encoding
    params: SamplingParams
    deadline: float  # time.monotonic() after which nobody waits for it any more
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # read by the generation thread between steps
    model: str = ""  # the served name of the batch it runs in, set when that batch starts
    version: str | None = None  # the adapter version asked for (None: current), see Engine.engine_for
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when it left the queue for the engine (continuous scheduler)

    def cancel(self) -> None:
        """Stop generating for this request at the next step (or skip it if it still waits)."""
        self.cancelled = True


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]


class BatchScheduler:
    """Feeds queued requests to the engine in batches on one thread; `async with` starts and stops it."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int,
        batch_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_finish: Callable[[Completion], None] | None = None,
        continuous: bool = True,
    ) -> None:
        self.engine = engine
        self.continuous = continuous
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        # (batch size, seconds) after each batch, for metrics: a generate call (static), or a busy period
        # of the decode loop, from idle to idle, and the requests it served (continuous).
        self.on_batch = on_batch
        self.on_finish = on_finish  # every completion the engine ends, cancelled ones too, for metrics
        self._pending: deque[CompletionRequest] = deque()
        self._jobs: deque[_Job] = deque()
        self._running: list[CompletionRequest] = []
        self._arriving = 0  # admitted requests still being prepared
        self._wakeup = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        # Moving average, for Retry-After: a batch's duration (static), a request's time in the batch (continuous).
        self._batch_seconds = 1.0
        self._closing = threading.Event()  # tells the continuous loop on the generation thread to stop

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> BatchScheduler:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smolcord-generate")
        self._task = asyncio.create_task(self._dispatch(), name="smolcord-batch-dispatch")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop taking work, end the batch in flight at its next step, fail whatever still waits."""
        self._closing.set()
        for request in list(self._running):
            request.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            self._pending.popleft().events.put_nowait(Failed("the worker is shutting down"))
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the worker is shutting down"))
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True)
        while self._pending:  # put back by the continuous loop while it stopped
            self._pending.popleft().events.put_nowait(Failed("the worker is shutting down"))

    # ------------------------------------------------------------------ what callers use

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Requests in the batch being generated."""
        return len(self._running)

    @property
    def jobs_waiting(self) -> int:
        """Exclusive jobs (adapter swaps) waiting for the generation thread."""
        return len(self._jobs)

    @property
    def is_full(self) -> bool:
        """Waiting and admitted (still being encoded) requests fill `max_queue` places."""
        return len(self._pending) + self._arriving >= self.max_queue

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold a queue place while a request is prepared (images decoded, prompt encoded), then submit it.

        Raises QueueFull when no place is free, before any work is spent on the request.
        """
        if self.is_full:
            raise QueueFull(len(self._pending) + self._arriving, self.retry_after())
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wakeup.set()  # a batch may be waiting for this one

    def retry_after(self) -> int:
        """Seconds until a queue place is likely free: the batches ahead, at the recent pace."""
        batches_ahead = max(1, math.ceil(len(self._pending) / self.max_batch))
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def submit(self, request: CompletionRequest) -> None:
        """Queue a request, or raise QueueFull when `max_queue` are already waiting."""
        if self._task is None:
            raise RuntimeError("the scheduler is not running")
        if len(self._pending) >= self.max_queue:
            raise QueueFull(len(self._pending), self.retry_after())
        self._pending.append(request)
        self._wakeup.set()

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run fn on the generation thread between two batches (adapter swaps); returns its result."""
        if self._task is None:
            raise RuntimeError("the scheduler is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(fn, future))
        self._wakeup.set()
        return await future

    # ------------------------------------------------------------------ the loop

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending and not self._jobs:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._jobs:
                await self._run_job(self._jobs.popleft())
                continue
            await self._gather()
            if self.continuous:
                await self._run_continuously(loop)
                continue
            engine, batch = self._take_batch()
            if batch:
                await self._run_batch(loop, engine, batch)

    async def _gather(self) -> None:
        """Give requests arriving together a moment to share the batch.

        The wait counts from the oldest one's arrival, so requests that queued behind a running
        batch start at once. Past it, the batch still waits (a little) for admitted requests whose
        images are being decoded: leaving without them would make them wait for the whole batch.
        """
        deadline = self._pending[0].enqueued_at + self.batch_wait_s
        while self._pending and len(self._pending) < self.max_batch and not self._jobs:
            now = time.monotonic()
            until = deadline if now < deadline else deadline + _ARRIVAL_GRACE_S if self._arriving else now
            if until <= now:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), until - now)

    def _take_batch(self) -> tuple[Engine, list[CompletionRequest]]:
        """The oldest request's engine and the waiting requests it serves (others keep their places)."""
        batch: list[CompletionRequest] = []
        others: list[CompletionRequest] = []
        engine = self.engine
        now = time.monotonic()
        while self._pending and len(batch) < self.max_batch:
            request = self._pending.popleft()
            # Its client left or gave up while it waited: the route has already answered.
            if request.cancelled or request.deadline <= now:
                continue
            target = self.engine.engine_for(request.version)
            if not batch:
                engine = target
            if target is engine:
                batch.append(request)
            else:
                others.append(request)
        self._pending.extendleft(reversed(others))
        return engine, batch

    async def _run_batch(
        self, loop: asyncio.AbstractEventLoop, engine: Engine, batch: list[CompletionRequest]
    ) -> None:
        deliver = self._deliverer(loop)
        self._running = batch
        started = time.monotonic()
        try:
            await loop.run_in_executor(
                self._executor, engine.run_batch, [(r, r.encoding) for r in batch], deliver
            )
        finally:
            self._running = []
        seconds = time.monotonic() - started
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        log.debug("batch of %d done in %.2f s, %d waiting", len(batch), seconds, len(self._pending))
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)

    def _deliverer(self, loop: asyncio.AbstractEventLoop) -> Callable[[list[tuple[Any, Event]]], None]:
        def deliver(events: list[tuple[Any, Event]]) -> None:  # called on the generation thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(self._deliver_now, events)

        return deliver

    async def _run_continuously(self, loop: asyncio.AbstractEventLoop) -> None:
        """One busy period of the continuous scheduler: the decode loop runs until no row is left."""
        started = time.monotonic()
        served = await loop.run_in_executor(self._executor, self._decode_loop, self._deliverer(loop))
        seconds = time.monotonic() - started
        log.debug("decode loop: %d requests in %.2f s, %d waiting", served, seconds, len(self._pending))
        if served and self.on_batch is not None:
            self.on_batch(served, seconds)

    def _decode_loop(self, deliver: Callable[[list[tuple[Any, Event]]], None]) -> int:
        """On the generation thread: admit, step, until every batch is empty; returns the requests admitted.

        With a candidate served there are two batches (one per engine, each over its own model copy
        and cache); each iteration steps each busy one, so neither version waits for the other's rows.
        Swaps run only once both are empty, so the engines cannot change under a running batch.
        """
        served = 0
        try:
            while not self._closing.is_set():
                if not self._jobs:  # a job (adapter swap) waits: admit nobody, let the rows in flight end
                    served += self._admit(deliver)
                busy = [engine.continuous for engine in self.engine.engines() if not engine.continuous.idle]
                if not busy:
                    break
                for batch in busy:
                    batch.step(deliver)
                self._running = self._sources()
        finally:
            self._running = self._sources()
        return served

    def _sources(self) -> list[CompletionRequest]:
        # The sources are our requests.
        return cast(
            list[CompletionRequest],
            [s for engine in self.engine.engines() for s in engine.continuous.sources()],
        )

    def _admit(self, deliver: Callable[[list[tuple[Any, Event]]], None]) -> int:
        """Move waiting requests into free slots of their engine's batch (generation thread); returns how many.

        Oldest first, as one queue: a request whose batch is full waits, and so do those behind it.
        """
        admitted = 0
        in_batches = sum(len(engine.continuous) for engine in self.engine.engines())
        while in_batches < self.max_batch:
            try:
                request = self._pending.popleft()  # deques are thread-safe; submit() appends on the loop
            except IndexError:
                break
            now = time.monotonic()
            # Its client left or gave up while it waited: the route has already answered.
            if request.cancelled or request.deadline <= now:
                continue
            engine = self.engine.engine_for(request.version)
            batch = engine.continuous
            if len(batch) >= min(self.max_batch, batch.max_rows or self.max_batch):
                self._pending.appendleft(request)
                break
            if not batch.fits(request.encoding, request.params.max_tokens):
                if not batch.idle:  # too long for the fast path's slots: it runs alone once they are empty
                    self._pending.appendleft(request)
                    break
                log.info("%s fits no fast-path slot: generated alone with plain generate", request.id)
                request.started_at = now
                engine.run_batch([(request, request.encoding)], deliver)
                admitted += 1
                continue
            request.started_at = now
            batch.admit(request, request.encoding)
            admitted += 1
            in_batches += 1
        if admitted:
            self._running = self._sources()
        return admitted

    async def _run_job(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, job.fn)
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(exc)
        else:
            if not job.future.done():
                job.future.set_result(result)

    def _deliver_now(self, events: list[tuple[Any, Event]]) -> None:
        for request, event in events:
            request.events.put_nowait(event)
            if isinstance(event, Completion) and self.on_finish is not None:
                self.on_finish(event)
            started = getattr(request, "started_at", None)
            if self.continuous and started is not None and isinstance(event, Completion | Failed):
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.monotonic() - started)
