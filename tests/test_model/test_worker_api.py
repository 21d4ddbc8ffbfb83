"""The worker's HTTP API on the tiny model: answers, batching, limits, errors and what keeps it serving."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from PIL import Image

from model.engine import Engine

Ask = Callable[..., dict[str, Any]]
ImageUrl = Callable[..., str]
CHAT = "/v1/chat/completions"


async def answer(worker: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await worker.post(CHAT, json=body)
    assert response.status == 200, await response.text()
    return await response.json()


async def text_of(worker: TestClient, body: dict[str, Any]) -> str:
    return (await answer(worker, body))["choices"][0]["message"]["content"]


async def sse_events(response: ClientResponse) -> list[Any]:
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def metric(text: str, name: str) -> float:
    """The value of one sample line of /metrics (name with its labels, exactly as printed)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def metrics_text(worker: TestClient) -> str:
    return await (await worker.get("/metrics")).text()


async def batches_done(worker: TestClient, count: int) -> str:
    """/metrics once `count` batches are recorded (a batch is recorded just after its answers go out)."""

    async def recorded() -> bool:
        return metric(await metrics_text(worker), "smolcord_batch_size_count") >= count

    await wait_for(recorded)
    return await metrics_text(worker)


async def wait_for(condition: Callable[[], Any], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------- answers


async def test_answer_has_openai_shape_and_served_model(
    worker: TestClient, ask: Ask, image_url: ImageUrl
) -> None:
    body = await answer(worker, ask("What is this?", image_url(), max_tokens=6))
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == (await (await worker.get("/v1/models")).json())["data"][0]["id"]
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


async def test_end_of_turn_stops_and_is_not_shown(worker: TestClient, ask: Ask, stopping_prompt: str) -> None:
    body = await answer(worker, ask(stopping_prompt, max_tokens=50, ignore_eos=False))
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 50
    assert "<end_of_utterance>" not in body["choices"][0]["message"]["content"]

    # vLLM's ignore_eos runs on to max_tokens: what benchmarks use for answers of a set length.
    forced = await answer(worker, ask(stopping_prompt, max_tokens=50, ignore_eos=True))
    assert forced["choices"][0]["finish_reason"] == "length"
    assert forced["usage"]["completion_tokens"] == 50


async def test_stream_matches_the_plain_answer(worker: TestClient, ask: Ask, image_url: ImageUrl) -> None:
    body = ask("What colour is the cat?", image_url(), max_tokens=20)
    plain = await answer(worker, body)
    response = await worker.post(
        CHAT, json=body | {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = await sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == plain["choices"][0][
        "finish_reason"
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


async def test_multi_turn_history_with_two_images(
    worker: TestClient, engine: Engine, image_url: ImageUrl
) -> None:
    first, second = image_url((64, 40), (10, 200, 10)), image_url((30, 50), (10, 10, 200))
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": first}},
                {"type": "text", "text": "What is it?"},
            ],
        },
        {"role": "assistant", "content": "A green box."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And this one?"},
                {"type": "image_url", "image_url": {"url": second}},
            ],
        },
    ]
    body = await answer(worker, {"messages": messages, "max_tokens": 4, "temperature": 0})
    expected = engine.encode(
        [
            {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A green box."}]},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
        ],
        [Image.new("RGB", (64, 40), (10, 200, 10)), Image.new("RGB", (30, 50), (10, 10, 200))],
    )
    assert body["usage"]["prompt_tokens"] == expected.prompt_tokens
    one_image = await answer(worker, {"messages": messages[1:2], "max_tokens": 1, "temperature": 0})
    assert body["usage"]["prompt_tokens"] > one_image["usage"]["prompt_tokens"]


async def test_unknown_fields_are_ignored(worker: TestClient, ask: Ask) -> None:
    body = ask("hello", max_tokens=None, max_completion_tokens=3) | {
        "model": "anything",
        "user": "someone",
        "presence_penalty": 0,
        "n": 1,
    }
    assert (await answer(worker, body))["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------------- batching


async def test_greedy_output_is_the_same_alone_and_in_a_batch(
    make_worker: Any, ask: Ask, image_url: ImageUrl
) -> None:
    worker = await make_worker(batch_wait_ms=300)
    bodies = [
        ask("hello", max_tokens=12),
        ask("What is this?", image_url(), max_tokens=12),
        ask("two", image_url((20, 20), (0, 10, 200)), image_url(), max_tokens=12),
        ask("Describe the picture.", max_tokens=12),
    ]
    alone = [await text_of(worker, body) for body in bodies]
    together = await asyncio.gather(*(text_of(worker, body) for body in bodies))
    assert together == alone
    text = await batches_done(worker, 5)
    assert metric(text, "smolcord_batch_size_count") == 5  # four alone, then one batch of four
    assert metric(text, "smolcord_batch_size_sum") == 8


async def test_each_row_keeps_its_own_max_tokens(make_worker: Any, ask: Ask) -> None:
    worker = await make_worker(batch_wait_ms=300)
    answers = await asyncio.gather(
        answer(worker, ask("hello", max_tokens=3)),
        answer(worker, ask("one", max_tokens=7)),
        answer(worker, ask("two", max_tokens=12)),
    )
    assert [a["usage"]["completion_tokens"] for a in answers] == [3, 7, 12]
    assert {a["choices"][0]["finish_reason"] for a in answers} == {"length"}
    assert metric(await batches_done(worker, 1), "smolcord_batch_size_count") == 1


async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(make_worker: Any, ask: Ask) -> None:
    worker = await make_worker(batch_wait_ms=300)

    def sampled(seed: int) -> dict[str, Any]:
        return ask("hello", temperature=1.0, top_p=0.9, seed=seed, max_tokens=16)

    first, again, other = [await text_of(worker, sampled(seed)) for seed in (7, 7, 8)]
    assert first == again
    assert first != other
    greedy = await text_of(worker, ask("hello", max_tokens=16))
    assert first != greedy
    batched = await asyncio.gather(
        text_of(worker, sampled(8)), text_of(worker, ask("hello", max_tokens=16)), text_of(worker, sampled(7))
    )
    assert batched == [other, greedy, first]


# ---------------------------------------------------------------------------- bad input


def _noise_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def _bomb_png() -> bytes:
    """A few kilobytes that decode to 9 megapixels."""
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _with_image(url: str, **fields: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "ignore_eos": True} | fields


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_TEXT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "ignore_eos": True}
BAD_INPUTS: list[tuple[str, Callable[[], Any], int, str]] = [
    ("malformed JSON", lambda: b'{"messages": [', 400, "invalid_json"),
    ("not an object", lambda: [], 400, "invalid_request"),
    ("no messages", lambda: {"max_tokens": 2}, 400, "invalid_messages"),
    ("unknown role", lambda: {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_messages"),
    (
        "bad part",
        lambda: {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        400,
        "invalid_messages",
    ),
    ("n > 1", lambda: _TEXT | {"n": 2}, 400, "unsupported_value"),
    ("max_tokens over the cap", lambda: _TEXT | {"max_tokens": 100_000}, 400, "invalid_value"),
    ("max_tokens not a number", lambda: _TEXT | {"max_tokens": "many"}, 400, "invalid_value"),
    ("temperature out of range", lambda: _TEXT | {"temperature": 9}, 400, "invalid_value"),
    ("ignore_eos not a bool", lambda: _TEXT | {"ignore_eos": "yes"}, 400, "invalid_value"),
    ("broken base64", lambda: _with_image("data:image/png;base64,@@not*base64@@"), 400, "bad_data_url"),
    (
        "not an image",
        lambda: _with_image("data:image/png;base64," + _b64(b"just some text")),
        400,
        "not_an_image",
    ),
    ("http URL (never fetched)", lambda: _with_image("https://example.com/cat.png"), 400, "unsupported_url"),
    (
        "too many images",
        lambda: {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}] * 3}
            ]
        },
        400,
        "too_many_images",
    ),
    (
        "prompt over the context",
        lambda: _TEXT | {"messages": [{"role": "user", "content": " cat" * 2100}]},
        400,
        "context_length_exceeded",
    ),
    (
        "prompt and max_tokens over the context",
        lambda: _TEXT | {"messages": [{"role": "user", "content": " cat" * 1800}], "max_tokens": 400},
        400,
        "context_length_exceeded",
    ),
    (
        "image too large",
        lambda: _with_image("data:image/png;base64," + _b64(_noise_png((160, 160)))),
        413,
        "too_large",
    ),
    (
        "decompression bomb",
        lambda: _with_image("data:image/png;base64," + _b64(_bomb_png())),
        413,
        "too_many_pixels",
    ),
    ("body over the size limit", lambda: _TEXT | {"padding": "x" * 2_500_000}, 413, "too_large"),
    ("stream with bad input", lambda: _TEXT | {"stream": True, "n": 3}, 400, "unsupported_value"),
]


@pytest.mark.parametrize(("case", "body", "status", "code"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
async def test_bad_input_gets_an_openai_error_and_the_worker_keeps_serving(
    make_worker: Any, case: str, body: Callable[[], Any], status: int, code: str
) -> None:
    worker = await make_worker(max_images=2, max_image_bytes=50_000, max_image_pixels=1_000_000)
    payload = body()
    if isinstance(payload, bytes):
        response = await worker.post(CHAT, data=payload, headers={"Content-Type": "application/json"})
    else:
        response = await worker.post(CHAT, json=payload)
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith("application/json")
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code
    assert "Traceback" not in error["message"]
    assert (await answer(worker, _TEXT))["usage"]["completion_tokens"] == 2


async def test_unknown_route_and_method_are_json_errors(worker: TestClient) -> None:
    missing = await worker.get("/v1/nothing")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"
    wrong = await worker.get(CHAT)
    assert wrong.status == 405 and (await wrong.json())["error"]["code"] == "method_not_allowed"


# ---------------------------------------------------------------------------- load, time, disconnects


async def _start_long_stream(worker: TestClient, ask: Ask, question: str = "hello") -> ClientResponse:
    """A streamed answer of 400 tokens (4 s and more with slow_decoding); returns once its first bytes arrived."""
    response = await worker.post(CHAT, json=ask(question, max_tokens=400, stream=True))
    assert response.status == 200
    await response.content.readline()
    return response


async def test_health_answers_while_a_long_generate_runs(
    worker: TestClient, ask: Ask, slow_decoding: None
) -> None:
    long = await _start_long_stream(worker, ask)
    started = time.monotonic()
    health = await (await worker.get("/health")).json()
    assert time.monotonic() - started < 2.0  # it did not wait for the 400-token answer (in_flight below)
    assert health["status"] == "ok" and health["in_flight"] == 1 and health["queue_depth"] == 0
    assert health["model"] == health["base_model"] and health["adapter"] is None
    long.close()


async def test_queue_full_is_429_with_retry_after(make_worker: Any, ask: Ask, slow_decoding: None) -> None:
    worker = await make_worker(max_queue=1, max_batch=1)
    long = await _start_long_stream(worker, ask)
    queued = asyncio.create_task(answer(worker, ask("one", max_tokens=2)))

    async def one_waiting() -> bool:
        return (await (await worker.get("/health")).json())["queue_depth"] == 1

    await wait_for(one_waiting)
    refused = await worker.post(CHAT, json=ask("two", max_tokens=2))
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await refused.json())["error"]["code"] == "queue_full"
    long.close()  # frees the batch: the queued request runs next
    assert (await queued)["usage"]["completion_tokens"] == 2
    assert (
        metric(
            await metrics_text(worker), 'smolcord_requests_total{route="/v1/chat/completions",status="429"}'
        )
        == 1
    )


async def test_requests_past_the_deadline_get_504_queued_or_generating(
    make_worker: Any, ask: Ask, slow_decoding: None
) -> None:
    worker = await make_worker(request_timeout_s=0.6, max_batch=1)
    started = time.monotonic()
    generating, queued = await asyncio.gather(
        worker.post(CHAT, json=ask("hello", max_tokens=400)),
        worker.post(CHAT, json=ask("one", max_tokens=400)),
    )
    assert time.monotonic() - started < 5
    for response in (generating, queued):
        assert response.status == 504
        assert (await response.json())["error"] == {
            "message": (await response.json())["error"]["message"],
            "type": "timeout_error",
            "code": "timeout",
        }
    assert (await answer(worker, ask("hello", max_tokens=2)))["usage"]["completion_tokens"] == 2


async def test_a_stream_past_its_deadline_ends_with_an_error_event(
    make_worker: Any, ask: Ask, slow_decoding: None
) -> None:
    worker = await make_worker(request_timeout_s=1.0)
    response = await worker.post(CHAT, json=ask("hello", max_tokens=400, stream=True))
    assert response.status == 200
    events = await sse_events(response)
    assert events[-1]["error"]["code"] == "timeout"
    assert "[DONE]" not in events
    text = await metrics_text(worker)
    assert metric(text, 'smolcord_requests_total{route="/v1/chat/completions",status="504"}') == 1


async def test_client_leaving_mid_stream_cancels_only_its_row(
    make_worker: Any, ask: Ask, slow_decoding: None
) -> None:
    worker = await make_worker(batch_wait_ms=300)
    leaving, *staying = await asyncio.gather(
        worker.post(CHAT, json=ask("hello", max_tokens=400, stream=True)),
        worker.post(CHAT, json=ask("one", max_tokens=40, stream=True)),
        worker.post(CHAT, json=ask("two", max_tokens=40, stream=True)),
    )
    await leaving.content.readline()
    leaving.close()
    for response in staying:
        events = await sse_events(response)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"

    async def cancelled() -> bool:
        return 'smolcord_completions_finished_total{reason="cancelled"}' in await metrics_text(worker)

    await wait_for(cancelled)
    text = await batches_done(worker, 1)
    assert metric(text, 'smolcord_completions_finished_total{reason="cancelled"}') == 1
    assert metric(text, 'smolcord_completions_finished_total{reason="length"}') == 2
    # The leaving row stopped long before its 400 tokens.
    assert metric(text, "smolcord_completion_tokens_total") < 80 + 100
    assert metric(text, "smolcord_batch_size_count") == 1


# ---------------------------------------------------------------------------- models, health, metrics


async def test_models_lists_the_served_model_and_its_context(worker: TestClient, engine: Engine) -> None:
    body = await (await worker.get("/v1/models")).json()
    (model,) = body["data"]
    assert model["id"] == engine.name and model["object"] == "model"
    assert model["max_model_len"] == 2048  # the tiny model's text config


async def test_metrics_count_requests_tokens_and_batches(worker: TestClient, ask: Ask) -> None:
    await answer(worker, ask("hello", max_tokens=3))
    await worker.post(CHAT, data=b"nope")
    text = await batches_done(worker, 1)
    assert metric(text, 'smolcord_requests_total{route="/v1/chat/completions",status="200"}') == 1
    assert metric(text, 'smolcord_requests_total{route="/v1/chat/completions",status="400"}') == 1
    assert metric(text, "smolcord_completion_tokens_total") == 3
    assert metric(text, "smolcord_prompt_tokens_total") > 0
    assert metric(text, "smolcord_request_latency_seconds_count") == 1  # answers only, not refusals
    assert metric(text, "smolcord_batch_size_count") == 1
    assert metric(text, "smolcord_queue_depth") == 0
    assert metric(text, 'smolcord_adapter_info{version="base"}') == 1
