"""Two versions served at once (the canary): routing by `model`, isolation of their batches, the candidate slot."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp.test_utils import TestClient
from peft import LoraConfig, get_peft_model

from model.engine import Engine
from smolcord.registry import AdapterRegistry
from smolcord.settings import Settings

LOAD = "/v1/adapters/load"
CHAT = "/v1/chat/completions"
TEXT_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*(vision_model.*\.(q_proj|v_proj)|text_model.*\.(q_proj|v_proj))"


def _save_lora(engine: Engine, out: Path, *, seed: int, targets: str = TEXT_TARGETS) -> Path:
    """A LoRA on the tiny model with random, non-zero B (so each seed answers differently)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(engine.model), LoraConfig(target_modules=targets, r=4, lora_alpha=8)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loras(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("canary-adapters")
    return [
        _save_lora(engine, root / "a", seed=1),
        _save_lora(engine, root / "b", seed=2, targets=VISION_TARGETS),  # touches the vision tower too
        _save_lora(engine, root / "c", seed=3),
    ]


@pytest.fixture(autouse=True)
def base_weights_after(engine: Engine) -> Iterator[None]:
    """The engine is shared: whatever a test served, the next one starts from the base and no candidate."""
    yield
    engine.load_adapter(None, version=None)
    engine.load_candidate(None, version=None)


@pytest.fixture
def registry(make_settings: Callable[..., Settings], loras: list[Path]) -> AdapterRegistry:
    """A registry holding v1, v2, v3 (the three LoRAs), nothing current yet."""
    settings = make_settings()
    registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    for folder in loras:
        with registry.new_version() as staged:
            shutil.copytree(folder, staged.path, dirs_exist_ok=True)
    return registry


def set_candidate(registry: AdapterRegistry, version: str | None) -> None:
    """Put `version` in canary through the registry (None ends the canary), as a training run does."""
    registry.abort_canary()
    if version is not None:
        registry.start_canary(version, expected_current=registry.current())


def set_current(registry: AdapterRegistry, version: str) -> None:
    registry.promote(version, expected_current=registry.current())


def asking(question: str, model: str | None = None, *, max_tokens: int = 10, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    return body | ({"model": model} if model is not None else {}) | fields


async def answer(worker: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await worker.post(CHAT, json=body)
    assert response.status == 200, await response.text()
    return await response.json()


def text(data: dict[str, Any]) -> str:
    return str(data["choices"][0]["message"]["content"])


QUESTIONS = ["hello", "What is this?", "Describe the sky.", "Why?", "Count to three.", "Is it red?"]


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
async def test_concurrent_requests_for_two_versions_answer_as_each_version_alone(
    make_worker: Any, registry: AdapterRegistry, engine: Engine, scheduler: str
) -> None:
    name = engine.name
    alone: dict[str, list[str]] = {}
    for version in ("v1", "v2"):  # each version served as current, nothing else served, its requests together
        set_current(registry, version)
        worker = await make_worker(scheduler=scheduler, batch_wait_ms=200)
        assert engine.candidate is None and engine.adapter_version == version
        answers = await asyncio.gather(*(answer(worker, asking(q)) for q in QUESTIONS))
        assert {a["model"] for a in answers} == {f"{name}:{version}"}
        alone[version] = [text(a) for a in answers]
        await worker.close()
    assert alone["v1"] != alone["v2"]  # else the test could not tell the versions apart

    set_current(registry, "v1")
    set_candidate(registry, "v2")
    worker = await make_worker(scheduler=scheduler, batch_wait_ms=200)
    assert engine.adapter_version == "v1" and engine.candidate_version == "v2"
    # Both versions' requests interleaved and in flight together, several times over.
    bodies = [asking(q, f"{name}:{v}") for q in QUESTIONS for v in ("v1", "v2")]
    for _ in range(2):
        answers = await asyncio.gather(*(answer(worker, body) for body in bodies))
        for body, got in zip(bodies, answers, strict=True):
            version = body["model"].rsplit(":", 1)[1]
            assert got["model"] == body["model"]
            assert text(got) == alone[version][QUESTIONS.index(body["messages"][0]["content"])]


async def test_model_field_routes_and_unknown_versions_are_404(
    make_worker: Any, registry: AdapterRegistry, engine: Engine
) -> None:
    name = engine.name
    set_current(registry, "v1")
    set_candidate(registry, "v3")
    worker = await make_worker()
    current, candidate = f"{name}:v1", f"{name}:v3"
    for model in (None, name, current, "some-other-model"):  # the bare base, none, or a foreign name: current
        assert (await answer(worker, asking("hello", model)))["model"] == current
    assert (await answer(worker, asking("hello", candidate)))["model"] == candidate
    streamed = await (await worker.post(CHAT, json=asking("hello", candidate, stream=True))).text()
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert chunks and {chunk["model"] for chunk in chunks} == {candidate}

    for unknown in (f"{name}:v2", f"{name}:v9", f"{name}:base"):  # v2 exists but is not served
        response = await worker.post(CHAT, json=asking("hello", unknown))
        assert response.status == 404, unknown
        assert (await response.json())["error"]["code"] == "model_not_found"

    models = await (await worker.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [current, candidate]
    health = await (await worker.get("/health")).json()
    assert health["adapter"] == "v1" and health["candidate"] == "v3"


async def test_base_names_current_when_no_adapter_is_served(
    make_worker: Any, registry: AdapterRegistry, engine: Engine
) -> None:
    set_candidate(registry, "v1")  # a candidate beside the base model
    worker = await make_worker()
    assert (await answer(worker, asking("hello", f"{engine.name}:base")))["model"] == engine.name
    assert (await answer(worker, asking("hello", f"{engine.name}:v1")))["model"] == f"{engine.name}:v1"
    models = await (await worker.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [engine.name, f"{engine.name}:v1"]


async def test_the_candidate_is_loaded_replaced_and_dropped_from_the_registry(
    make_worker: Any, registry: AdapterRegistry, engine: Engine
) -> None:
    name = engine.name
    set_current(registry, "v1")
    worker = await make_worker()
    assert engine.candidate is None
    reference = {v: text(await answer(worker, asking("hello"))) for v in ("v1",)}

    # Nothing in canary: loading a candidate is a 409 and serves none.
    refused = await worker.post(LOAD, json={"version": "v2", "slot": "candidate"})
    assert refused.status == 409 and (await refused.json())["error"]["code"] == "version_mismatch"
    assert engine.candidate is None

    set_candidate(registry, "v2")
    loaded = await worker.post(LOAD, json={"version": "v2", "slot": "candidate"})
    assert loaded.status == 200, await loaded.text()
    assert await loaded.json() == {"version": "v2", "model": f"{name}:v2", "candidate": "v2"}
    v2 = text(await answer(worker, asking("hello", f"{name}:v2")))
    assert text(await answer(worker, asking("hello"))) == reference["v1"]  # current is untouched

    # Replaced: the registry names v3 now; a request naming v2 gets 409 and v3 is served anyway.
    set_candidate(registry, "v3")
    stale = await worker.post(LOAD, json={"version": "v2", "slot": "candidate"})
    assert stale.status == 409
    assert engine.candidate_version == "v3"
    v3 = text(await answer(worker, asking("hello", f"{name}:v3")))
    assert v3 != v2
    assert (await worker.post(CHAT, json=asking("hello", f"{name}:v2"))).status == 404
    # The replaced copy answers as v3 does when it is current (no trace of v2 left in its weights).
    set_candidate(registry, None)
    set_current(registry, "v3")
    alone = await make_worker()
    assert engine.candidate is None
    assert text(await answer(alone, asking("hello"))) == v3
    await alone.close()

    # Dropped: null while the registry still names one is a 409; after the abort it drops.
    set_current(registry, "v1")
    set_candidate(registry, "v3")
    worker = await make_worker()
    assert engine.candidate_version == "v3"
    kept = await worker.post(LOAD, json={"version": None, "slot": "candidate"})
    assert kept.status == 409 and engine.candidate_version == "v3"
    set_candidate(registry, None)
    dropped = await worker.post(LOAD, json={"version": None, "slot": "candidate"})
    assert dropped.status == 200, await dropped.text()
    assert (await dropped.json())["candidate"] is None and engine.candidate is None
    models = await (await worker.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [f"{name}:v1"]
    health = await (await worker.get("/health")).json()
    assert health["candidate"] is None


async def test_loading_current_drops_a_candidate_the_registry_no_longer_names(
    make_worker: Any, registry: AdapterRegistry, engine: Engine
) -> None:
    set_current(registry, "v1")
    set_candidate(registry, "v2")
    worker = await make_worker()
    assert engine.candidate_version == "v2"
    # Promotion: current moves to the candidate and `candidate` goes, in one locked step.
    set_current(registry, "v2")
    set_candidate(registry, None)
    promoted = await worker.post(LOAD, json={"version": "v2"})
    assert promoted.status == 200
    assert await promoted.json() == {"version": "v2", "model": f"{engine.name}:v2", "candidate": None}
    assert engine.candidate is None
    assert (await answer(worker, asking("hello", f"{engine.name}:v2")))["model"] == f"{engine.name}:v2"


async def test_a_restart_serves_current_and_candidate(
    make_worker: Any, registry: AdapterRegistry, engine: Engine
) -> None:
    set_current(registry, "v1")
    set_candidate(registry, "v2")
    first = await make_worker()
    before = text(await answer(first, asking("hello", f"{engine.name}:v2")))
    await first.close()
    engine.load_candidate(None, version=None)  # a new process has no candidate in memory
    engine.load_adapter(None, version=None)

    second = await make_worker()
    models = await (await second.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [f"{engine.name}:v1", f"{engine.name}:v2"]
    assert text(await answer(second, asking("hello", f"{engine.name}:v2"))) == before


async def test_a_candidate_swap_waits_for_the_rows_in_flight(
    make_worker: Any, registry: AdapterRegistry, engine: Engine, slow_decoding: None
) -> None:
    name = engine.name
    set_candidate(registry, "v1")
    worker = await make_worker()
    expected = text(await answer(worker, asking("hello", f"{name}:v1", max_tokens=30)))
    running = asyncio.create_task(answer(worker, asking("hello", f"{name}:v1", max_tokens=30)))
    for _ in range(500):  # until its row is in the candidate's batch (10 ms a step at least)
        if engine.candidate is not None and not engine.candidate.continuous.idle:
            break
        await asyncio.sleep(0.01)
    set_candidate(registry, "v2")
    swapped = await worker.post(LOAD, json={"version": "v2", "slot": "candidate"})
    assert swapped.status == 200
    finished = await running
    assert finished["model"] == f"{name}:v1" and text(finished) == expected  # all of it on v1's weights
    assert engine.candidate_version == "v2"


async def test_with_the_fast_path_the_candidate_runs_eager_and_answers_as_alone(
    aiohttp_client: Any,
    tiny_model_dir: Path,
    make_settings: Callable[..., Settings],
    registry: AdapterRegistry,
) -> None:
    from model.app import init_app

    fast = Engine.load(str(tiny_model_dir), device="cpu")
    fast.enable_fast_path(
        kv_cache_gib=4 * 256 * 512 / 2**30, max_batch=4, batch_buckets=(1, 4), min_length=128
    )
    fast.warm_up(continuous=True)
    settings = make_settings(fast_path=True, max_batch=4, batch_wait_ms=200)
    set_current(registry, "v2")
    worker = await aiohttp_client(await init_app(settings, engine=fast))
    alone = await asyncio.gather(*(answer(worker, asking(q)) for q in QUESTIONS[:4]))
    await worker.close()

    set_current(registry, "v1")
    set_candidate(registry, "v2")
    worker = await aiohttp_client(await init_app(settings, engine=fast))
    assert fast.candidate is not None and fast.candidate.fast_path is None and fast.fast_path is not None
    bodies = [asking(q, f"{fast.name}:{v}") for q in QUESTIONS[:4] for v in ("v1", "v2")]
    answers = await asyncio.gather(*(answer(worker, body) for body in bodies))
    assert [text(a) for a, b in zip(answers, bodies, strict=True) if b["model"].endswith(":v2")] == [
        text(a) for a in alone
    ]
    assert {a["model"] for a in answers} == {f"{fast.name}:v1", f"{fast.name}:v2"}
