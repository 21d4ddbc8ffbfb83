"""Fixtures for the bot tests: the whole bot on loopback against the fake Discord (see bot_harness)."""

import pytest


@pytest.fixture
def start_bot(tiny_engine, tmp_path, migrated_db_template):
    """`async with start_bot(**settings) as world:` the whole bot on loopback (see bot_harness)."""
    from bot_harness import running_bot

    def start(**overrides):
        return running_bot(
            engine=tiny_engine, tmp_path=tmp_path, db_template=migrated_db_template, **overrides
        )

    return start
