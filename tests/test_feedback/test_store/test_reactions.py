"""Votes: state per user and emoji, the voter's eligibility at vote time, what is not a vote."""

import pytest
from test_feedback.harness import GUILD, ROLE

from feedback.store import consent as consent_service
from feedback.store import reactions as reactions_service
from feedback.store.errors import (
    NotAVote,
    UnknownResponse,
)
from feedback.store.models import Reaction
from feedback.store.votes import action_of, vote_value


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
