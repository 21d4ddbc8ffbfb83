"""The official openai client against the worker listening on a loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import openai
import pytest
from openai import AsyncOpenAI


@pytest.fixture
async def client(live_worker: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=f"{live_worker}/v1", api_key="unused", max_retries=0, timeout=60
    ) as client:
        yield client


async def test_models_list(client: AsyncOpenAI) -> None:
    models = await client.models.list()
    (model,) = models.data
    assert model.object == "model"
    assert model.model_extra is not None and model.model_extra["max_model_len"] == 2048


async def test_chat_with_an_image(client: AsyncOpenAI, image_url: Callable[..., str]) -> None:
    model = (await client.models.list()).data[0].id
    completion = await client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url()}},
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},  # vLLM's extension: exactly max_tokens
    )
    assert completion.model == model
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 10


async def test_text_only_chat(client: AsyncOpenAI, stopping_prompt: str) -> None:
    completion = await client.chat.completions.create(
        model="whatever",  # the worker serves one model and ignores the name asked for
        messages=[{"role": "user", "content": stopping_prompt}],
        max_completion_tokens=30,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "stop"


async def test_streaming_with_usage(client: AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    exact = {"ignore_eos": True}
    plain = await client.chat.completions.create(
        model="m",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        extra_body=exact,
    )
    stream = await client.chat.completions.create(
        model="m",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=exact,
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == plain.choices[0].message.content
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 12 and usage == plain.usage


async def test_errors_reach_the_client_typed(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="m",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}],
                }
            ],
        )
    assert info.value.code == "unsupported_url"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2)
