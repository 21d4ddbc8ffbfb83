"""WorkerClient and `smolcord ask` against a real worker, and their typed failures."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from smolcord.cli import main
from smolcord.worker_client import (
    ChatResult,
    WorkerBusy,
    WorkerClient,
    WorkerDown,
    WorkerError,
    WorkerTimeout,
)

HELLO = [{"role": "user", "content": "hello"}]
EXACT = {"ignore_eos": True}  # vLLM's extension: answers run to max_tokens


def client_of(worker: TestClient, **options: Any) -> WorkerClient:
    return WorkerClient(worker.session, str(worker.make_url("")), **options)


async def test_ready_health_chat_and_stream(worker: TestClient, image_url: Callable[..., str]) -> None:
    client = client_of(worker)
    model = await client.ready()
    assert model["max_model_len"] == 2048
    health = await client.health()
    assert health["status"] == "ok" and health["model"] == model["id"]

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url()}},
                {"type": "text", "text": "Hi?"},
            ],
        }
    ]
    plain = await client.chat(messages, max_tokens=12, extra_body=EXACT)
    assert isinstance(plain, ChatResult)
    assert plain.model == model["id"] and plain.finish_reason == "length"
    assert plain.usage.completion_tokens == 12

    items = [item async for item in client.stream_chat(messages, max_tokens=12, extra_body=EXACT)]
    *deltas, final = items
    assert all(isinstance(d, str) for d in deltas)
    assert isinstance(final, ChatResult)
    assert "".join(deltas) == final.text == plain.text  # type: ignore[arg-type]
    assert final.usage == plain.usage and final.finish_reason == "length" and final.model == plain.model


async def test_worker_errors_are_typed(make_worker: Any, slow_decoding: None) -> None:
    client = client_of(await make_worker(request_timeout_s=0.5))
    with pytest.raises(WorkerError) as bad:
        await client.chat(HELLO, max_tokens=0)
    assert bad.value.status == 400 and bad.value.code == "invalid_value"
    with pytest.raises(WorkerTimeout):
        await client.chat(HELLO, max_tokens=400, extra_body=EXACT)
    with pytest.raises(WorkerTimeout):  # arrives as an SSE error event after the 200
        async for _ in client.stream_chat(HELLO, max_tokens=400, extra_body=EXACT):
            pass
    with pytest.raises(WorkerError) as mismatch:
        await client.load_adapter("v1")  # the registry is empty: the worker serves the base
    assert mismatch.value.status == 409
    assert (await client.load_adapter(None))["version"] == "base"
    with pytest.raises(WorkerError) as no_canary:
        await client.load_adapter("v1", slot="candidate")  # the registry names no candidate
    assert no_canary.value.status == 409
    assert (await client.load_adapter(None, slot="candidate"))["candidate"] is None


async def test_busy_worker_is_worker_busy_with_its_hint(aiohttp_client: Any) -> None:
    async def busy(request: web.Request) -> web.Response:
        body = {"error": {"message": "busy", "type": "rate_limit_error", "code": "queue_full"}}
        return web.json_response(body, status=429, headers={"Retry-After": "3"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", busy)
    calls = 0

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return await handler(request)

    app.middlewares.append(count)
    client = client_of(await aiohttp_client(app))
    with pytest.raises(WorkerBusy) as info:
        await client.chat(HELLO)
    assert info.value.retry_after == 3.0 and info.value.status == 429
    assert calls == 1  # never retried by the client itself


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_nothing_listening_is_worker_down() -> None:
    async with aiohttp.ClientSession() as session:
        client = WorkerClient(session, f"http://127.0.0.1:{_free_port()}")
        with pytest.raises(WorkerDown):
            await client.ready()
        with pytest.raises(WorkerDown):
            async for _ in client.stream_chat(HELLO):
                pass


async def test_leaving_a_stream_early_stops_its_generation(live_worker: str) -> None:
    """On a plain server (no handler cancellation) the worker notices the closed connection itself."""
    async with aiohttp.ClientSession() as session:
        client = WorkerClient(session, live_worker)
        stream = client.stream_chat(HELLO, max_tokens=400, extra_body=EXACT)
        async for _ in stream:
            break
        await stream.aclose()

        async def idle() -> bool:
            health = await client.health()
            return health["in_flight"] == 0

        for _ in range(200):
            if await idle():
                break
            await asyncio.sleep(0.05)
        assert await idle()
        async with session.get(f"{live_worker}/metrics") as response:
            text = await response.text()
        assert 'smolcord_completions_finished_total{reason="cancelled"} 1.0' in text
        assert 'smolcord_requests_total{route="/v1/chat/completions",status="499"} 1.0' in text


# ---------------------------------------------------------------------------- smolcord ask


async def test_ask_streams_the_answer(
    serve_worker: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    # A low cap keeps the default-length answer (`ask` sends no max_tokens) short on a CPU.
    live_worker = await serve_worker(max_tokens=48)
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (0, 120, 240)).save(image)
    code = await asyncio.to_thread(main, ["ask", str(image), "What is it?", "--worker", live_worker])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.endswith("\n") and len(out.out) > 1

    code = await asyncio.to_thread(main, ["ask", "-", "Describe the picture.", "--worker", live_worker])
    assert code == 0


def test_ask_without_a_worker_fails_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ask", "-", "hi", "--worker", f"http://127.0.0.1:{_free_port()}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("smolcord ask: no worker answers at") and "\n" not in err


def test_ask_refuses_a_file_that_is_not_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not an image")
    assert main(["ask", str(bogus), "hi", "--worker", "http://127.0.0.1:9"]) == 1
    assert "not an image" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "missing.png"), "hi"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_worker_command_runs_the_app_where_told(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import model.app

    seen: dict[str, Any] = {}
    monkeypatch.setenv("SMOLCORD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SMOLCORD_WORKER_TOKEN", "s3cret")  # beyond loopback, a worker needs one
    monkeypatch.setattr(model.app, "init_app", lambda settings: seen.setdefault("settings", settings))
    monkeypatch.setattr(web, "run_app", lambda app, **kwargs: seen.update(app=app, **kwargs))
    assert main(["worker", "--model", "some/model", "--host", "0.0.0.0", "--port", "9999"]) == 0
    assert seen["settings"].model == "some/model" and seen["app"] is seen["settings"]
    assert seen["host"] == "0.0.0.0" and seen["port"] == 9999
