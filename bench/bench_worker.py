"""Model worker benchmark on the CPU with the tiny model: what HTTP costs, and what batching buys.

    python -m bench.bench_worker [--clients 16] [--new-tokens 32] [--repeats 5]

1. Overhead: one request through HTTP (the real app listening on a loopback port, an aiohttp
   client) against the same generate called in-process (`model.generate` on the same encoded
   prompt, same number of new tokens): the difference in ms and the ratio.
2. Batching: `--clients` concurrent clients through HTTP against the same requests sent one after
   another through HTTP (goal: at least 3x the throughput).

Every request carries one image and a question, is greedy, and runs to exactly `--new-tokens`
(vLLM's `ignore_eos`, so random weights cannot end an answer early). Both sides of each ratio
are measured in the same run. Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import torch
from aiohttp import web
from PIL import Image, ImageDraw

from model.app import init_app
from model.chat import encode_chat, parse_chat_request
from model.engine import Engine
from model.tiny import build_tiny_model
from smolcord.settings import Settings

GOAL_BATCHING_X = 3.0


# ------------------------------------------------------------------------------ requests


def photo_jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    """A small synthetic photo (gradient and shapes) as a clean JPEG, so normalising passes it through."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(6):
        x, y = (seed * 37 + i * 53) % width, (seed * 11 + i * 29) % height
        draw.ellipse(
            (x, y, x + width // 6, y + height // 4), fill=((40 * i) % 256, 120, (200 - 30 * i) % 256)
        )
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def chat_body(index: int, image: bytes, new_tokens: int) -> dict[str, Any]:
    url = f"data:image/jpeg;base64,{base64.b64encode(image).decode('ascii')}"
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": f"Question {index}: what is in this picture? Describe it in detail."},
    ]
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def conversation(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The body as Engine.encode takes it (for the in-process baseline)."""
    images: list[Image.Image] = []
    messages = []
    for message in body["messages"]:
        parts = []
        for part in message["content"]:
            if part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].partition(",")[2])
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        messages.append({"role": message["role"], "content": parts})
    return messages, images


# ------------------------------------------------------------------------------ a listening worker


@asynccontextmanager
async def listening_worker(settings: Settings, engine: Engine) -> AsyncIterator[str]:
    """The real app on an ephemeral loopback port; yields its URL."""
    runner = web.AppRunner(await init_app(settings, engine=engine), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def client_session(settings: Settings, **options: Any) -> aiohttp.ClientSession:
    """A session that sends the worker's token, as every client of a worker that has one must."""
    token = settings.worker_token
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
    return aiohttp.ClientSession(headers=headers, **options)


def bench_token() -> str:
    """The benchmarks' workers require a token, as an exposed worker would: its check is part of what is measured."""
    return secrets.token_urlsafe(16)


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        data = await response.json()
        if response.status != 200:
            raise RuntimeError(f"worker answered {response.status}: {data}")
        return data


async def one_after_another(
    session: aiohttp.ClientSession, url: str, bodies: Sequence[dict[str, Any]]
) -> float:
    started = time.perf_counter()
    for body in bodies:
        await post(session, url, body)
    return time.perf_counter() - started


async def all_at_once(session: aiohttp.ClientSession, url: str, bodies: Sequence[dict[str, Any]]) -> float:
    started = time.perf_counter()
    answers = await asyncio.gather(*(post(session, url, body) for body in bodies))
    elapsed = time.perf_counter() - started
    assert all(a["usage"]["completion_tokens"] == bodies[0]["max_tokens"] for a in answers)
    return elapsed


def in_process_encode(engine: Engine, settings: Settings, body: dict[str, Any]) -> float:
    """What the worker does to a request before it can queue: check it, decode the image, encode the prompt."""
    started = time.perf_counter()
    chat = parse_chat_request(body, max_tokens_cap=settings.max_tokens, max_images=settings.max_images)
    encode_chat(engine, settings, chat)
    return time.perf_counter() - started


def in_process_generate(engine: Engine, body: dict[str, Any]) -> float:
    """The same request straight into model.generate: the floor HTTP, batching and hooks add to."""
    messages, images = conversation(body)
    inputs = engine.collate([engine.encode(messages, images)])
    new_tokens = body["max_tokens"]
    started = time.perf_counter()
    with torch.inference_mode():
        engine.model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=engine.pad_token_id,
        )
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


# ------------------------------------------------------------------------------ the measurements


async def measure(
    engine: Engine, settings: Settings, *, image: bytes, clients: int, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Each pair of figures is taken alternately, after warm-ups, and summarised by its median.

    Alternating spreads the noise of a shared machine over both sides of a ratio; warming up
    matters because the first calls at each sequence length are slow on CPU kernels.
    """
    bodies = [chat_body(i, image, new_tokens) for i in range(clients)]
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=3600)
    async with (
        listening_worker(settings, engine) as url,
        client_session(settings, timeout=timeout) as session,
    ):

        async def over_http() -> float:
            started = time.perf_counter()
            await post(session, url, bodies[0])
            return time.perf_counter() - started

        async def in_process() -> float:
            # On a thread of its own, as the worker's generate runs: the event loop stays free.
            return await loop.run_in_executor(None, in_process_generate, engine, bodies[0])

        for _ in range(3):
            await in_process()
            await over_http()
        inproc, http, encode = [], [], []
        for _ in range(repeats):
            inproc.append(await in_process())
            http.append(await over_http())
            encode.append(await loop.run_in_executor(None, in_process_encode, engine, settings, bodies[0]))

        await all_at_once(session, url, bodies)
        sequential, concurrent = [], []
        for _ in range(max(1, repeats // 2)):
            sequential.append(await one_after_another(session, url, bodies))
            concurrent.append(await all_at_once(session, url, bodies))

    inproc_s, http_s = statistics.median(inproc), statistics.median(http)
    sequential_s, concurrent_s = statistics.median(sequential), statistics.median(concurrent)
    tokens = clients * new_tokens
    return {
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "prompt_tokens": engine.encode(*conversation(bodies[0])).prompt_tokens,
        "new_tokens": new_tokens,
        "clients": clients,
        "repeats": repeats,
        "single_http_ms": http_s * 1e3,
        "single_in_process_ms": inproc_s * 1e3,
        "http_overhead_ms": (http_s - inproc_s) * 1e3,
        "http_overhead_ratio": http_s / inproc_s,
        "encode_ms": statistics.median(encode) * 1e3,
        "batch_wait_ms": settings.batch_wait_ms,
        "sequential_s": sequential_s,
        "concurrent_s": concurrent_s,
        "sequential_tok_per_s": tokens / sequential_s,
        "concurrent_tok_per_s": tokens / concurrent_s,
        "batching_throughput_x": sequential_s / concurrent_s,
    }


def print_table(title: str, result: dict[str, Any], goal_x: float | None = GOAL_BATCHING_X) -> None:
    clients = result["clients"]
    print(title)
    print(f"{'measure':<58}{'value':>12}{'baseline':>12}{'ratio':>9}")
    print(
        f"{'1 request through HTTP, ms (vs generate in-process)':<58}"
        f"{result['single_http_ms']:>12.1f}{result['single_in_process_ms']:>12.1f}"
        f"{result['http_overhead_ratio']:>8.2f}x"
    )
    print(
        f"{f'{clients} concurrent clients, tokens/s (vs one after another)':<58}"
        f"{result['concurrent_tok_per_s']:>12.1f}{result['sequential_tok_per_s']:>12.1f}"
        f"{result['batching_throughput_x']:>8.2f}x"
    )
    line = (
        f"overhead per request: {result['http_overhead_ms']:.1f} ms (of which decoding and encoding the "
        f"prompt {result['encode_ms']:.1f} ms, batch wait up to {result['batch_wait_ms']:g} ms); "
        f"{clients} requests take {result['concurrent_s']:.2f} s together, {result['sequential_s']:.2f} s in turn"
    )
    if goal_x is not None:
        verdict = "meets" if result["batching_throughput_x"] >= goal_x else "MISSES"
        line += f"; goal >= {goal_x:g}x: {verdict}"
    print(line)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_worker", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(list(argv) if argv is not None else [])

    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny-model")
        engine = Engine.load(str(model_dir), device="cpu")
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            data_dir=Path(tmp) / "data",
            model=str(model_dir),
            max_batch=args.clients,
            worker_token=bench_token(),
        )
        result = asyncio.run(
            measure(
                engine,
                settings,
                image=photo_jpeg((96, 64)),
                clients=args.clients,
                new_tokens=args.new_tokens,
                repeats=args.repeats,
            )
        )
    result = {"bench": "worker", "model": "tiny", "threads": torch.get_num_threads(), **result}
    print_table(f"model worker (tiny model, CPU, {result['threads']} torch threads)", result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
