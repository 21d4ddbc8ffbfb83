"""reconcile_votes: a response's stored votes made to match a REST snapshot in one call, live ones kept."""

import pytest
from test_feedback.harness import GUILD, ROLE

from feedback.store import consent as consent_service
from feedback.store import reactions as reactions_service
from feedback.store.errors import UnknownResponse


async def stored(store):
    return {tuple(row) for row in await store.sql("SELECT user_id, emoji, holds_voter_role FROM reactions")}


async def test_votes_become_the_snapshot_except_the_live_ones(store):
    await store.learning()
    await store.call(consent_service.set_voter_role, settings=store.settings, guild_id=GUILD, role_id=ROLE)
    await store.call(consent_service.opt_out, user_id=9)
    prompt = await store.prompt()
    _, [first, last] = await store.answer(prompt.id, "an answer", chunks=2)
    await store.vote(first, 1, "👍", [ROLE])  # removed while offline
    await store.vote(last, 2, "👎", [ROLE])  # still there; roles unknown now: kept as they were
    await store.vote(last, 3, "👍")  # changed live during the reconcile: left alone
    changed = await store.call(
        reactions_service.reconcile_votes,
        message_id=last,
        votes={(2, "👎"): None, (4, "👍🏽"): [ROLE], (5, "👎"): [], (9, "👍"): [ROLE], (6, "👍"): None},
        keep={(3, "👍"), (6, "👍")},  # 6 removed live: the snapshot's 👍 must not come back
    )
    assert await stored(store) == {(2, "👎", True), (3, "👍", False), (4, "👍🏽", True), (5, "👎", False)}
    assert changed == 3  # 1's 👍 went, 4's and 5's came; 9 is opted out
    # the same snapshot again changes nothing
    again = await store.call(
        reactions_service.reconcile_votes,
        message_id=first,
        votes={(2, "👎"): None, (3, "👍"): None, (4, "👍🏽"): None, (5, "👎"): None},
    )
    assert again == 0 and len(await stored(store)) == 4


async def test_an_unknown_message_changes_nothing(store):
    with pytest.raises(UnknownResponse):
        await store.call(reactions_service.reconcile_votes, message_id=12345, votes={(1, "👍"): None})
