"""Quoted history: where each turn came from, who may train on it, and deletions that reach every copy."""

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from test_feedback.harness import CHANNEL, GUILD, make_image, sqlite_only

from feedback.store import consent as consent_service
from feedback.store import deletion as deletion_service
from feedback.store import prompts as prompts_service
from feedback.store.eligibility import eligible_prompt_ids
from feedback.store.errors import InvalidHistory, UnknownPrompt
from feedback.store.export import export
from feedback.store.models import GuildRemoval, GuildSettings, HistoryTurn, Image, Prompt, Response
from feedback.store.pairs import build_pairs, build_rated_answers, left_out

A, B, C = 101, 202, 303  # askers; voters below are 1 and 2


async def turns_of(store, prompt_id):
    return await store.sql(
        "SELECT position, source_prompt_id, source_response_id, author_id, guild_id FROM history_turns"
        " WHERE prompt_id = :id ORDER BY position",
        id=prompt_id,
    )


async def conversation(store, message_id):
    return await store.call(prompts_service.get_conversation, settings=store.settings, message_id=message_id)


async def follow_up(store, replied_to, question, author, **kwargs):
    """`author` replies to the message `replied_to` (a question or an answer), as the bot records it."""
    talk = await conversation(store, replied_to)
    return await store.prompt(
        question,
        author_id=author,
        history=talk.turns,
        parent_response_id=talk.parent_response_id,
        **kwargs,
    )


async def voted_answers(store, prompt_id, voters=(1, 2)):
    """A 👍 and a 👎 answer to a prompt: one pair."""
    _, [good] = await store.answer(prompt_id, f"good {prompt_id}")
    _, [bad] = await store.answer(prompt_id, f"bad {prompt_id}", regenerated=True)
    await store.vote(good, voters[0], "👍")
    await store.vote(bad, voters[1], "👎")


async def stored_text_anywhere(store, text):
    """Prompts whose question or stored history still holds `text`."""
    rows = await store.sql("SELECT id, question, history FROM prompts")
    return [row[0] for row in rows if text in row[1] or text in str(row[2])]


# ---------------------------------------------------------------------------------- provenance


async def test_replies_to_an_answer_and_to_a_question_record_where_each_turn_came_from(store):
    question_message = store.new_id()
    asked = await store.prompt(
        "A's question", author_id=A, message_id=question_message, images=[make_image(1)]
    )
    answer_id, [answer_message] = await store.answer(asked.id, "the answer")

    to_answer = await follow_up(store, answer_message, "B follows up", B, images=[])
    assert await turns_of(store, to_answer.id) == [
        (0, asked.id, None, A, GUILD),
        (1, asked.id, answer_id, A, GUILD),  # an answer is derived from A's question: A's words too
    ]
    # a reply to the question itself (no answer involved): provenance all the same
    to_question = await follow_up(store, question_message, "B on A's question", B, images=[])
    assert await turns_of(store, to_question.id) == [(0, asked.id, None, A, GUILD)]

    # further down the chain, C quoting B quoting A: every turn keeps its own author
    _, [b_answer] = await store.answer(to_answer.id, "answer to B")
    deeper = await follow_up(store, b_answer, "C goes on", C, images=[])
    assert [(row[0], row[3]) for row in await turns_of(store, deeper.id)] == [(0, A), (1, A), (2, B), (3, B)]


async def test_a_quoted_turn_must_be_what_its_source_said(store):
    question_message = store.new_id()
    asked = await store.prompt("A's question", author_id=A, message_id=question_message, images=[])
    talk_turns = (await conversation(store, (await store.answer(asked.id, "x"))[1][0])).turns
    forged = [dict(talk_turns[0], content="someone else's words"), talk_turns[1]]
    with pytest.raises(InvalidHistory):
        await store.prompt("q", author_id=B, history=forged)
    with pytest.raises(InvalidHistory):  # a user turn cannot name an answer as its source
        await store.prompt("q", author_id=B, history=[{**talk_turns[0], "source_response_id": 1}])
    await store.call(deletion_service.delete_message, settings=store.settings, message_id=question_message)
    with pytest.raises(UnknownPrompt):  # deleted meanwhile: its words are not stored again
        await store.prompt("q", author_id=B, history=talk_turns[:1])


# ---------------------------------------------------------------------------------- eligibility


async def test_a_quoted_author_who_opts_out_takes_the_follow_up_out_of_training(store, settings):
    await store.learning()
    asked = await store.prompt("A's question", author_id=A)
    _, [answer_message] = await store.answer(asked.id, "the answer")
    follow = await follow_up(store, answer_message, "B follows up", B, images=[])
    await voted_answers(store, follow.id)
    async with store.sessions() as session:
        [pair] = await build_pairs(session, settings=settings)
    assert pair.prompt_id == follow.id and pair.history[0]["content"] == "A's question"

    await store.call(consent_service.opt_out, user_id=A)
    async with store.sessions() as session:
        assert await build_pairs(session, settings=settings) == []  # dropped whole, not truncated
        assert await build_rated_answers(session, settings=settings) == []
        assert (await left_out(session, settings=settings)).consent == 1
    async with store.sessions() as session:
        assert follow.id not in set(await session.scalars(eligible_prompt_ids(settings)))
    await store.call(consent_service.opt_in, user_id=A)
    async with store.sessions() as session:
        assert len(await build_pairs(session, settings=settings)) == 1


async def test_a_reply_to_a_question_asked_in_a_dm_or_without_consent_never_trains(store, settings):
    await store.learning()
    # the quoted question was recorded while learning was off in its server: not trainable
    await store.learning(enabled=False)
    early_message = store.new_id()
    await store.prompt("asked before learning", author_id=A, message_id=early_message)
    await store.learning(enabled=True)
    follow = await follow_up(store, early_message, "B replies to it", B, images=[])
    await voted_answers(store, follow.id)
    # a turn whose source is unknown (not given) keeps its prompt out too
    unknown = await store.prompt(
        "with a hand-made history", author_id=B, history=[{"role": "user", "content": "hi", "images": []}]
    )
    await voted_answers(store, unknown.id)
    # the control: a reply to a trainable question trains
    fine_message = store.new_id()
    fine = await store.prompt("asked with learning on", author_id=A, message_id=fine_message)
    fine_follow = await follow_up(store, fine_message, "B replies here", B, images=[])
    await voted_answers(store, fine_follow.id)
    async with store.sessions() as session:
        assert {pair.prompt_id for pair in await build_pairs(session, settings=settings)} == {fine_follow.id}
        eligible = set(await session.scalars(eligible_prompt_ids(settings)))
    assert eligible == {fine.id, fine_follow.id}


async def test_export_says_how_many_rows_it_left_out_and_why(store, settings, tmp_path):
    await store.learning()
    kept = await store.prompt("kept", author_id=A)
    await voted_answers(store, kept.id, voters=(5, 6))
    dm = await store.prompt("in a DM", author_id=A, guild_id=None)
    await voted_answers(store, dm.id)
    capped = settings.model_copy(update={"max_voter_share": 0.5})
    for n in range(2):  # voter 1 decides two pairs of three: the cap drops one
        extra = await store.prompt(f"another {n}", author_id=C)
        await voted_answers(store, extra.id, voters=(1, 7 + n))
    async with store.sessions() as session:
        report = await export(session, settings=capped, out=tmp_path / "pairs.jsonl")
    assert (report.rows, report.left_out_consent, report.left_out_voter_share) == (2, 1, 1)
    line = report.left_out_line()
    assert line is not None and "1 by consent" in line and "1 by the voter-share cap" in line


# ---------------------------------------------------------------------------------- deletion


async def test_deleting_a_question_deletes_every_reply_quoting_it_and_its_image_file(store, settings):
    question_message = store.new_id()
    asked = await store.prompt("A's secret", author_id=A, message_id=question_message, images=[make_image(1)])
    _, [answer_message] = await store.answer(asked.id, "the answer")
    to_question = await follow_up(store, question_message, "B on the question", B, images=[make_image(2)])
    to_answer = await follow_up(store, answer_message, "B on the answer", B, images=[])
    other = await store.prompt("unrelated", author_id=B, images=[make_image(3)])
    image_file = settings.images_dir / make_image(1).sha256[:2]
    assert any(image_file.iterdir())

    deletion = await store.call(
        deletion_service.delete_message, settings=settings, message_id=question_message
    )
    assert set(deletion.prompt_ids) == {asked.id, to_question.id, to_answer.id}
    assert await stored_text_anywhere(store, "A's secret") == []
    assert set(deletion.images) == {make_image(1).sha256, make_image(2).sha256}
    assert not list(settings.images_dir.glob(f"*/{make_image(1).sha256}*"))  # the file is gone from disk
    assert await store.sql("SELECT id FROM prompts") == [(other.id,)]
    assert await store.orphans() == []


async def test_forget_me_deletes_the_users_words_quoted_by_others_even_without_the_source(store, settings):
    question_message, again_message = store.new_id(), store.new_id()
    asked = await store.prompt("A's secret", author_id=A, images=[make_image(1)], message_id=question_message)
    _, [answer_message] = await store.answer(asked.id, "the answer")
    quoting = await follow_up(store, answer_message, "B follows up", B, images=[])
    on_question = await follow_up(store, question_message, "B on the question", B, images=[])
    # a copy whose source went some other way (a connection without the service): found by author
    orphaned_source = await store.prompt("A again", author_id=A, message_id=again_message)
    copy = await follow_up(store, again_message, "B quoting A again", B, images=[])
    async with store.sessions() as session, session.begin():
        await session.execute(
            update(HistoryTurn).where(HistoryTurn.prompt_id == copy.id).values(source_prompt_id=None)
        )
    mine = await store.prompt("B's own", author_id=B, images=[make_image(3)])

    deletion = await store.call(deletion_service.forget_user, settings=settings, user_id=A)
    assert set(deletion.prompt_ids) == {asked.id, quoting.id, on_question.id, orphaned_source.id, copy.id}
    assert await stored_text_anywhere(store, "A's secret") == []
    assert await stored_text_anywhere(store, "A again") == []
    assert not list(settings.images_dir.glob(f"*/{make_image(1).sha256}*"))
    assert await store.sql("SELECT id FROM prompts") == [(mine.id,)]
    assert await store.orphans() == []


async def test_retention_takes_newer_replies_quoting_an_expired_question(store, settings):
    await store.call(consent_service.opt_out, user_id=A)  # opted out: kept for the retention period only
    question_message = store.new_id()
    asked = await store.prompt(
        "A's old question", author_id=A, images=[make_image(1)], message_id=question_message
    )
    follow = await follow_up(store, question_message, "B's newer reply", B, images=[])
    fresh = await store.prompt("fresh", author_id=B)
    long_ago = datetime.now(UTC) - timedelta(days=settings.retention_days + 1)
    async with store.sessions() as session, session.begin():
        await session.execute(update(Prompt).where(Prompt.id == asked.id).values(created_at=long_ago))
    deletion = await store.call(deletion_service.purge_expired, settings=settings)
    assert set(deletion.prompt_ids) == {asked.id, follow.id}
    assert await store.sql("SELECT id FROM prompts") == [(fresh.id,)]
    assert await store.count(Image) == 1 and await store.orphans() == []


async def test_an_ask_question_goes_with_its_last_answer(store, settings):
    slash = await store.prompt("/ask question", author_id=A, message_id=None)
    first, _ = await store.answer(slash.id, "first")
    second, _ = await store.answer(slash.id, "second", regenerated=True)
    await store.call(deletion_service.delete_response, settings=settings, response_id=first)
    assert await store.count(Prompt) == 1  # another answer to it remains
    deletion = await store.call(deletion_service.delete_response, settings=settings, response_id=second)
    assert deletion.prompt_ids == (slash.id,)
    assert await store.count(Prompt) == 0 and await store.count(Image) == 0
    # a question with a message of its own stays: that message can still be replied to or deleted
    asked = await store.prompt("asked in a message", author_id=A)
    only, _ = await store.answer(asked.id, "only")
    await store.call(deletion_service.delete_response, settings=settings, response_id=only)
    assert await store.count(Prompt) == 1
    assert await store.orphans() == []


async def test_deleting_a_channel_takes_its_threads_and_a_thread_only_itself(store, settings):
    thread, other_thread, elsewhere = store.new_id(), store.new_id(), store.new_id()
    in_channel = await store.prompt("in the channel")
    in_thread = await store.prompt("in a thread", channel_id=thread, parent_channel_id=CHANNEL)
    in_other = await store.prompt("in another thread", channel_id=other_thread, parent_channel_id=CHANNEL)
    kept = await store.prompt("elsewhere", channel_id=elsewhere)
    deletion = await store.call(deletion_service.delete_channel, settings=settings, channel_id=thread)
    assert deletion.prompt_ids == (in_thread.id,)
    deletion = await store.call(deletion_service.delete_channel, settings=settings, channel_id=CHANNEL)
    assert set(deletion.prompt_ids) == {in_channel.id, in_other.id}
    assert await store.sql("SELECT id FROM prompts") == [(kept.id,)]
    assert await store.orphans() == []


async def test_a_removed_guilds_data_goes_after_the_grace_period_unless_the_bot_returns(store, settings):
    other_guild = GUILD + 1
    await store.learning()
    here = await store.prompt("here", images=[make_image(1)])
    await store.answer(here.id, "answer")
    there = await store.prompt("there", guild_id=other_guild)
    now = datetime.now(UTC)
    due = await store.call(
        deletion_service.schedule_guild_deletion, settings=settings, guild_id=GUILD, now=now
    )
    assert due == now + timedelta(days=settings.guild_grace_days)
    # a second removal event does not push the deadline back
    later = now + timedelta(days=1)
    assert (
        await store.call(
            deletion_service.schedule_guild_deletion, settings=settings, guild_id=GUILD, now=later
        )
        == due
    )

    assert (
        await store.call(deletion_service.purge_expired, settings=settings, now=due - timedelta(hours=1))
    ).nothing
    assert await store.call(
        deletion_service.cancel_guild_deletion, guild_id=GUILD
    )  # the bot was invited back
    assert (
        await store.call(deletion_service.purge_expired, settings=settings, now=due + timedelta(hours=1))
    ).nothing

    await store.call(deletion_service.schedule_guild_deletion, settings=settings, guild_id=GUILD, now=now)
    deletion = await store.call(
        deletion_service.purge_expired, settings=settings, now=due + timedelta(hours=1)
    )
    assert deletion.prompt_ids == (here.id,)
    assert await store.sql("SELECT id FROM prompts") == [(there.id,)]
    assert await store.count(GuildSettings) == 0 and await store.count(GuildRemoval) == 0
    assert await store.count(Response) == 0 and await store.orphans() == []


async def test_at_start_guilds_present_cancel_and_guilds_missing_schedule(store, settings):
    gone, back = GUILD + 1, GUILD + 2
    await store.prompt("in a guild the bot left while offline", guild_id=gone)
    await store.prompt("in a guild the bot is in", guild_id=back)
    await store.call(deletion_service.schedule_guild_deletion, settings=settings, guild_id=back)
    cancelled, scheduled = await store.call(
        deletion_service.note_guilds_present, settings=settings, guild_ids=[back, GUILD]
    )
    assert (cancelled, scheduled) == (1, 1)
    async with store.sessions() as session:
        assert list(await session.scalars(select(GuildRemoval.guild_id))) == [gone]


@sqlite_only
async def test_a_reply_recorded_while_its_source_is_being_deleted_never_keeps_the_words(
    store, settings, monkeypatch
):
    question_message = store.new_id()
    await store.prompt("A's racing secret", author_id=A, message_id=question_message, images=[])
    talk = await conversation(store, question_message)
    recording: list[asyncio.Task] = []
    closure_step = deletion_service._unanswered_slash_prompts

    async def record_meanwhile(session, frontier, deleted):
        if not recording:  # what quotes the question was read: B's reply is recorded now, concurrently
            reply = store.prompt("B's reply", author_id=B, history=talk.turns, images=[])
            recording.append(asyncio.create_task(reply))
            await asyncio.sleep(0.5)  # long enough for it to commit, were it not held back
        return await closure_step(session, frontier, deleted)

    monkeypatch.setattr(deletion_service, "_unanswered_slash_prompts", record_meanwhile)
    await store.call(deletion_service.delete_message, settings=settings, message_id=question_message)
    with contextlib.suppress(UnknownPrompt):  # it waited for the deletion, then found its source gone
        await recording[0]
    assert await stored_text_anywhere(store, "A's racing secret") == []
    assert await store.orphans() == []
