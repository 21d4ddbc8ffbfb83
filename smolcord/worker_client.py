"""A small async client of the model worker's API (torch-free: the bot and the CLI use it).

    async with aiohttp.ClientSession() as session:
        worker = WorkerClient(session, "http://127.0.0.1:8700")
        async for item in worker.stream_chat(messages, max_tokens=200):
            if isinstance(item, str):
                print(item, end="")
            else:
                result = item  # ChatResult: text, model, finish_reason, usage

Works against any OpenAI-compatible server for the chat and model calls. Failures are typed:
WorkerBusy (429, never retried here: the caller decides), WorkerDown (nothing listening),
WorkerTimeout, and WorkerError for everything else; all are WorkerError subclasses.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = [
    "ChatResult",
    "Usage",
    "WorkerBusy",
    "WorkerClient",
    "WorkerDown",
    "WorkerError",
    "WorkerTimeout",
]


class WorkerError(Exception):
    """The worker answered with an error (or broke off); `status` is its HTTP status, 0 when there was none."""

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.code = code


class WorkerBusy(WorkerError):
    """429: the worker's queue is full; `retry_after` is its hint in seconds (None when it gave none)."""

    def __init__(self, message: str, *, retry_after: float | None, code: str | None = None) -> None:
        super().__init__(429, message, code=code)
        self.retry_after = retry_after


class WorkerDown(WorkerError):
    """Nothing answers at the worker's address (connection refused, unknown host)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message, code="unreachable")


class WorkerTimeout(WorkerError):
    """The worker gave up on the request (504), or the session's timeout ran out first."""

    def __init__(self, message: str, *, status: int = 504) -> None:
        super().__init__(status, message, code="timeout")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class ChatResult:
    """A finished answer: the whole text, the model that wrote it (`<base>:<adapter>`), why it ended."""

    text: str
    model: str
    finish_reason: str | None
    usage: Usage


class WorkerClient:
    """Calls one worker over the caller's session (whose timeouts apply).

    `model` is sent as the chat requests' `model` (SMOLCORD_WORKER_MODEL); None sends none, and
    the server answers with its default (the smolcord worker: what it serves; vLLM: its base).
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        token: str | None = None,
        model: str | None = None,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def ready(self) -> dict[str, Any]:
        """The served model's entry from GET /v1/models (`id`, `max_model_len`); raises until it is ready."""
        body = await self._request("GET", "/v1/models")
        models = body.get("data") if isinstance(body, dict) else None
        if not models:
            raise WorkerError(200, "the worker lists no model")
        return dict(models[0])

    async def health(self) -> dict[str, Any]:
        """GET /health: status, model, adapter, queue depth, in flight."""
        return dict(await self._request("GET", "/health"))

    async def load_adapter(self, version: str | None, *, slot: str = "current") -> dict[str, Any]:
        """Ask the worker to serve the registry's adapter for `slot`, expected to be `version`.

        slot "current": None is the base; slot "candidate" (the canary, served beside current): None
        drops it. 409 (the registry names something else), 422 (it refused the adapter) and 404 (a
        backend without adapter endpoints) arrive as WorkerError with that status.
        """
        if slot == "candidate":
            body: dict[str, Any] = {"version": version, "slot": "candidate"}
        else:
            body = {"version": version or "base"}
        return dict(await self._request("POST", "/v1/adapters/load", body))

    async def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        extra_body: dict[str, Any] | None = None,
        model: str | None = None,
    ) -> ChatResult:
        """One answer, not streamed. `extra_body` fields are sent as they are (vLLM's `ignore_eos`, say)."""
        body = _chat_body(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if model or self.model:  # a call's own `model` (a canary arm, `<base>:<version>`) wins
            body["model"] = model or self.model
        body.update(extra_body or {})
        data = await self._request("POST", "/v1/chat/completions", body)
        try:
            choice = data["choices"][0]
            return ChatResult(
                text=choice["message"]["content"] or "",
                model=data.get("model", ""),
                finish_reason=choice.get("finish_reason"),
                usage=_usage(data.get("usage")),
            )
        except (KeyError, IndexError, TypeError, AttributeError):
            raise WorkerError(200, "the worker's answer has no choices") from None

    async def stream_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        extra_body: dict[str, Any] | None = None,
        model: str | None = None,
    ) -> AsyncIterator[str | ChatResult]:
        """Text deltas as they are generated (str), then one ChatResult with the whole text.

        Closing the iterator early (break, cancellation) closes the connection, and the worker stops
        generating for it.
        """
        body = _chat_body(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if model or self.model:  # a call's own `model` (a canary arm, `<base>:<version>`) wins
            body["model"] = model or self.model
        body.update(extra_body or {})
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        parts: list[str] = []
        model = ""
        finish_reason: str | None = None
        usage = Usage()
        async with self._connect("POST", "/v1/chat/completions", body) as response:
            await _raise_for_status(response)
            try:
                async for data in _sse_events(response):
                    if data == "[DONE]":
                        break
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise WorkerError(200, "the worker sent an unreadable event") from None
                    if "error" in event:
                        raise _error_from_body(_status_of(event["error"]), event, None)
                    model = event.get("model") or model
                    if event.get("usage"):
                        usage = _usage(event["usage"])
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            parts.append(text)
                            yield text
                        finish_reason = choice.get("finish_reason") or finish_reason
                else:
                    raise WorkerError(0, "the worker closed the stream before it was complete")
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
                raise WorkerError(0, f"the worker broke off the stream ({type(exc).__name__})") from None
            except TimeoutError:
                raise WorkerTimeout("no answer from the worker in time", status=0) from None
        yield ChatResult(text="".join(parts), model=model, finish_reason=finish_reason, usage=usage)

    # ------------------------------------------------------------------ plumbing

    def _connect(self, method: str, path: str, body: Any = None) -> _Connection:
        return _Connection(self.session, method, self.base_url + path, body, self._headers)

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        async with self._connect(method, path, body) as response:
            await _raise_for_status(response)
            try:
                return await response.json(content_type=None)
            except (ValueError, aiohttp.ClientPayloadError):
                raise WorkerError(response.status, "the worker's answer is not JSON") from None
            except TimeoutError:
                raise WorkerTimeout("no answer from the worker in time", status=0) from None


class _Connection:
    """`session.request` as an async context manager whose connection failures are WorkerErrors."""

    def __init__(
        self, session: aiohttp.ClientSession, method: str, url: str, body: Any, headers: dict[str, str]
    ) -> None:
        self._session = session
        self._method = method
        self._url = url
        self._body = body
        self._headers = headers
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        try:
            self._response = await self._session.request(
                self._method, self._url, json=self._body, headers=self._headers
            )
        except aiohttp.ClientConnectorError as exc:
            raise WorkerDown(f"no worker at {self._url} ({exc.strerror or type(exc).__name__})") from None
        except TimeoutError:
            raise WorkerTimeout(f"no answer from {self._url} in time", status=0) from None
        except aiohttp.ClientError as exc:
            raise WorkerError(0, f"the request to {self._url} failed ({type(exc).__name__})") from None
        return self._response

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if self._response is None:
            return
        if exc_type is None:
            self._response.release()
        else:
            # Left early (an error, or the caller stopped a stream): drop the connection, so the
            # worker sees its client go and stops generating.
            self._response.close()


def _chat_body(
    messages: list[dict[str, Any]],
    *,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    seed: int | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": messages, "temperature": temperature, "top_p": top_p}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if seed is not None:
        body["seed"] = seed
    return body


def _usage(data: Any) -> Usage:
    if not isinstance(data, dict):
        return Usage()
    return Usage(
        prompt_tokens=int(data.get("prompt_tokens") or 0),
        completion_tokens=int(data.get("completion_tokens") or 0),
        total_tokens=int(data.get("total_tokens") or 0),
    )


def _status_of(error: Any) -> int:
    """The HTTP status an error event stands for (SSE errors arrive after the 200)."""
    code = error.get("code") if isinstance(error, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    if code == "timeout" or kind == "timeout_error":
        return 504
    if code == "queue_full" or kind == "rate_limit_error":
        return 429
    return 500 if kind == "server_error" else 400


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError, TimeoutError):
        body = None
    raise _error_from_body(response.status, body, response.headers.get("Retry-After"))


def _error_from_body(status: int, body: Any, retry_after: str | None) -> WorkerError:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = str(message or f"the worker answered HTTP {status}")
    if status == 429:
        try:
            hint: float | None = float(retry_after) if retry_after is not None else None
        except ValueError:
            hint = None
        return WorkerBusy(message, retry_after=hint, code=code)
    if status == 504:
        return WorkerTimeout(message)
    return WorkerError(status, message, code=code)


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The data of each server-sent event (several data lines joined by newlines)."""
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # comments (":...") and other fields (event:, id:, retry:) carry nothing we use
    if data:
        yield "\n".join(data)
