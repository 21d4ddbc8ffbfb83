"""Fixtures for the bot tests: a fake Discord on loopback that the real discord.py client talks to."""

from collections.abc import AsyncIterator

import pytest
from fake_discord import FakeDiscord


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """A started FakeDiscord with discord.py pointed at it (restored afterwards)."""
    async with FakeDiscord() as fake:
        yield fake
