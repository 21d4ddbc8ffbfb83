"""The model worker's aiohttp app: an OpenAI-compatible chat endpoint over a batching scheduler (continuous or static)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from model.adapters import AdapterError
from model.batching import BatchScheduler
from model.bodies import BodyReader, max_body_size
from model.engine import Engine
from model.errors import APIError, Handler, error_middleware
from model.keys import (
    bodies_key,
    encoder_key,
    engine_key,
    metrics_key,
    registry_key,
    scheduler_key,
    settings_key,
)
from model.metrics import WorkerMetrics
from model.routes import auth_middleware, metrics_middleware, setup_routes
from smolcord.registry import AdapterRegistry, RegistryError
from smolcord.settings import Settings

__all__ = ["init_app"]

log = logging.getLogger(__name__)


async def init_app(settings: Settings, *, engine: Engine | None = None) -> web.Application:
    """The worker app; it loads settings.model at startup unless an engine is given (tests share one)."""
    max_body = max_body_size(settings)
    app = web.Application(
        client_max_size=max_body,  # what aiohttp itself would buffer; the routes read through BodyReader
        middlewares=[metrics_middleware, error_middleware, auth_middleware, _readiness_middleware],
    )
    app[settings_key] = settings
    app[bodies_key] = BodyReader(max_size=max_body, budget=settings.body_budget)
    app[registry_key] = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    app[metrics_key] = WorkerMetrics(
        queue_depth=lambda: app[scheduler_key].queue_depth if scheduler_key in app else 0,
        in_flight=lambda: app[scheduler_key].in_flight if scheduler_key in app else 0,
    )
    app.cleanup_ctx.append(_worker(engine))
    setup_routes(app, adapter_endpoints=settings.adapter_endpoints)
    return app


def _worker(given: Engine | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def worker(app: web.Application) -> AsyncIterator[None]:
        settings = app[settings_key]
        if given is not None:
            engine = given
        else:
            # Blocking for seconds to minutes; a thread keeps signals and the loop responsive.
            engine = await asyncio.to_thread(
                Engine.load, settings.model, device=settings.device, dtype=settings.dtype
            )
        if settings.fast_path and engine.fast_path is None:
            # Allocates the KV cache now, so a budget that cannot hold it stops the start with its reason.
            await asyncio.to_thread(
                engine.enable_fast_path, kv_cache_gib=settings.kv_cache_gib, max_batch=settings.max_batch
            )
        app[engine_key] = engine
        # Image decoding and tiling release the GIL: a few threads keep a burst of image requests
        # from queueing behind each other before they can even join a batch.
        encoder = ThreadPoolExecutor(
            max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="smolcord-encode"
        )
        app[encoder_key] = encoder
        metrics = app[metrics_key]
        scheduler = BatchScheduler(
            engine,
            max_batch=settings.max_batch,
            batch_wait_s=settings.batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            on_batch=metrics.observe_batch,
            on_finish=metrics.observe_completion,
            continuous=settings.scheduler == "continuous",
        )
        async with scheduler:
            app[scheduler_key] = scheduler
            await _serve_registry_current(app)
            # Fast path: every shape is compiled and recorded on the generation thread while the worker
            # already listens; /v1/models (readiness) and chat answer 503 until that is done.
            warming = (
                asyncio.create_task(_warm_up(app), name="smolcord-warm-up") if not engine.ready else None
            )
            yield
            if warming is not None:
                warming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warming
        encoder.shutdown(wait=False, cancel_futures=True)

    return worker


async def _serve_registry_current(app: web.Application) -> None:
    """At start, serve what the registry's `current` and `candidate` name; a broken adapter leaves the base serving (no candidate)."""
    engine, registry = app[engine_key], app[registry_key]
    try:
        await app[scheduler_key].run_exclusive(functools.partial(engine.serve_registry_current, registry))
    except RegistryError as exc:
        log.error("adapter registry unreadable at start (%s): serving %s", exc, engine.served_name)
        return
    except AdapterError as exc:
        log.error(
            "the registry's current adapter was refused at start (%s): serving %s", exc, engine.served_name
        )
    app[metrics_key].set_adapter(engine.adapter_version)
    try:
        await app[scheduler_key].run_exclusive(functools.partial(engine.serve_registry_candidate, registry))
    except RegistryError as exc:
        log.error("adapter registry unreadable at start (%s): no candidate", exc)
    except AdapterError as exc:
        log.error("the registry's candidate adapter was refused at start (%s): no candidate", exc)
    log.info("serving %s", ", ".join(e.served_name for e in engine.engines()))


async def _warm_up(app: web.Application) -> None:
    """Warm up the fast path as a job of the generation thread; if that fails, serve without it."""
    engine, scheduler = app[engine_key], app[scheduler_key]
    try:
        await scheduler.run_exclusive(
            functools.partial(engine.warm_up, continuous=app[settings_key].scheduler == "continuous")
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("fast path warm-up failed: serving with plain generate")
        await scheduler.run_exclusive(engine.disable_fast_path)
    log.info("ready: serving %s", engine.served_name)


# Answered 503 until the fast path is warm: the readiness check, and requests that would pay a compile.
_NEEDS_WARM_UP = frozenset({"/v1/models", "/v1/chat/completions"})


@web.middleware
async def _readiness_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    engine = request.app.get(engine_key)
    if engine is not None and not engine.ready and request.path in _NEEDS_WARM_UP:
        raise APIError(
            503,
            "The worker is warming up (compiling its decoding shapes); try again in a few seconds.",
            code="warming_up",
            headers={"Retry-After": "5"},
        )
    return await handler(request)
