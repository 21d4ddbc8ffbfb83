"""Fixtures for the bot tests: a fake Discord on loopback that the real discord.py client talks to."""

from collections.abc import AsyncIterator

import pytest
from fake_discord import FakeDiscord


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """A started FakeDiscord with discord.py pointed at it (restored afterwards)."""
    async with FakeDiscord() as fake:
        yield fake


@pytest.fixture
def start_bot(tiny_engine, tmp_path, migrated_db_template):
    """`async with start_bot(**settings) as world:` the whole bot on loopback (see bot_harness)."""
    from bot_harness import running_bot

    def start(**overrides):
        return running_bot(
            engine=tiny_engine, tmp_path=tmp_path, db_template=migrated_db_template, **overrides
        )

    return start
