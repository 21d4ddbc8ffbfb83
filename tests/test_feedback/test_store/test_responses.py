"""Recording answers with their Discord messages, looking them up; duplicates write nothing."""

from datetime import UTC, datetime, timedelta

import pytest
from test_feedback.harness import GUILD, make_image

from feedback.store import responses as responses_service
from feedback.store.errors import (
    AlreadyRecorded,
    UnknownPrompt,
    UnknownResponse,
)
from feedback.store.models import Image, Prompt, Response, ResponseMessage


async def test_response_lookup_by_any_chunk_and_added_messages(store):
    prompt = await store.prompt()
    response_id, messages = await store.answer(
        prompt.id,
        "a cat",
        chunks=2,
        adapter_version="v3",
        sampling={"temperature": 0.0},
        latency_ms=12.5,
        prompt_tokens=80,
        completion_tokens=3,
        requested_by=42,
    )
    late = store.new_id()
    await store.call(
        responses_service.add_response_messages, response_id=response_id, message_ids=[messages[1], late]
    )
    for message_id in [*messages, late]:
        view = await store.call(responses_service.find_response, message_id=message_id)
        assert view.id == response_id
    assert view.message_ids == (*messages, late)
    assert view.adapter_version == "v3" and view.sampling == {"temperature": 0.0}
    assert view.prompt_author_id == 42 and view.guild_id == GUILD
    assert await store.call(responses_service.find_response, message_id=store.new_id()) is None
    with pytest.raises(AlreadyRecorded):  # a chunk of another response
        await store.call(responses_service.record_response, prompt_id=prompt.id, text="x", message_ids=[late])
    assert await store.count(Response) == 1
    with pytest.raises(UnknownResponse):
        await store.call(
            responses_service.add_response_messages, response_id=10**9, message_ids=[store.new_id()]
        )


async def test_regeneration_count(store):
    prompt = await store.prompt()
    await store.answer(prompt.id, "a")
    await store.answer(prompt.id, "b", regenerated=True, requested_by=7)
    await store.answer(prompt.id, "c", regenerated=True, requested_by=7)
    async with store.sessions() as session:
        since = datetime.now(UTC) - timedelta(hours=1)
        assert await responses_service.count_regenerations(session, user_id=7, since=since) == 2


async def test_unknown_prompt_and_duplicates_write_nothing(store):
    with pytest.raises(UnknownPrompt):
        await store.answer(10**9, "orphan")
    assert await store.count(Response) == 0 and await store.count(ResponseMessage) == 0
    prompt = await store.prompt(message_id=77)
    with pytest.raises(AlreadyRecorded):
        await store.prompt(message_id=77, images=[make_image(9)])
    with pytest.raises(AlreadyRecorded):
        await store.call(responses_service.record_response, prompt_id=prompt.id, text="x", message_ids=[77])
    assert await store.count(Prompt) == 1 and await store.count(Response) == 0
    assert await store.count(Image) == 1  # image 9 was never written
