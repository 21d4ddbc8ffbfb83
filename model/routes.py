"""The worker's HTTP routes: OpenAI chat completions and models, health, metrics, and the adapter admin call."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import secrets
import time
from typing import Any

from aiohttp import web

from model.adapters import AdapterError
from model.batching import CompletionRequest, QueueFull
from model.chat import ChatRequest, encode_chat, parse_chat_request
from model.engine import Engine
from model.errors import APIError, Handler
from model.generation import Completion, Encoding, Event, Failed, TextDelta
from model.keys import (
    bodies_key,
    encoder_key,
    engine_key,
    metrics_key,
    registry_key,
    scheduler_key,
    settings_key,
)
from model.metrics import CONTENT_TYPE_LATEST
from smolcord.registry import AdapterRegistry, RegistryError

__all__ = ["auth_middleware", "metrics_middleware", "setup_routes"]

log = logging.getLogger(__name__)

# How often a handler waiting for tokens looks whether its client is still connected.
_DISCONNECT_POLL_S = 0.25
# Recorded for requests whose client went away first (nginx's convention); nobody receives it.
_CLIENT_CLOSED = 499
_STATUS = web.RequestKey(
    "status", int
)  # a handler's outcome when it differs from the response's status (streams)


def setup_routes(app: web.Application, *, adapter_endpoints: bool) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    if adapter_endpoints:  # off: the worker looks like a backend without them (vLLM), 404
        app.router.add_post("/v1/adapters/load", load_adapter)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts every request by route and final status (after errors became JSON)."""
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = request.get(_STATUS, response.status)
    request.app[metrics_key].requests.labels(route=route, status=str(status)).inc()
    return response


# Answered without SMOLCORD_WORKER_TOKEN even when it is set: liveness and monitoring, nothing to use.
_OPEN_PATHS = frozenset({"/health", "/metrics"})


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With SMOLCORD_WORKER_TOKEN set, every route but /health and /metrics needs it, before any body is read."""
    if request.app[settings_key].worker_token is not None and request.path not in _OPEN_PATHS:
        _check_token(request)
    return await handler(request)


# ---------------------------------------------------------------------------- chat completions


class _ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


async def chat_completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings, engine, scheduler = app[settings_key], app[engine_key], app[scheduler_key]
    started = time.monotonic()
    request_id = f"chatcmpl-{secrets.token_hex(12)}"

    try:
        # The body's bytes stay counted against the shared budget until its images are decoded.
        async with app[bodies_key].json(request) as body:
            chat = parse_chat_request(
                body, max_tokens_cap=settings.max_tokens, max_images=settings.max_images
            )
            version = _requested_version(body.get("model"), engine)
            with scheduler.admission():  # a queue place is held while the images are decoded
                loop = asyncio.get_running_loop()
                encoded = await loop.run_in_executor(app[encoder_key], encode_chat, engine, settings, chat)
                encoding, images = encoded.encoding, len(encoded.chat.image_urls)
                # The data: URLs are decoded now: a queued request need not keep megabytes of base64.
                chat = dataclasses.replace(encoded.chat, image_urls=[])
                max_tokens = _fit_context(chat, encoding, engine.max_model_len, settings.max_tokens)
                pending = CompletionRequest(
                    id=request_id,
                    encoding=encoding,
                    params=chat.params(max_tokens),
                    deadline=started + settings.request_timeout_s,
                    version=version,
                )
                scheduler.submit(pending)
    except QueueFull as exc:
        raise _busy(exc.retry_after) from None
    if chat.dropped_images:
        log.info("%s: %d history images dropped (image cap or context)", request_id, chat.dropped_images)
    log.info(
        "%s queued: %d prompt tokens, %d images, max_tokens %d%s",
        request_id,
        encoding.prompt_tokens,
        images,
        max_tokens,
        ", stream" if chat.stream else "",
    )
    try:
        if chat.stream:
            return await _stream(request, pending, chat)
        return await _complete(request, pending)
    except _ClientGone:
        log.info("%s: client went away, generation stopped", request_id)
        request[_STATUS] = _CLIENT_CLOSED
        return web.Response(status=_CLIENT_CLOSED)
    except asyncio.CancelledError:  # servers with handler_cancellation cancel us when the client leaves
        log.info("%s: cancelled, generation stopped", request_id)
        raise
    finally:
        pending.cancel()  # a no-op once finished; otherwise frees the row at the next step
        app[metrics_key].latency.observe(time.monotonic() - started)


def _requested_version(model: Any, engine: Engine) -> str | None:
    """The adapter version a request's `model` asks for (None: current); 404 for a version not served.

    `<base>:<version>` names current's or the candidate's version (`<base>:base` current when it
    serves no adapter); the bare base name, none, or a name that is not this base's (clients that
    always send one, as before) get current.
    """
    if not isinstance(model, str) or not model.startswith(f"{engine.name}:"):
        return None
    version = model.removeprefix(f"{engine.name}:")
    if version == (engine.adapter_version or "base"):
        return None
    if version == engine.candidate_version:
        return version
    served = ", ".join(_served_names(engine))
    raise APIError(
        404, f"The model {model!r} is not served here; this worker serves {served}.", code="model_not_found"
    )


def _served_names(engine: Engine) -> list[str]:
    return [e.served_name for e in engine.engines()]


def _busy(retry_after: int) -> APIError:
    return APIError(
        429,
        f"The worker is busy (its queue is full); try again in {retry_after} s.",
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def _fit_context(chat: ChatRequest, encoding: Encoding, max_model_len: int, cap: int) -> int:
    """max_tokens for this request: as asked, or what the cap and the context leave; 400 when nothing fits."""
    room = max_model_len - encoding.prompt_tokens
    if room <= 0:
        raise APIError(
            400,
            f"The prompt is {encoding.prompt_tokens} tokens; the model's context is {max_model_len}.",
            code="context_length_exceeded",
        )
    if chat.max_tokens is None:
        return min(cap, room)
    if chat.max_tokens > room:
        raise APIError(
            400,
            f"The prompt ({encoding.prompt_tokens} tokens) and max_tokens ({chat.max_tokens}) exceed "
            f"the model's context of {max_model_len} tokens.",
            code="context_length_exceeded",
        )
    return chat.max_tokens


async def _next_event(request: web.Request, pending: CompletionRequest) -> Event:
    """The request's next event; 504 past its deadline, _ClientGone once its client has left."""
    if not pending.events.empty():
        return pending.events.get_nowait()
    while True:
        left = pending.deadline - time.monotonic()
        if left <= 0:
            raise APIError(
                504,
                f"No answer within {request.app[settings_key].request_timeout_s:g} s; try a shorter question.",
                code="timeout",
            )
        try:
            return await asyncio.wait_for(pending.events.get(), min(left, _DISCONNECT_POLL_S))
        except TimeoutError:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise _ClientGone from None


def _check_finished(completion: Completion, request: web.Request) -> None:
    if completion.finish_reason == "timeout":
        raise APIError(
            504,
            f"No answer within {request.app[settings_key].request_timeout_s:g} s; try a shorter question.",
            code="timeout",
        )
    if completion.finish_reason == "cancelled":
        raise _ClientGone


def _failed(event: Failed) -> APIError:
    return APIError(500, f"The worker could not answer: {event.message}.", code="generation_failed")


def _log_done(pending: CompletionRequest, completion: Completion) -> None:
    log.info(
        "%s done: %d completion tokens, finish %s, %.2f s",
        pending.id,
        completion.completion_tokens,
        completion.finish_reason,
        time.monotonic() - pending.enqueued_at,
    )


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


async def _complete(request: web.Request, pending: CompletionRequest) -> web.Response:
    while True:
        event = await _next_event(request, pending)
        if isinstance(event, Failed):
            raise _failed(event)
        if isinstance(event, Completion):
            _check_finished(event, request)
            _log_done(pending, event)
            return web.json_response(
                {
                    "id": pending.id,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": event.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": event.text},
                            "logprobs": None,
                            "finish_reason": event.finish_reason,
                        }
                    ],
                    "usage": _usage(event),
                }
            )


async def _stream(request: web.Request, pending: CompletionRequest, chat: ChatRequest) -> web.StreamResponse:
    """Server-sent events; headers go out with the first token, so a 504 in the queue is still plain JSON."""
    created = int(time.time())
    response: web.StreamResponse | None = None

    def chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": pending.id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if chat.include_usage:
            body["usage"] = None
        return body

    model = ""
    try:
        while True:
            try:
                event = await _next_event(request, pending)
                if isinstance(event, Failed):
                    raise _failed(event)
                if isinstance(event, Completion):
                    _check_finished(event, request)
                model = pending.model  # set before the batch's first event
            except APIError as exc:
                if response is None:
                    raise
                request[_STATUS] = exc.status  # the 200 went out with the headers; count what happened
                log.info("%s: stream ended with %s", pending.id, exc.code)
                await _send(response, exc.body())
                return response
            if response is None:
                response = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
                await _send(response, chunk(model, {"role": "assistant", "content": ""}))
            if isinstance(event, TextDelta):
                await _send(response, chunk(model, {"content": event.text}))
            elif isinstance(event, Completion):
                _log_done(pending, event)
                await _send(response, chunk(model, {}, event.finish_reason))
                if chat.include_usage:
                    await _send(
                        response,
                        {
                            "id": pending.id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": _usage(event),
                        },
                    )
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
    except (ConnectionResetError, _ClientGone):  # ConnectionResetError: the client hung up mid-write
        if response is None:
            raise _ClientGone from None
        log.info("%s: client went away mid-stream, generation stopped", pending.id)
        request[_STATUS] = _CLIENT_CLOSED
        return response


async def _send(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")


# ---------------------------------------------------------------------------- models, health, metrics


async def list_models(request: web.Request) -> web.Response:
    """The served versions (current first, then the candidate) and the context length: answering means ready."""
    engine = request.app[engine_key]
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": served.served_name,
                    "object": "model",
                    "created": served.created,
                    "owned_by": "smolcord",
                    "root": engine.name,
                    "max_model_len": engine.max_model_len,
                }
                for served in engine.engines()
            ],
        }
    )


async def health(request: web.Request) -> web.Response:
    engine, scheduler = request.app[engine_key], request.app[scheduler_key]
    return web.json_response(
        {
            "status": "ok",
            "model": engine.served_name,
            "base_model": engine.name,
            "adapter": engine.adapter_version,
            "candidate": engine.candidate_version,
            "device": str(engine.device),
            "queue_depth": scheduler.queue_depth,
            "in_flight": scheduler.in_flight,
            "max_batch": scheduler.max_batch,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[metrics_key].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---------------------------------------------------------------------------- adapters (admin)


def _check_admin(request: web.Request) -> None:
    """Bearer SMOLCORD_WORKER_TOKEN when set (the middleware checked it); without one, loopback callers only."""
    if request.app[settings_key].worker_token is not None:
        _check_token(request)
        return
    # A reverse proxy on this host makes every caller look local: set a token behind one.
    if not _is_loopback(request.remote):
        raise APIError(
            403,
            "Admin calls from other hosts need SMOLCORD_WORKER_TOKEN set on the worker.",
            code="forbidden",
        )


def _check_token(request: web.Request) -> None:
    """401 without `Authorization: Bearer <SMOLCORD_WORKER_TOKEN>`, 403 with another token."""
    token = request.app[settings_key].worker_token
    assert token is not None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(
            401,
            "This worker needs Authorization: Bearer <SMOLCORD_WORKER_TOKEN>.",
            code="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise APIError(403, "That token is not the worker's.", code="forbidden")


def _is_loopback(remote: str | None) -> bool:
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


async def load_adapter(request: web.Request) -> web.Response:
    """Serve what the registry names for a slot: `current` (or the base), or `candidate` (or none); 409 when that is not the version sent."""
    _check_admin(request)
    async with request.app[bodies_key].json(request) as body:
        if not isinstance(body, dict) or "version" not in body:
            raise APIError(
                400,
                'Send {"version": "v3"} ("base" or null for no adapter), and "slot": "candidate" for the canary.',
                code="invalid_request",
            )
        wanted, slot = body["version"], body.get("slot", "current")
    if wanted is not None and not isinstance(wanted, str):
        raise APIError(400, "version must be a string or null.", code="invalid_value")
    if slot not in ("current", "candidate"):
        raise APIError(400, 'slot must be "current" or "candidate".', code="invalid_value")
    wanted = None if wanted in (None, "", "base") else wanted

    app = request.app
    engine, registry = app[engine_key], app[registry_key]
    # The registry entry is read inside the exclusive job (the swap itself), not here: a rollback
    # between a read here and the job would leave the worker serving what it no longer names.
    swap = engine.serve_registry_candidate if slot == "candidate" else engine.serve_registry_current
    try:
        before, now = await app[scheduler_key].run_exclusive(functools.partial(swap, registry))
    except RegistryError as exc:
        log.error("adapter registry unreadable: %s", exc)
        raise APIError(500, "The adapter registry could not be read.", code="registry_error") from None
    except AdapterError as exc:
        log.error("the registry's %s adapter was refused (%s); serving %s", slot, exc, _served_names(engine))
        raise APIError(
            422,
            f"The registry's {slot} adapter was refused: {exc}. Still serving {', '.join(_served_names(engine))}.",
            code="adapter_refused",
        ) from None
    if slot == "current" and engine.candidate is not None:
        # A promotion or rollback ended the canary: a candidate the registry no longer names goes too.
        try:
            await app[scheduler_key].run_exclusive(functools.partial(_drop_stale_candidate, engine, registry))
        except RegistryError as exc:
            log.error("adapter registry unreadable: %s (candidate kept)", exc)
    if now != before:
        if slot == "current":
            app[metrics_key].set_adapter(engine.adapter_version)
        log.info("%s adapter swapped: %s -> %s", slot, before or "none", now or "none")

    if now != wanted:
        raise APIError(
            409,
            f"The registry's {slot} adapter is {now or 'none'}, not {wanted or 'none'}; "
            f"serving {', '.join(_served_names(engine))}.",
            code="version_mismatch",
        )
    return web.json_response(
        {
            "version": (now or "base") if slot == "current" else now,
            "model": engine.served_name if slot == "current" else engine.engine_for(now).served_name,
            "candidate": engine.candidate_version,
        }
    )


def _drop_stale_candidate(engine: Engine, registry: AdapterRegistry) -> None:
    """Drop the candidate when the registry's `candidate` no longer names it (generation thread)."""
    if engine.candidate is not None and registry.candidate() != engine.candidate_version:
        engine.load_candidate(None, version=None)
