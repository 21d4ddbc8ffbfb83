"""Recording prompts, answers and votes; lookups; deleting messages; bad data leaves nothing behind."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from test_feedback.harness import CHANNEL, GUILD, ROLE, make_image, png_bytes

from feedback.store import consent as consent_service
from feedback.store import deletion as deletion_service
from feedback.store import prompts as prompts_service
from feedback.store import reactions as reactions_service
from feedback.store import responses as responses_service
from feedback.store.errors import (
    AlreadyRecorded,
    ImageTooLarge,
    InvalidHistory,
    InvalidImage,
    NotAVote,
    UnknownPrompt,
    UnknownResponse,
)
from feedback.store.models import Image, Prompt, PromptImage, Reaction, Response, ResponseMessage
from feedback.store.votes import action_of, vote_value
from smolcord.images import image_path


async def test_prompt_images_are_stored_once_by_hash(store, settings):
    await store.learning()
    first = await store.prompt(images=[make_image(1), make_image(2)])
    second = await store.prompt("and this?", images=[make_image(1)])
    assert first.trainable and second.trainable
    assert await store.count(Image) == 2
    assert first.images[0].sha256 == second.images[0].sha256
    path = image_path(settings.images_dir, first.images[0].sha256, ".png")
    assert path.read_bytes() == make_image(1).data
    files = sorted(p.name for p in settings.images_dir.rglob("*") if p.is_file())
    assert len(files) == 2 and not any(name.startswith(".tmp") for name in files)


async def test_raw_bytes_are_normalised_before_storing(store):
    recorded = await store.prompt(images=[png_bytes(5)])
    assert recorded.images[0].sha256 == make_image(5).sha256


async def test_snowflakes_survive_and_dms_are_never_trainable(store):
    await store.learning()
    dm = await store.prompt(guild_id=None)
    assert not dm.trainable
    async with store.sessions() as session:
        prompt = await prompts_service.get_prompt(session, settings=store.settings, prompt_id=dm.id)
    assert prompt.guild_id is None and prompt.channel_id == CHANNEL
    guild = await store.prompt()
    async with store.sessions() as session:
        assert (
            await prompts_service.get_prompt(session, settings=store.settings, prompt_id=guild.id)
        ).guild_id == GUILD


async def test_trainable_needs_learning_on_and_no_opt_out(store):
    assert not (await store.prompt()).trainable  # learning_default is off
    await store.learning()
    assert (await store.prompt()).trainable
    await store.call(consent_service.opt_out, user_id=42)
    assert not (await store.prompt()).trainable


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


async def test_conversation_and_follow_up(store, settings):
    first = await store.prompt("what is this?", images=[make_image(1)])
    response_id, messages = await store.answer(first.id, "a cat")
    conversation = await store.call(
        prompts_service.get_conversation, settings=settings, message_id=messages[0]
    )
    assert conversation.parent_response_id == response_id
    assert conversation.turns == [
        {
            "role": "user",
            "content": "what is this?",
            "images": [make_image(1).sha256],
            "source_prompt_id": first.id,
        },
        {"role": "assistant", "content": "a cat", "source_response_id": response_id},
    ]
    assert conversation.images[make_image(1).sha256].path.is_file()
    follow = await store.prompt(
        "what colour?", images=[], history=conversation.turns, parent_response_id=response_id
    )
    view = await store.call(prompts_service.get_prompt, settings=settings, prompt_id=follow.id)
    assert view.parent_response_id == response_id
    assert [i.in_history for i in view.images] == [True] and view.own_images == ()
    assert follow.key != first.key
    assert (
        await store.call(prompts_service.get_conversation, settings=settings, message_id=store.new_id())
        is None
    )


async def test_regeneration_count(store):
    prompt = await store.prompt()
    await store.answer(prompt.id, "a")
    await store.answer(prompt.id, "b", regenerated=True, requested_by=7)
    await store.answer(prompt.id, "c", regenerated=True, requested_by=7)
    async with store.sessions() as session:
        since = datetime.now(UTC) - timedelta(hours=1)
        assert await responses_service.count_regenerations(session, user_id=7, since=since) == 2


async def test_reactions_are_state_per_user_and_emoji(store):
    prompt = await store.prompt()
    _response_id, [message] = await store.answer(prompt.id, "a cat")
    assert await store.vote(message, 1, "👍")
    assert await store.vote(message, 1, "👍")  # repeated: still one row
    assert await store.vote(message, 1, "👍🏽")  # another reaction on Discord, same vote
    assert await store.vote(message, 2, "👎")
    assert await store.count(Reaction) == 3
    assert await store.call(reactions_service.clear_reaction, message_id=message, user_id=1, emoji="👍🏽")
    assert not await store.call(reactions_service.clear_reaction, message_id=message, user_id=1, emoji="👍🏽")
    assert await store.call(reactions_service.clear_message_reactions, message_id=message, emoji="👎") == 1
    assert await store.call(reactions_service.clear_message_reactions, message_id=message, emoji="🔁") == 0
    assert await store.call(reactions_service.clear_message_reactions, message_id=message) == 1
    assert await store.count(Reaction) == 0
    assert not await store.call(
        reactions_service.clear_reaction, message_id=store.new_id(), user_id=1, emoji="👍"
    )


async def test_voter_eligibility_is_recorded_at_vote_time(store, settings):
    prompt = await store.prompt()
    _, [message] = await store.answer(prompt.id, "a cat")
    await store.vote(message, 1, "👍", roles=[ROLE])
    await store.call(consent_service.set_voter_role, settings=settings, guild_id=GUILD, role_id=ROLE)
    await store.vote(message, 2, "👍", roles=[ROLE, 5])
    await store.vote(message, 3, "👍", roles=[5])
    await store.vote(message, 4, "👍")  # roles unknown
    rows = await store.sql("SELECT user_id, voter_role_id, holds_voter_role FROM reactions ORDER BY user_id")
    assert [(u, r, bool(h)) for u, r, h in rows] == [
        (1, None, False),
        (2, ROLE, True),
        (3, ROLE, False),
        (4, ROLE, False),
    ]


def test_votes_and_actions():
    assert vote_value("👍") == 1 and vote_value("👎🏿") == -1 and vote_value("🔁") is None
    assert action_of("🔁") == "regenerate" and action_of("🗑️") == "delete" and action_of("👍") is None


# ---------------------------------------------------------------------------------- bad data


async def test_unknown_response_is_refused(store):
    with pytest.raises(UnknownResponse):
        await store.vote(store.new_id(), 1, "👍")
    assert await store.count(Reaction) == 0


@pytest.mark.parametrize("emoji", ["🔁", "🗑️", "❤️", "<:custom:123>"])
async def test_not_a_vote_is_refused(store, emoji):
    prompt = await store.prompt()
    _, [message] = await store.answer(prompt.id, "a cat")
    with pytest.raises(NotAVote):
        await store.vote(message, 1, emoji)
    with pytest.raises(NotAVote):
        await store.call(reactions_service.clear_reaction, message_id=message, user_id=1, emoji=emoji)
    assert await store.count(Reaction) == 0


async def _nothing_written(store):
    assert await store.count(Prompt) == 0
    assert await store.count(Image) == 0
    assert await store.count(PromptImage) == 0
    assert not store.settings.images_dir.exists() or not any(store.settings.images_dir.rglob("*.*"))


async def test_oversized_image_is_refused_and_nothing_written(store, settings):
    too_many_bytes = settings.model_copy(update={"max_image_bytes": 50})
    store.settings = too_many_bytes
    with pytest.raises(ImageTooLarge) as info:
        await store.prompt(images=[make_image(1), make_image(2)])
    assert info.value.code == "too_large"
    with pytest.raises(ImageTooLarge):
        await store.prompt(images=[png_bytes(3)])  # raw bytes: refused by normalisation
    store.settings = settings.model_copy(update={"max_image_edge": 16})
    with pytest.raises(ImageTooLarge):
        await store.prompt(images=[make_image(4, size=(40, 20))])
    await _nothing_written(store)


async def test_bad_images_and_history_are_refused(store):
    good = make_image(1)
    forged = type(good)(good.data, "0" * 64, good.width, good.height, good.mime)
    with pytest.raises(InvalidImage):
        await store.prompt(images=[forged])
    with pytest.raises(InvalidImage):
        await store.prompt(images=[b"not an image"])
    with pytest.raises(InvalidImage):
        await store.prompt(images=[make_image(i) for i in range(5)])  # SMOLCORD_MAX_IMAGES is 4
    with pytest.raises(InvalidHistory):
        await store.prompt(history=[{"role": "system", "content": "x"}])
    with pytest.raises(InvalidHistory):  # an image the store never saw
        await store.prompt(history=[{"role": "user", "content": "x", "images": ["a" * 64]}])
    await _nothing_written(store)


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


async def test_a_session_with_a_transaction_open_is_refused(store):
    async with store.sessions() as session:
        await session.execute(select(1))
        with pytest.raises(RuntimeError, match="one transaction each"):
            await consent_service.opt_out(session, user_id=1)


# ---------------------------------------------------------------------------------- deleting


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
