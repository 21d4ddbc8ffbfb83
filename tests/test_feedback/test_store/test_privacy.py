"""Forget-me, opt-out and retention: what they remove, what they keep, and no orphan row or file."""

import os
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from test_feedback.harness import make_image

from feedback.store import consent as consent_service
from feedback.store import deletion as deletion_service
from feedback.store import runs as runs_service
from feedback.store.models import Image, OptedOutUser, Prompt, Reaction, Response, TrainingRunPair
from feedback.store.pairs import build_pairs


async def test_forget_me_removes_prompts_answers_votes_and_unshared_images(store, settings):
    await store.learning()
    forgotten, other = 66, 77
    # the user's own prompt, with an image only they used and one another prompt uses too
    mine = await store.prompt("mine", author_id=forgotten, images=[make_image(1), make_image(2)])
    mine_response, [mine_message] = await store.answer(mine.id, "answer to mine")
    await store.vote(mine_message, other, "👍")
    # someone else's prompt: the user's vote on it goes, the prompt and its answer stay
    theirs = await store.prompt("theirs", author_id=other, images=[make_image(2)])
    _their_good, [their_message] = await store.answer(theirs.id, "answer to theirs")
    their_bad, [their_bad_message] = await store.answer(
        theirs.id, "bad", regenerated=True, requested_by=forgotten
    )
    await store.vote(their_message, forgotten, "👍")
    await store.vote(their_message, other, "👍")
    await store.vote(their_bad_message, other, "👎")
    # a run recorded a pair with the user's answer
    async with store.sessions() as session:
        pairs = await build_pairs(session, settings=settings)
    async with store.sessions() as session:
        run_id = await runs_service.start_training_run(
            session, method="dpo", examples=pairs, heldout_fraction=0.2
        )
    assert await store.count(TrainingRunPair) == 1

    async with store.sessions() as session:
        deletion = await deletion_service.forget_user(session, settings=settings, user_id=forgotten)
    assert deletion.prompt_ids == (mine.id,) and deletion.response_ids == (mine_response,)
    assert deletion.images == (make_image(1).sha256,)
    assert deletion.reactions == 2
    assert await store.count(Prompt) == 1 and await store.count(Response) == 2
    assert await store.count(Image) == 1  # image 2 is still used by "theirs"
    assert await store.sql("SELECT user_id FROM reactions") == [(other,), (other,)]
    assert await store.sql("SELECT requested_by FROM responses WHERE id = :id", id=their_bad) == [(None,)]
    assert await store.orphans() == []
    assert (
        await store.call(runs_service.get_training_run, run_id=run_id)
    ).pairs == 1  # theirs: no vote of the user

    # recorded as forgotten: late events are ignored, and their prompts never train
    assert await store.call(consent_service.get_user_status, user_id=forgotten) == "forgotten"
    assert not await store.vote(their_message, forgotten, "👎")
    assert await store.count(Reaction) == 2
    assert not (await store.prompt("back again", author_id=forgotten)).trainable
    assert await store.call(consent_service.opt_out, user_id=forgotten) is False  # stays "forgotten"
    assert await store.call(consent_service.get_user_status, user_id=forgotten) == "forgotten"


async def test_forget_me_without_data_still_records_the_user(store, settings):
    deletion = await store.call(deletion_service.forget_user, settings=settings, user_id=5)
    assert deletion.nothing
    assert await store.count(OptedOutUser) == 1
    assert await store.call(consent_service.opt_in, user_id=5)
    assert await store.call(consent_service.get_user_status, user_id=5) is None


async def test_retention_purges_old_prompts_with_their_answers_votes_and_files(store, settings):
    old = await store.prompt("old", images=[make_image(1), make_image(2)])
    _, [old_message] = await store.answer(old.id, "old answer")
    await store.vote(old_message, 1, "👍")
    new = await store.prompt("new", images=[make_image(2), make_image(3)])
    _, [new_message] = await store.answer(new.id, "new answer")
    await store.vote(new_message, 1, "👎")
    long_ago = datetime.now(UTC) - timedelta(days=settings.retention_days + 1)
    async with store.sessions() as session, session.begin():
        await session.execute(update(Prompt).where(Prompt.id == old.id).values(created_at=long_ago))
    # a file a crash left behind, and a temp file of an interrupted write: swept when old enough
    stray = settings.images_dir / "ab" / ("ab" + "0" * 62 + ".png")
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"x")
    temp = settings.images_dir / "ab" / ".tmp-1-dead.png"
    temp.write_bytes(b"x")
    fresh_stray = settings.images_dir / "cd" / ("cd" + "0" * 62 + ".png")
    fresh_stray.parent.mkdir(parents=True, exist_ok=True)
    fresh_stray.write_bytes(b"x")  # young: may be a prompt being recorded right now
    two_hours_ago = time.time() - 7200
    os.utime(stray, (two_hours_ago, two_hours_ago))
    os.utime(temp, (two_hours_ago, two_hours_ago))

    async with store.sessions() as session:
        deletion = await deletion_service.purge_expired(session, settings=settings)
    assert deletion.prompt_ids == (old.id,)
    assert deletion.images == (make_image(1).sha256,)
    assert not stray.exists() and not temp.exists() and fresh_stray.exists()
    fresh_stray.unlink()
    assert await store.sql("SELECT question FROM prompts") == [("new",)]
    assert (
        await store.count(Response) == 1
        and await store.count(Reaction) == 1
        and await store.count(Image) == 2
    )
    assert await store.orphans() == []
    async with store.sessions() as session:  # nothing more to purge: idempotent
        assert (await deletion_service.purge_expired(session, settings=settings)).nothing
