"""The fast path on the tiny model: same greedy answers as plain generate, invisible padding, warm-up before ready."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp.test_utils import TestClient
from peft import LoraConfig, get_peft_model
from PIL import Image

from model.app import init_app
from model.engine import Engine
from model.fastpath import FastPathError, kv_bytes_per_token, plan_cache
from model.generation import Completion, Encoding, Event, SamplingParams, TextDelta
from model.tiny import arch_config
from smolcord.settings import Settings
from smolcord.worker_client import WorkerClient, WorkerError

CHAT = "/v1/chat/completions"
# Small shapes keep the tests fast: batches of 1 or 4, caches of 128 or 256 positions. The tiny model
# (2 layers, 2 kv heads of 16, float32) costs 512 bytes a position: 4 x 256 positions is 0.5 MiB.
BUCKETS: dict[str, Any] = {"max_batch": 4, "batch_buckets": (1, 4), "min_length": 128}
TINY_BUDGET_GIB = 4 * 256 * 512 / 2**30
TEXT_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class _Source:
    """A request as the engine sees it (the scheduler's CompletionRequest, without the queue)."""

    def __init__(self, max_tokens: int = 10, **params: Any) -> None:
        self.id = "test"
        self.params = SamplingParams(max_tokens=max_tokens, **({"ignore_eos": True} | params))
        self.deadline = float("inf")
        self.cancelled = False
        self.model = ""


def _image(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> Image.Image:
    return Image.new("RGB", size, color)


def _encode(engine: Engine, question: str, *images: Image.Image) -> Encoding:
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    return engine.encode([{"role": "user", "content": content}], list(images))


def _run(
    engine: Engine, requests: list[tuple[_Source, Encoding]], shape: tuple[int, int] | None = None
) -> dict[int, list[Event]]:
    """Run one batch; every event delivered, by the id of the source it was delivered for."""
    events: dict[int, list[Event]] = {}

    def deliver(batch: list[tuple[Any, Event]]) -> None:
        for source, event in batch:
            events.setdefault(id(source), []).append(event)

    engine.run_batch(requests, deliver, shape=shape)
    return events


def _answers(engine: Engine, requests: list[tuple[_Source, Encoding]]) -> list[tuple[str, str, int]]:
    """(text, finish reason, completion tokens) of each request, in order."""
    events = _run(engine, requests)
    answers = []
    for source, _ in requests:
        completion = events[id(source)][-1]
        assert isinstance(completion, Completion)
        answers.append((completion.text, completion.finish_reason, completion.completion_tokens))
    return answers


def _both(plain: Engine, fast: Engine, specs: Sequence[tuple[Any, str, tuple[Any, ...]]]) -> Any:
    """The same batch (source params, question, images) through the plain engine and the fast one."""
    return tuple(
        _answers(e, [(_Source(**params), _encode(e, q, *images)) for params, q, images in specs])
        for e in (plain, fast)
    )


@pytest.fixture(scope="module")
def fast_engine(tiny_model_dir: Path) -> Engine:
    """The tiny model with the fast path on (static caches, buckets; not compiled), warmed up."""
    engine = Engine.load(str(tiny_model_dir), device="cpu")
    engine.enable_fast_path(kv_cache_gib=TINY_BUDGET_GIB, **BUCKETS)
    engine.warm_up()
    return engine


@pytest.fixture
def launched(fast_engine: Engine) -> Callable[[], dict[tuple[int, int], int]]:
    """`launched()`: batches the fast path ran per shape since the test started."""
    assert fast_engine.fast_path is not None
    counter = fast_engine.fast_path.launches
    before = dict(counter)
    return lambda: {
        shape: n - before.get(shape, 0) for shape, n in counter.items() if n > before.get(shape, 0)
    }


@pytest.fixture
def stepped(fast_engine: Engine) -> Callable[[], dict[tuple[int, int], int]]:
    """`stepped()`: decode steps the continuous scheduler ran per shape since the test started."""
    assert fast_engine.fast_path is not None
    counter = fast_engine.fast_path.steps
    before = dict(counter)
    return lambda: {
        shape: n - before.get(shape, 0) for shape, n in counter.items() if n > before.get(shape, 0)
    }


# ------------------------------------------------------------------------------ the memory plan


def test_cache_plan_at_smolvlm_dimensions() -> None:
    text_256m = arch_config("smolvlm-256m").text_config
    # 30 layers x 3 kv heads x 64 x (K, V) x 2 bytes
    assert kv_bytes_per_token(text_256m, torch.bfloat16) == 30 * 3 * 64 * 2 * 2 == 23_040
    plan = plan_cache(text_256m, dtype=torch.bfloat16, budget_gib=8, max_batch=16, max_model_len=8192)
    assert plan.batch_buckets == (1, 8, 16)
    assert plan.length_buckets == (512, 1024, 2048, 4096, 8192)  # the budget holds the whole context
    assert plan.bytes == 16 * 8192 * 23_040 <= 8 * 2**30
    assert plan.shape_for(3, 400 + 128) == (8, 1024)
    assert plan.shape_for(17, 100) is None and plan.shape_for(1, 8193) is None

    # 1 GiB at 32 rows: 46,603 positions, 1,456 a row, rounded down to 1,408, kept as the last bucket.
    small = plan_cache(text_256m, dtype=torch.bfloat16, budget_gib=1, max_batch=32, max_model_len=8192)
    assert small.batch_buckets == (1, 8, 32) and small.length_buckets == (512, 1024, 1408)
    assert small.bytes <= 2**30
    wide = plan_cache(text_256m, dtype=torch.bfloat16, budget_gib=8, max_batch=64, max_model_len=8192)
    assert wide.batch_buckets == (1, 8, 32, 64)

    text_2b = arch_config("smolvlm-2b").text_config
    assert kv_bytes_per_token(text_2b, torch.bfloat16) == 24 * 32 * 64 * 2 * 2
    plan_2b = plan_cache(text_2b, dtype=torch.bfloat16, budget_gib=8, max_batch=16, max_model_len=16384)
    assert plan_2b.length_buckets == (512, 1024, 2048, 2688)


def test_a_budget_too_small_is_refused_with_what_to_change() -> None:
    text_256m = arch_config("smolvlm-256m").text_config
    with pytest.raises(
        FastPathError, match=r"SMOLCORD_KV_CACHE_GIB=0\.01 holds 466 cache positions"
    ) as error:
        plan_cache(text_256m, dtype=torch.bfloat16, budget_gib=0.01, max_batch=16, max_model_len=8192)
    assert "Raise SMOLCORD_KV_CACHE_GIB to at least 0.176 GiB" in str(error.value)


async def test_a_budget_too_small_stops_the_worker_at_load(
    aiohttp_client: Any, engine: Engine, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(fast_path=True, kv_cache_gib=1e-6)
    with pytest.raises(FastPathError, match="SMOLCORD_KV_CACHE_GIB=1e-06"):
        await aiohttp_client(await init_app(settings, engine=engine))
    assert engine.fast_path is None and engine.ready  # the shared engine is left as it was


# ------------------------------------------------------------------------------ same answers as plain generate


@pytest.mark.parametrize(
    ("question", "images"),
    [("Describe the picture.", ()), ("What colour is the cat?", (_image((200, 30, 30)),))],
    ids=["text", "image"],
)
def test_greedy_single_request_equals_plain(
    engine: Engine, fast_engine: Engine, launched: Any, question: str, images: tuple[Image.Image, ...]
) -> None:
    plain, fast = _both(engine, fast_engine, [({"max_tokens": 24}, question, images)])
    assert fast == plain
    assert fast[0][2] == 24
    assert launched() == {(1, 128): 1}


def test_greedy_mixed_batch_equals_plain(engine: Engine, fast_engine: Engine, launched: Any) -> None:
    red, blue = _image((200, 30, 30)), _image((10, 20, 220), (20, 40))
    specs = [
        ({"max_tokens": 5}, "Hi", ()),
        ({"max_tokens": 16}, "What colour is the car on the left? Tell me in a few words.", (red,)),
        ({"max_tokens": 9}, "Both?", (blue, red)),
    ]
    plain, fast = _both(engine, fast_engine, specs)
    assert fast == plain
    assert [tokens for _, _, tokens in fast] == [5, 16, 9]
    assert launched() == {(4, 256): 1}  # three rows and a dummy; two images take more than 128 positions


def test_stopping_and_sampling_stay_per_row(
    engine: Engine, fast_engine: Engine, launched: Any, stopping_prompt: str
) -> None:
    specs = [
        ({"max_tokens": 40, "ignore_eos": False}, stopping_prompt, ()),  # ends on its end-of-turn token
        ({"max_tokens": 12, "temperature": 0.9, "seed": 7}, "Describe the picture.", ()),
        ({"max_tokens": 12, "temperature": 0.9, "seed": 7}, "Describe the picture.", ()),
        ({"max_tokens": 12}, "Describe the picture.", ()),
    ]
    plain, fast = _both(engine, fast_engine, specs)
    assert fast == plain
    assert fast[0][1] == "stop" and fast[0][2] < 40
    assert fast[1] == fast[2]  # the same seed draws the same answer
    assert fast[1] != fast[3]  # and sampling did sample
    assert launched() == {(4, 128): 1}


def test_dummy_rows_reach_no_request(fast_engine: Engine, launched: Any) -> None:
    requests = [(_Source(max_tokens=6), _encode(fast_engine, q)) for q in ("Hi", "Dog.")]
    events = _run(fast_engine, requests)
    assert launched() == {(4, 128): 1}  # two real rows, two dummies
    assert set(events) == {id(source) for source, _ in requests}  # nothing was delivered for a dummy
    for source, _ in requests:
        mine = events[id(source)]
        assert all(isinstance(e, TextDelta) for e in mine[:-1])
        assert isinstance(mine[-1], Completion) and mine[-1].completion_tokens == 6
        assert mine[-1].text == "".join(e.text for e in mine[:-1] if isinstance(e, TextDelta))


def test_a_batch_the_fast_path_cannot_take_fails_instead_of_hanging(fast_engine: Engine) -> None:
    requests = [(_Source(max_tokens=3), _encode(fast_engine, "Hi")) for _ in range(5)]
    events = _run(fast_engine, requests, shape=(4, 128))  # 5 rows cannot fit 4
    assert {type(e).__name__ for mine in events.values() for e in mine} == {"Failed"}
    assert set(events) == {id(source) for source, _ in requests}


def test_a_batch_too_long_for_every_shape_runs_plain(
    engine: Engine, fast_engine: Engine, launched: Any
) -> None:
    assert fast_engine.fast_path is not None
    fallbacks = fast_engine.fast_path.fallbacks
    two_photos = (_image((1, 2, 3), (128, 128)), _image((3, 2, 1), (128, 128)))  # 231 prompt tokens
    plain, fast = _both(engine, fast_engine, [({"max_tokens": 30}, "Hi", two_photos)])  # > 256 positions
    assert fast == plain
    assert launched() == {} and fast_engine.fast_path.fallbacks == fallbacks + 1


# ------------------------------------------------------------------------------ through the worker


@pytest.fixture
async def fast_worker(
    aiohttp_client: Any, fast_engine: Engine, make_settings: Callable[..., Settings]
) -> TestClient:
    settings = make_settings(fast_path=True, kv_cache_gib=TINY_BUDGET_GIB, max_batch=4)
    return await aiohttp_client(await init_app(settings, engine=fast_engine))


async def test_streaming_through_the_fast_worker(
    fast_worker: TestClient, engine: Engine, launched: Any, stepped: Any
) -> None:
    content = [{"type": "text", "text": "What colour is the cat?"}]
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 14,
        "ignore_eos": True,
        "temperature": 0,
    }
    assert (await fast_worker.get("/v1/models")).status == 200  # warmed already: ready at once
    response = await fast_worker.post(CHAT, json=body | {"stream": True})
    assert response.status == 200
    chunks = [
        json.loads(line[6:]) for line in (await response.text()).splitlines() if line.startswith("data: {")
    ]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = await (await fast_worker.post(CHAT, json=body)).json()
    assert streamed == whole["choices"][0]["message"]["content"]
    (plain,) = _answers(engine, [(_Source(max_tokens=14), _encode(engine, "What colour is the cat?"))])
    assert streamed == plain[0]
    # The continuous scheduler: no generate call, 13 decode steps each (the prefill chose the first token).
    assert launched() == {} and stepped() == {(1, 128): 2 * 13}


async def test_readiness_waits_for_the_warm_up(
    aiohttp_client: Any, tiny_model_dir: Path, make_settings: Callable[..., Settings], engine: Engine
) -> None:
    cold = Engine.load(str(tiny_model_dir), device="cpu")
    cold.enable_fast_path(kv_cache_gib=TINY_BUDGET_GIB, **BUCKETS)
    assert cold.fast_path is not None
    release = threading.Event()
    warm_up = cold.warm_up

    def held_warm_up(**options: Any) -> None:  # the generation thread waits here until the test lets it go
        assert release.wait(30)
        warm_up(**options)

    cold.warm_up = held_warm_up  # type: ignore[method-assign]
    worker = await aiohttp_client(await init_app(make_settings(fast_path=True, max_batch=4), engine=cold))
    try:
        models = await worker.get("/v1/models")
        assert models.status == 503 and models.headers["Retry-After"] == "5"
        assert (await models.json())["error"]["code"] == "warming_up"
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert (await worker.post(CHAT, json=body)).status == 503  # no request pays a compile
        assert (await worker.get("/health")).status == 200  # alive, just not ready
        # What `smolcord run` and the bot wait on: WorkerClient.ready() raises until the worker is ready.
        client = WorkerClient(worker.session, str(worker.make_url("")))
        with pytest.raises(WorkerError) as refused:
            await client.ready()
        assert refused.value.status == 503
    finally:
        release.set()
    for _ in range(300):
        if cold.ready:
            break
        await asyncio.sleep(0.05)
    assert (await client.ready())["id"] == engine.name
    # The continuous scheduler warms every shape as one decode step.
    assert cold.fast_path.warmed and set(cold.fast_path.steps) == set(cold.fast_path.plan.shapes)
    answer = await (await worker.post(CHAT, json=body)).json()
    assert answer["usage"]["completion_tokens"] >= 1


async def test_a_failed_warm_up_serves_plain_generate(
    aiohttp_client: Any, tiny_model_dir: Path, make_settings: Callable[..., Settings]
) -> None:
    cold = Engine.load(str(tiny_model_dir), device="cpu")
    cold.enable_fast_path(kv_cache_gib=TINY_BUDGET_GIB, **BUCKETS)
    assert cold.fast_path is not None

    def broken(**options: Any) -> None:
        raise RuntimeError("no compiler")

    cold.warm_up = broken  # type: ignore[method-assign]
    worker = await aiohttp_client(await init_app(make_settings(fast_path=True, max_batch=4), engine=cold))
    for _ in range(200):
        if (await worker.get("/v1/models")).status == 200:
            break
        await asyncio.sleep(0.05)
    assert cold.fast_path is None and cold.ready
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True}
    assert (await (await worker.post(CHAT, json=body)).json())["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------------------ compiled, and adapter swaps


def _save_lora(engine: Engine, out: Path) -> Path:
    torch.manual_seed(3)
    peft_model = get_peft_model(
        copy.deepcopy(engine.model), LoraConfig(target_modules=TEXT_TARGETS, r=4, lora_alpha=8)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture
def plain_back_to_base(engine: Engine) -> Iterator[None]:
    yield
    engine.load_adapter(None, version=None)


@pytest.mark.slow  # two dynamo compiles of the decode step on a CPU: about 10-20 s
def test_compiled_fast_path_swaps_adapters_without_recompiling(
    tiny_model_dir: Path, engine: Engine, tmp_path: Path, plain_back_to_base: None
) -> None:
    compiled = Engine.load(str(tiny_model_dir), device="cpu")
    # dynamo's own tracer with the eager backend: the graphs and guards of a real compile, no codegen.
    compiled.enable_fast_path(kv_cache_gib=TINY_BUDGET_GIB, compile=True, backend="eager", **BUCKETS)
    compiled.warm_up()
    fast_path = compiled.fast_path
    assert fast_path is not None and fast_path.compiled
    # dynamic shapes: one graph for a single row, one for larger batches, every cache length in each
    assert fast_path.graphs_at_warm_up == 2

    photos = (_image((9, 99, 200)), _image((200, 30, 30), (20, 40)))
    alone = [({"max_tokens": 12}, "Describe the picture.", ())]  # shape (1, 128)
    specs = [*alone, ({"max_tokens": 8}, "Both?", photos)]  # shape (4, 256): 160 prompt tokens
    assert _both(engine, compiled, alone)[1] == _both(engine, compiled, alone)[0]
    plain_base, fast_base = _both(engine, compiled, specs)
    assert fast_base == plain_base

    adapter = _save_lora(engine, tmp_path / "v1")
    pointers = {name: p.data_ptr() for name, p in compiled.model.named_parameters()}
    compiled.load_adapter(adapter, version="v1")
    engine.load_adapter(adapter, version="v1")  # a fresh merge on the plain engine: the reference
    plain_tuned, fast_tuned = _both(engine, compiled, specs)
    assert fast_tuned == plain_tuned
    assert fast_tuned != fast_base  # the swap changed the answers
    assert {name: p.data_ptr() for name, p in compiled.model.named_parameters()} == pointers

    compiled.load_adapter(None, version=None)
    back = _answers(compiled, [(_Source(**params), _encode(compiled, q, *im)) for params, q, im in specs])
    assert back == fast_base
    assert fast_path.graphs_since_warm_up() == 0  # neither batches nor swaps compiled anything
