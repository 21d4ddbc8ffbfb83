"""Fixtures of the worker tests: one engine on the tiny model for the whole session, apps built around it."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from PIL import Image

from smolcord.settings import Settings

MakeWorker = Callable[..., Awaitable[TestClient]]


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Any:
    """The tiny model, loaded once: every app in these tests serves it (loading per test is too slow)."""
    from model.engine import Engine

    return Engine.load(str(tiny_model_dir), device="cpu")


@pytest.fixture
def make_settings(tmp_path: Path, engine: Any) -> Callable[..., Settings]:
    """Settings for one test: its own data dir, the tiny model, no .env; keywords override."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "model": engine.name} | overrides
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def make_worker(aiohttp_client: Any, engine: Any, make_settings: Callable[..., Settings]) -> MakeWorker:
    """`await make_worker(max_queue=1, ...)`: a test client of the real app around the shared engine."""
    from model.app import init_app

    async def make(**overrides: Any) -> TestClient:
        return await aiohttp_client(await init_app(make_settings(**overrides), engine=engine))

    return make


@pytest.fixture
def slow_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decode step takes at least 10 ms, so "a long answer" is long on any machine.

    The tiny model decodes 400 tokens in about 0.35 s on a fast CPU: tests that need a generation
    still running after a deadline or while other calls happen must not depend on the machine.
    """
    import time

    import model.continuous
    import model.engine
    from model.generation import RowSampler

    class SlowSampler(RowSampler):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            time.sleep(0.01)
            return super().__call__(input_ids, scores)

    monkeypatch.setattr(model.engine, "RowSampler", SlowSampler)  # the static scheduler's steps
    monkeypatch.setattr(model.continuous, "RowSampler", SlowSampler)  # the continuous one's


@pytest.fixture
async def worker(make_worker: MakeWorker) -> TestClient:
    return await make_worker()


@pytest.fixture
async def serve_worker(
    engine: Any, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`await serve_worker(**settings)`: the app listening on an ephemeral loopback port; returns its URL.

    For clients that bring their own HTTP stack (openai, the CLI). Unlike the test client's server,
    a plain AppRunner does not cancel handlers whose client left, as in production.
    """
    from model.app import init_app

    runners: list[web.AppRunner] = []

    async def serve(**overrides: Any) -> str:
        runner = web.AppRunner(await init_app(make_settings(**overrides), engine=engine))
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    try:
        yield serve
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def live_worker(serve_worker: Callable[..., Awaitable[str]]) -> str:
    return await serve_worker()


def png_bytes(size: tuple[int, int] = (48, 32), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@pytest.fixture
def image_url() -> Callable[..., str]:
    """`image_url(size=(w, h), color=(r, g, b))`: a PNG as a data: URL."""

    def make(size: tuple[int, int] = (48, 32), color: tuple[int, int, int] = (200, 30, 30)) -> str:
        return data_url(png_bytes(size, color))

    return make


@pytest.fixture
def ask() -> Callable[..., dict[str, Any]]:
    """`ask("question", image_url, ..., max_tokens=8)`: a one-turn chat body, greedy unless told.

    It sets ignore_eos, so every answer runs to max_tokens whatever the random weights say.
    """

    def make(question: str, *images: str, **fields: Any) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in images]
        content.append({"type": "text", "text": question})
        body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8}
        return body | {"ignore_eos": True} | fields

    return make


# Short prompts to try: the random tiny model ends some answers with <end_of_utterance> early.
_CANDIDATES = [
    "Describe the picture.",
    *(f"{word}." for word in ("Hi", "Why", "Colour", "Sky", "Cat", "Dog", "Tree", "Ball", "Cup", "Book")),
    *(f"Is there a {thing}?" for thing in ("cat", "dog", "car", "tree", "house", "bird", "boat", "sign")),
    *(f"What colour is the {thing}?" for thing in ("cat", "dog", "car", "tree", "house", "bird", "boat")),
    *(f"Question {i}" for i in range(40)),
]


@pytest.fixture(scope="session")
def stopping_prompt(engine: Any) -> str:
    """A question whose greedy answer ends with an end-of-turn token within 40 tokens."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=sorted(engine.stop_ids),
        pad_token_id=engine.pad_token_id,
    )
    for question in _CANDIDATES:
        encoding = engine.encode([{"role": "user", "content": [{"type": "text", "text": question}]}], [])
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=torch.tensor([encoding.input_ids]), generation_config=config
            )
        if int(out[0, -1]) in engine.stop_ids:
            return question
    pytest.skip("no candidate prompt makes the tiny model stop early")
