"""Fixtures for the fake Discord's own tests: a started FakeDiscord, with discord.py pointed at it."""

from collections.abc import AsyncIterator

import pytest
from fake_discord import FakeDiscord


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """A started FakeDiscord with discord.py pointed at it (restored afterwards)."""
    async with FakeDiscord() as fake:
        yield fake
