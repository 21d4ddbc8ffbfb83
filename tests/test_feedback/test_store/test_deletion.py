"""Deleting messages: a question takes its answers, votes and follow-ups; late events are harmless."""

import pytest
from test_feedback.harness import make_image

from feedback.store import deletion as deletion_service
from feedback.store import prompts as prompts_service
from feedback.store import reactions as reactions_service
from feedback.store import responses as responses_service
from feedback.store.errors import (
    UnknownPrompt,
    UnknownResponse,
)
from feedback.store.models import Prompt, Reaction, Response


async def test_deleting_a_question_takes_its_answers_votes_and_follow_ups(store, settings):
    keep = await store.prompt("keep me", images=[make_image(1)])
    _keep_response, [keep_message] = await store.answer(keep.id, "kept")
    await store.vote(keep_message, 5, "👍")

    doomed = await store.prompt("delete me", images=[make_image(1), make_image(2)], message_id=555)
    response_id, messages = await store.answer(doomed.id, "gone", chunks=2)
    await store.vote(messages[0], 5, "👍")
    conversation = await store.call(
        prompts_service.get_conversation, settings=settings, message_id=messages[0]
    )
    follow = await store.prompt(
        "more?", images=[], history=conversation.turns, parent_response_id=response_id
    )
    await store.answer(follow.id, "follow-up answer")

    deletion = await store.call(deletion_service.delete_message, settings=settings, message_id=555)
    assert set(deletion.prompt_ids) == {doomed.id, follow.id}
    assert set(messages) <= set(deletion.message_ids)
    assert deletion.images == (make_image(2).sha256,)  # image 1 is still used by "keep me"
    assert (
        await store.count(Prompt) == 1
        and await store.count(Response) == 1
        and await store.count(Reaction) == 1
    )
    assert await store.orphans() == []
    assert await store.call(responses_service.find_response, message_id=keep_message) is not None


async def test_deleting_an_answer_takes_only_its_record(store, settings):
    prompt = await store.prompt()
    first, [_first_message] = await store.answer(prompt.id, "one")
    second, second_messages = await store.answer(prompt.id, "two", chunks=3)
    await store.vote(second_messages[2], 1, "👎")
    deletion = await store.call(
        deletion_service.delete_message, settings=settings, message_id=second_messages[2]
    )
    assert deletion.response_ids == (second,) and deletion.prompt_ids == ()
    assert deletion.message_ids == tuple(sorted(second_messages))
    assert await store.count(Response) == 1 and await store.count(Reaction) == 0
    assert await store.call(responses_service.find_response, message_id=second_messages[0]) is None
    assert (
        await store.call(deletion_service.delete_message, settings=settings, message_id=store.new_id())
    ).nothing
    await store.call(deletion_service.delete_response, settings=settings, response_id=first)
    assert await store.count(Response) == 0 and await store.count(Prompt) == 1
    assert await store.orphans() == []


async def test_late_events_after_deletion_are_harmless(store, settings):
    prompt = await store.prompt(message_id=999)
    _, [message] = await store.answer(prompt.id, "a cat")
    await store.call(deletion_service.delete_message, settings=settings, message_id=999)
    assert not await store.call(reactions_service.clear_reaction, message_id=message, user_id=1, emoji="👍")
    assert await store.call(reactions_service.clear_message_reactions, message_id=message) == 0
    with pytest.raises(UnknownResponse):
        await store.vote(message, 1, "👍")
    with pytest.raises(UnknownPrompt):
        await store.answer(prompt.id, "answer that arrived after the question was deleted")
