"""The adapter admin call: who may make it, what it loads (only the registry's current), and how it fails."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient
from peft import LoraConfig, get_peft_model

from model.app import init_app
from model.engine import Engine
from model.keys import scheduler_key
from smolcord.registry import AdapterRegistry
from smolcord.settings import Settings

LOAD = "/v1/adapters/load"
TEXT_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _save_lora(engine: Engine, out: Path, **options: Any) -> Path:
    """A LoRA on the tiny model's text layers with random, non-zero B (so it changes answers)."""
    torch.manual_seed(1)
    peft_model = get_peft_model(
        copy.deepcopy(engine.model), LoraConfig(target_modules=TEXT_TARGETS, r=4, lora_alpha=8, **options)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora": _save_lora(engine, root / "lora"),
        "dora": _save_lora(engine, root / "dora", use_dora=True),  # the worker cannot merge DoRA
    }


@pytest.fixture(autouse=True)
def base_weights_after(engine: Engine) -> Iterator[None]:
    """The engine is shared: whatever a test served, the next one starts from the base weights."""
    yield
    engine.load_adapter(None, version=None)


@pytest.fixture
def registry(make_settings: Callable[..., Settings]) -> AdapterRegistry:
    settings = make_settings()
    return AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)


def publish(registry: AdapterRegistry, folder: Path) -> str:
    """Commit folder as the next version and make it current."""
    with registry.new_version() as staged:
        shutil.copytree(folder, staged.path, dirs_exist_ok=True)
    assert staged.version is not None
    registry.promote(staged.version, expected_current=registry.current())
    return staged.version


async def greedy(worker: TestClient) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}
    response = await worker.post("/v1/chat/completions", json=body)
    assert response.status == 200
    return await response.json()


async def test_serves_what_the_registry_names_and_swaps_between_batches(
    worker: TestClient, registry: AdapterRegistry, adapters: dict[str, Path], engine: Engine
) -> None:
    base = await greedy(worker)
    assert base["model"] == engine.name

    version = publish(registry, adapters["lora"])
    loaded = await worker.post(LOAD, json={"version": version})
    assert loaded.status == 200, await loaded.text()
    assert (await loaded.json()) == {
        "version": version,
        "model": f"{engine.name}:{version}",
        "candidate": None,
    }
    tuned = await greedy(worker)
    assert tuned["model"] == f"{engine.name}:{version}"
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "stream": True}
    streamed = await (await worker.post("/v1/chat/completions", json=body)).text()
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert {chunk["model"] for chunk in chunks} == {f"{engine.name}:{version}"}
    assert tuned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    health = await (await worker.get("/health")).json()
    assert health["adapter"] == version and health["model"] == f"{engine.name}:{version}"
    assert f'smolcord_adapter_info{{version="{version}"}} 1.0' in await (await worker.get("/metrics")).text()

    registry.rollback()  # back to the base model
    back = await worker.post(LOAD, json={"version": "base"})
    assert back.status == 200 and (await back.json())["version"] == "base"
    assert (await greedy(worker)) | {"id": None, "created": None} == base | {"id": None, "created": None}


async def test_version_mismatch_is_409_and_serves_the_registry_current(
    worker: TestClient, registry: AdapterRegistry, adapters: dict[str, Path], engine: Engine
) -> None:
    nothing = await worker.post(LOAD, json={"version": "v1"})
    assert nothing.status == 409
    assert (await nothing.json())["error"]["code"] == "version_mismatch"
    assert engine.adapter_version is None

    version = publish(registry, adapters["lora"])
    other = await worker.post(LOAD, json={"version": None})  # null means the base
    assert other.status == 409
    assert engine.adapter_version == version  # it still serves what current names


async def test_a_refused_adapter_is_422_and_the_current_one_keeps_serving(
    worker: TestClient, registry: AdapterRegistry, adapters: dict[str, Path], engine: Engine
) -> None:
    good = publish(registry, adapters["lora"])
    assert (await worker.post(LOAD, json={"version": good})).status == 200
    before = await greedy(worker)

    bad = publish(registry, adapters["dora"])
    refused = await worker.post(LOAD, json={"version": bad})
    assert refused.status == 422
    error = (await refused.json())["error"]
    assert error["code"] == "adapter_refused" and "DoRA" in error["message"]
    assert engine.adapter_version == good
    after = await greedy(worker)
    assert after["model"] == before["model"]
    assert after["choices"] == before["choices"]


async def _until(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_racing_load_calls_end_on_what_current_names(
    worker: TestClient, registry: AdapterRegistry, adapters: dict[str, Path], engine: Engine
) -> None:
    first = publish(registry, adapters["lora"])
    second = publish(registry, adapters["lora"])
    registry.rollback(first)
    assert (await worker.post(LOAD, json={"version": first})).status == 200
    scheduler = worker.app[scheduler_key]
    gate = threading.Event()
    # The generation thread is busy (a long batch, say): every swap waits for it.
    busy = asyncio.ensure_future(scheduler.run_exclusive(lambda: gate.wait(30)))
    try:
        await _until(lambda: scheduler.jobs_waiting == 0)
        registry.promote(second, expected_current=first)  # a run promotes and tells the worker...
        promoted = asyncio.ensure_future(worker.post(LOAD, json={"version": second}))
        await _until(lambda: scheduler.jobs_waiting == 1)
        registry.rollback(first)  # ...while an operator rolls back and tells it too
        rolled_back = asyncio.ensure_future(worker.post(LOAD, json={"version": first}))
        await _until(lambda: rolled_back.done() or scheduler.jobs_waiting == 2)
    finally:
        gate.set()
    await busy
    late, last = await promoted, await rolled_back
    # Each swap read `current` when it ran: both end on what it names now, and the call that
    # expected the promoted version is told it is not served.
    assert engine.adapter_version == registry.current() == first
    assert last.status == 200 and (await last.json())["version"] == first
    assert late.status == 409 and (await late.json())["error"]["code"] == "version_mismatch"


async def test_the_registry_current_is_served_from_the_start(
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    registry: AdapterRegistry,
    adapters: dict[str, Path],
    engine: Engine,
) -> None:
    version = publish(registry, adapters["lora"])
    worker = await aiohttp_client(await init_app(make_settings(), engine=engine))
    assert (await (await worker.get("/health")).json())["adapter"] == version
    assert (await greedy(worker))["model"] == f"{engine.name}:{version}"


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"versions": "v1"}', b'{"version": 3}'])
async def test_bad_load_bodies_are_400(worker: TestClient, body: bytes) -> None:
    response = await worker.post(LOAD, data=body)
    assert response.status == 400
    assert set((await response.json())["error"]) == {"message", "type", "code"}


async def test_token_is_required_when_set(make_worker: Any) -> None:
    worker = await make_worker(worker_token="s3cret")
    missing = await worker.post(LOAD, json={"version": "base"})
    assert missing.status == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert (await missing.json())["error"]["type"] == "authentication_error"
    wrong = await worker.post(LOAD, json={"version": "base"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status == 403
    right = await worker.post(LOAD, json={"version": "base"}, headers={"Authorization": "Bearer s3cret"})
    assert right.status == 200


async def test_without_a_token_only_loopback_callers_may(
    aiohttp_client: Any, make_settings: Callable[..., Settings], engine: Engine
) -> None:
    local = await aiohttp_client(await init_app(make_settings(), engine=engine))
    assert (await local.post(LOAD, json={"version": "base"})).status == 200

    app = await init_app(make_settings(), engine=engine)

    @web.middleware
    async def from_elsewhere(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request.clone(remote="203.0.113.9"))

    app.middlewares.insert(0, from_elsewhere)
    remote = await aiohttp_client(app)
    refused = await remote.post(LOAD, json={"version": "base"})
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "forbidden"


async def test_adapter_endpoints_off_is_404(make_worker: Any) -> None:
    worker = await make_worker(adapter_endpoints=False)
    response = await worker.post(LOAD, json={"version": "base"})
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
