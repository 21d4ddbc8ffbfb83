"""Reconciling votes after downtime: one store call per answer, and live events win over the REST snapshot."""

from __future__ import annotations

import asyncio

import pytest
from test_bot.test_chat import answer_to, ask, fast
from test_bot.test_votes import stored_votes, votes_become

pytestmark = pytest.mark.timeout(60)


async def test_a_live_reaction_during_reconciling_wins_over_the_snapshot(start_bot, monkeypatch) -> None:
    async with start_bot(max_tokens=8) as world:
        fake = fast(world).fake
        alice, bob = world.alice, world.bob
        carol = fake.add_user("carol")
        fake.add_member(world.guild, carol)
        [answer] = await answer_to(world, await ask(world))
        await fake.react(answer, alice, "👍")
        await fake.react(answer, carol, "👎")
        await votes_become(world, {(alice.id, "👍"), (carol.id, "👎")})

        cog = world.bot.get_cog("Votes")
        snapshot_taken = cog._current_votes

        async def slow_snapshot(response):
            votes = await snapshot_taken(response)  # alice 👍, carol 👎
            # while the snapshot travels: alice takes her 👍 back, bob votes 👎 (live events)
            await fake.unreact(answer, alice, "👍")
            await fake.react(answer, bob, "👎")
            await asyncio.sleep(0.3)  # the events are handled (or waiting) before the snapshot is written
            return votes

        monkeypatch.setattr(cog, "_current_votes", slow_snapshot)
        assert await cog.reconcile() == 1
        await votes_become(world, {(carol.id, "👎"), (bob.id, "👎")})
        await asyncio.sleep(0.2)
        assert await stored_votes(world) == {(carol.id, "👎"), (bob.id, "👎")}
