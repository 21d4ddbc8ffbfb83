"""Property-based fuzzing of /v1/chat/completions through the real app: every body gets a JSON 4xx or a valid 200.

Bodies are drawn in three layers: any JSON at all, chat-shaped bodies whose fields take any JSON
(and the edge values that broke batches before: 64-bit seeds, denormal temperatures, NaN), and raw
bytes (truncated, deeply nested, not UTF-8). After each one the worker must still answer.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolcord.settings import Settings

CHAT = "/v1/chat/completions"
# Inputs the last run tried, by test (reported in the robustness table of docs/benchmarks.md).
TRIED: dict[str, int] = {}

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, -1, 2**63, 2**64, 1e-45, 5e-324, 1e308, 0.5, 2.0000001])
    | st.text(max_size=40)
)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)
_image_urls = st.sampled_from(
    [
        "data:image/png;base64,",
        "data:image/png;base64,@@@",
        "data:,",
        "data:image/gif;base64,R0lGODlhAQABAAAAACw=",  # a truncated GIF
        "https://example.com/x.png",
        "",
    ]
)
_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=60) | _json}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _image_urls})}
    ),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": _json}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), _json, max_size=3),
)
_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]) | _json,
            "content": st.text(max_size=80) | st.lists(_parts, max_size=3) | _json,
        }
    ),
    min_size=0,
    max_size=4,
)
_fields = {
    "max_tokens": st.integers(min_value=-5, max_value=2**65) | _json,
    "max_completion_tokens": st.integers(min_value=-5, max_value=10**6) | _json,
    "temperature": st.floats(min_value=0, max_value=2) | _json,
    "top_p": st.floats(min_value=0, max_value=1) | _json,
    "seed": st.integers(min_value=-(2**66), max_value=2**66) | _json,
    "stop": st.text(max_size=6) | st.lists(st.text(max_size=4), max_size=6) | _json,
    "stream": st.booleans() | _json,
    "stream_options": st.fixed_dictionaries({"include_usage": _json}) | _json,
    "n": st.sampled_from([1, 2, None]) | _json,
    "ignore_eos": st.booleans() | _json,
    "model": _json,
}
_chat_bodies = st.fixed_dictionaries(
    {"messages": _messages}, optional={name: strategy for name, strategy in _fields.items()}
)
# Mostly valid: what reaches sampling, stopping and streaming, with values at and past their edges.
_plausible_bodies = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=40)}
            ),
            min_size=1,
            max_size=2,
        ).map(lambda messages: [*messages, {"role": "user", "content": "hi"}]),
    },
    optional={
        "max_tokens": st.integers(min_value=1, max_value=10**6),
        "temperature": st.floats(min_value=0, max_value=2),
        "top_p": st.floats(min_value=0, max_value=1, exclude_min=True),
        "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "stop": st.text(min_size=1, max_size=5)
        | st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=4),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "ignore_eos": st.booleans(),
    },
)
_raw = st.one_of(
    st.binary(max_size=200),
    st.integers(min_value=1, max_value=50_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(min_value=1, max_value=50_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    _chat_bodies.map(lambda body: json.dumps(body, allow_nan=True).encode()).flatmap(
        lambda data: st.integers(min_value=0, max_value=len(data)).map(lambda cut: data[:cut])
    ),
)


@pytest.fixture
def fuzz_worker(engine: Any, make_settings: Callable[..., Settings]) -> Iterator[tuple[Any, TestClient]]:
    """A worker on its own loop (hypothesis runs examples synchronously): short answers, small images."""
    from model.app import init_app

    loop = asyncio.new_event_loop()
    settings_ = make_settings(max_tokens=3, max_images=2, max_image_bytes=50_000, batch_wait_ms=20)

    async def start() -> TestClient:
        client = TestClient(TestServer(await init_app(settings_, engine=engine)))
        await client.start_server()
        return client

    client = loop.run_until_complete(start())
    try:
        yield loop, client
    finally:
        loop.run_until_complete(client.close())
        loop.close()


async def _check(client: TestClient, data: bytes) -> int:
    response = await client.post(CHAT, data=data, headers={"Content-Type": "application/json"})
    status = response.status
    assert status == 200 or 400 <= status < 500, (status, await response.text())
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        assert status == 200
        events = [line[6:].strip() async for line in response.content if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]" or b'"error"' in events[-1], events[-3:]
        for event in events[:-1]:
            chunk = json.loads(event)
            assert chunk["object"] == "chat.completion.chunk"
        if events[-1] != b"[DONE]":
            error = json.loads(events[-1])["error"]
            assert error["type"] != "server_error", error
        return status
    body = await response.json()
    if status == 200:
        (choice,) = body["choices"]
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in {"stop", "length"}
        assert body["usage"]["completion_tokens"] <= 3
    else:
        assert set(body["error"]) == {"message", "type", "code"}, body
    return status


def _still_answers(loop: Any, client: TestClient) -> None:
    async def ask() -> int:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}
        response = await client.post(CHAT, json=body)
        return response.status

    assert loop.run_until_complete(ask()) == 200


def _run(loop: Any, client: TestClient, data: bytes, name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1
    if loop.run_until_complete(_check(client, data)) == 200:
        TRIED[f"{name} answered"] = TRIED.get(f"{name} answered", 0) + 1


def test_any_json_body_gets_a_json_4xx_or_a_valid_answer(
    fuzz_worker: tuple[Any, TestClient], record_property: Callable[[str, object], None]
) -> None:
    loop, client = fuzz_worker

    @settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(body=_json | _chat_bodies | _plausible_bodies)
    def check(body: Any) -> None:
        _run(loop, client, json.dumps(body, allow_nan=True).encode(), "json")

    check()
    _still_answers(loop, client)
    record_property("inputs_tried", TRIED["json"])
    print(
        f"\nworker fuzz (JSON bodies): {TRIED['json']} inputs, {TRIED.get('json answered', 0)} answered 200"
    )


def test_any_bytes_get_a_json_4xx_or_a_valid_answer(
    fuzz_worker: tuple[Any, TestClient], record_property: Callable[[str, object], None]
) -> None:
    loop, client = fuzz_worker

    @settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=_raw)
    def check(data: bytes) -> None:
        _run(loop, client, data, "bytes")

    check()
    _still_answers(loop, client)
    record_property("inputs_tried", TRIED["bytes"])
    print(
        f"\nworker fuzz (raw bodies): {TRIED['bytes']} inputs, {TRIED.get('bytes answered', 0)} answered 200"
    )


def test_edge_values_batched_together_never_fail_a_neighbour(fuzz_worker: tuple[Any, TestClient]) -> None:
    """Values that once failed a whole batch, each sent beside a normal request in one batch."""
    loop, client = fuzz_worker
    normal = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "temperature": 0}
    edges: list[dict[str, Any]] = [
        {"seed": 2**64},
        {"seed": -(2**63)},
        {"seed": 2**63 - 1},
        {"temperature": 1e-45},
        {"temperature": 5e-324},
        {"temperature": 2.0, "top_p": 1e-300},
        {"temperature": math.nextafter(0, 1)},
        {"stop": ["\n", " ", "e", "a"]},
        {"stop": "x" * 256},
    ]

    async def pair(edge: dict[str, Any]) -> None:
        beside, edged = await asyncio.gather(
            client.post(CHAT, json=normal),
            client.post(CHAT, data=json.dumps(normal | {"temperature": 1.0} | edge).encode()),
        )
        assert beside.status == 200, (edge, await beside.text())
        assert edged.status in (200, 400), (edge, await edged.text())

    for edge in edges:
        loop.run_until_complete(pair(edge))
    _still_answers(loop, client)
