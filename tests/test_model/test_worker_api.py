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

    # Recorded once a batch's busy period ends, just after its answers go out: a request sent the
    # moment the previous answer arrived may still join that period, so count requests, not periods.
    async def all_recorded() -> bool:
        return metric(await metrics_text(worker), "smolcord_batch_size_sum") >= 8

    await wait_for(all_recorded, within=30)
    text = await metrics_text(worker)
    assert metric(text, "smolcord_batch_size_sum") == 8  # four alone, then four together
    periods = metric(text, "smolcord_batch_size_count")
    singles = metric(text, 'smolcord_batch_size_bucket{le="1.0"}')
    assert periods <= 5 and singles < periods, text  # the four sent together shared a batch


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
    ("max_tokens not a number", lambda: _TEXT | {"max_tokens": "many"}, 400, "invalid_value"),
    ("max_tokens negative", lambda: _TEXT | {"max_tokens": -1}, 400, "invalid_value"),
    ("temperature out of range", lambda: _TEXT | {"temperature": 9}, 400, "invalid_value"),
    ("seed over 64 bits", lambda: _TEXT | {"seed": 2**64}, 400, "invalid_value"),
    ("stop: five strings", lambda: _TEXT | {"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value"),
    ("stop: not a string", lambda: _TEXT | {"stop": [3]}, 400, "invalid_value"),
    ("stop: empty", lambda: _TEXT | {"stop": ""}, 400, "invalid_value"),
    ("deeply nested JSON", lambda: b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    (
        "deeply nested field",
        lambda: b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"{" * 200_000,
        400,
        "invalid_json",
    ),
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


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", 2**64), ("temperature", 9), ("top_p", 0), ("max_tokens", 0), ("stop", ["a"] * 5)],
)
async def test_a_refusal_names_the_field(worker: TestClient, field: str, value: Any) -> None:
    response = await worker.post(CHAT, json=_TEXT | {field: value})
    assert response.status == 400
    assert field in (await response.json())["error"]["message"]


async def test_one_bad_row_never_fails_its_batch(make_worker: Any, ask: Ask) -> None:
    worker = await make_worker(batch_wait_ms=300)
    normal = ask("hello", max_tokens=8)
    alone = await text_of(worker, normal)
    # Each of these used to fail the whole batch with 500: torch refuses a 64-bit seed, and logits
    # divided by 1e-45 overflow to NaN. Now the seed is refused up front, the temperature is greedy.
    beside, big_seed, tiny_temperature = await asyncio.gather(
        worker.post(CHAT, json=normal),
        worker.post(CHAT, json=ask("one", max_tokens=8, temperature=1.0, seed=2**64)),
        worker.post(CHAT, json=ask("one", max_tokens=8, temperature=1e-45)),
    )
    assert beside.status == 200 and (await beside.json())["choices"][0]["message"]["content"] == alone
    assert big_seed.status == 400 and "seed" in (await big_seed.json())["error"]["message"]
    assert tiny_temperature.status == 200
    greedy = await text_of(worker, ask("one", max_tokens=8, temperature=0))
    assert (await tiny_temperature.json())["choices"][0]["message"]["content"] == greedy


async def test_max_tokens_above_the_cap_is_clamped(make_worker: Any, ask: Ask) -> None:
    worker = await make_worker(max_tokens=5)
    body = await answer(worker, ask("hello", max_tokens=100_000))
    assert body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"
    streamed = await worker.post(
        CHAT, json=ask("hello", max_completion_tokens=10**9, max_tokens=None, stream=True)
    )
    events = await sse_events(streamed)
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "length"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == body["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------- stop strings


async def _streamed(worker: TestClient, body: dict[str, Any]) -> tuple[list[str], str | None]:
    """The content deltas of a streamed answer and its finish_reason."""
    response = await worker.post(CHAT, json=body | {"stream": True})
    assert response.status == 200, await response.text()
    events = await sse_events(response)
    assert events[-1] == "[DONE]"
    choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
    deltas = [c["delta"]["content"] for c in choices if c["delta"].get("content")]
    return deltas, choices[-1]["finish_reason"]


async def test_stop_ends_the_text_before_the_first_occurrence_streamed_or_not(
    worker: TestClient, ask: Ask
) -> None:
    body = ask("Describe the picture.", max_tokens=40)
    deltas, _ = await _streamed(worker, body)
    full = "".join(deltas)
    assert len(deltas) > 5, deltas
    # A stop string whose first occurrence spans two streamed deltas: its start must be held back.
    cases = []
    for i in range(1, len(deltas) - 1):
        stop = deltas[i][-1] + deltas[i + 1][0]
        if full.find(stop) == len("".join(deltas[: i + 1])) - 1:
            cases.append(stop)
    assert cases, deltas
    tail = full[-3:]
    for stop in [cases[0], [tail, cases[-1]], ["not in it at all"]]:
        stops = [stop] if isinstance(stop, str) else stop
        found = [full.find(s) for s in stops if full.find(s) >= 0]
        expected = full[: min(found)] if found else full
        plain = await answer(worker, body | {"stop": stop})
        streamed, finish = await _streamed(worker, body | {"stop": stop})
        assert plain["choices"][0]["message"]["content"] == "".join(streamed) == expected, stop
        assert plain["choices"][0]["finish_reason"] == finish == ("stop" if found else "length")
        assert not any(s in d for s in stops for d in streamed)


# ---------------------------------------------------------------------------- images in history


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


async def test_history_images_beyond_the_cap_are_dropped_oldest_first(
    make_worker: Any, image_url: ImageUrl
) -> None:
    """Clients that re-send a conversation (llmcord) re-send its images: only the last message counts."""
    worker = await make_worker(max_images=4)
    a, b, c = (image_url(size, (200, 30, 30)) for size in ((300, 200), (250, 250), (40, 30)))
    d, e, f = (image_url((48, 32), colour) for colour in ((1, 2, 3), (90, 90, 9), (9, 90, 200)))

    def conversation(first: list[str]) -> dict[str, Any]:
        messages = [
            {"role": "user", "content": [*map(_image_part, first), {"type": "text", "text": "first"}]},
            {"role": "assistant", "content": "Three pictures."},
            {"role": "user", "content": [*map(_image_part, (d, e, f)), {"type": "text", "text": "second"}]},
        ]
        return {"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}

    resent = await answer(worker, conversation([a, b, c]))  # six images, four allowed: a and b go
    reference = await answer(worker, conversation([c]))
    assert resent["usage"] == reference["usage"]
    assert resent["choices"] == reference["choices"]

    too_many = conversation([])
    too_many["messages"][-1]["content"][:0] = [_image_part(a), _image_part(b)]  # five in the last message
    refused = await worker.post(CHAT, json=too_many)
    assert refused.status == 400 and (await refused.json())["error"]["code"] == "too_many_images"


async def test_history_images_the_context_cannot_hold_are_dropped(
    make_worker: Any, engine: Engine, image_url: ImageUrl
) -> None:
    worker = await make_worker(max_images=4)
    sizes = [(300, 200), (250, 250), (200, 150)]
    long_text = " cat" * 1700
    messages = [
        {
            "role": "user",
            "content": [*(_image_part(image_url(s)) for s in sizes), {"type": "text", "text": long_text}],
        },
        {"role": "assistant", "content": "Cats."},
        {
            "role": "user",
            "content": [_image_part(image_url((48, 32))), {"type": "text", "text": "And here?"}],
        },
    ]

    def prompt_tokens(dropped: int) -> int:
        kept = [Image.new("RGB", s, (200, 30, 30)) for s in sizes[dropped:]]
        conversation = [
            {
                "role": "user",
                "content": [{"type": "image"}] * len(kept) + [{"type": "text", "text": long_text}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Cats."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And here?"}]},
        ]
        return engine.encode(conversation, [*kept, Image.new("RGB", (48, 32), (200, 30, 30))]).prompt_tokens

    assert prompt_tokens(0) >= engine.max_model_len  # all of it does not fit...
    dropped = next(n for n in range(1, 4) if prompt_tokens(n) < engine.max_model_len)
    body = await answer(worker, {"messages": messages, "max_tokens": 1, "temperature": 0})
    assert body["usage"]["prompt_tokens"] == prompt_tokens(dropped)  # ...without the oldest images it does


# ---------------------------------------------------------------------------- bodies


async def _raw_request(
    worker: TestClient, head: bytes, body: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(worker.host, worker.port)
    writer.write(head + b"\r\n" + body)
    await writer.drain()
    return reader, writer


def _head(length: int, **headers: str) -> bytes:
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: worker",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items()),
    ]
    return "".join(line + "\r\n" for line in lines).encode()


async def _status(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 10)
    return int(line.split()[1])


async def test_a_body_claiming_more_than_the_limit_is_refused_unread(make_worker: Any) -> None:
    worker = await make_worker()
    reader, writer = await _raw_request(worker, _head(10**9), b'{"messages": ')  # the rest never comes
    assert await _status(reader) == 413
    writer.close()
    assert (await answer(worker, _TEXT))["usage"]["completion_tokens"] == 2


async def test_bodies_read_at_once_share_a_byte_budget(make_worker: Any) -> None:
    from model.keys import bodies_key

    worker = await make_worker(max_images=1, max_image_bytes=100_000, body_budget=0)
    bodies = worker.app[bodies_key]
    size = bodies.budget * 2 // 3  # two of them do not fit in the budget at once
    _, slow_writer = await _raw_request(worker, _head(size), b'{"messages": [')  # and then nothing

    async def held() -> bool:
        return bodies.held == size

    await wait_for(held)
    reader, writer = await _raw_request(worker, _head(size))
    assert await _status(reader) == 429
    assert b"Retry-After: 1" in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()

    slow_writer.close()  # the first client goes: its bytes are given back

    async def released() -> bool:
        return bodies.held == 0

    await wait_for(released)
    padded = json.dumps(_TEXT | {"padding": "x" * (size - 200)}).encode()
    assert (await answer(worker, json.loads(padded)))["usage"]["completion_tokens"] == 2
    assert bodies.held == 0


async def test_with_a_token_every_route_but_health_and_metrics_needs_it(make_worker: Any) -> None:
    worker = await make_worker(worker_token="s3cret")
    for method, path in (("POST", CHAT), ("GET", "/v1/models"), ("GET", "/v1/nothing")):
        missing = await worker.request(method, path, json=_TEXT)
        assert missing.status == 401, path
        assert (await missing.json())["error"]["code"] == "unauthorized"
        wrong = await worker.request(method, path, json=_TEXT, headers={"Authorization": "Bearer nope"})
        assert wrong.status == 403, path
    for path in ("/health", "/metrics"):
        assert (await worker.get(path)).status == 200
    authorized = {"Authorization": "Bearer s3cret"}
    assert (await worker.get("/v1/models", headers=authorized)).status == 200
    response = await worker.post(CHAT, json=_TEXT, headers=authorized)
    assert response.status == 200
    # Refused before any of its body is read: a stranger cannot make the worker buffer anything.
    reader, writer = await _raw_request(worker, _head(10**8), b"{")
    assert await _status(reader) == 401
    writer.close()


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
