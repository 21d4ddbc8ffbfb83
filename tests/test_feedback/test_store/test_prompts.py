"""Recording prompts with their images and history, reading them back; a refused prompt writes nothing."""

import pytest
from test_feedback.harness import CHANNEL, GUILD, make_image, png_bytes

from feedback.store import consent as consent_service
from feedback.store import prompts as prompts_service
from feedback.store.errors import (
    ImageTooLarge,
    InvalidHistory,
    InvalidImage,
)
from feedback.store.models import Image, Prompt, PromptImage
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
