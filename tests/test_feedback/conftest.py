"""Fixtures of the feedback store tests: a fresh migrated database per test, and a harness to fill it.

SQLite by default: the schema is migrated once per session into a template file, and each test
gets a copy (a copy takes a millisecond, a migration a second). With SMOLCORD_TEST_DATABASE_URL
set (a PostgreSQL URL, `postgresql+asyncpg://...`), tests run against that database instead,
emptied before each test; tests marked `sqlite_only` are skipped there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_feedback.harness import TEST_DATABASE_URL, StoreHarness, empty_shared_database, sqlite_url

from feedback.store.db import create_engine, sessionmaker, upgrade_to_head
from smolcord.settings import Settings


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """A SQLite file at head, made once (None when testing against SMOLCORD_TEST_DATABASE_URL)."""
    if TEST_DATABASE_URL:
        upgrade_to_head(TEST_DATABASE_URL)
        return None
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade_to_head(sqlite_url(path))
    return path


@pytest.fixture
def settings(tmp_path: Path, migrated_template: Path | None) -> Settings:
    """Settings over a fresh migrated database and an empty data dir; max_voter_share=1 unless a test says."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if migrated_template is not None:
        shutil.copyfile(migrated_template, data_dir / "smolcord.db")
        url = sqlite_url(data_dir / "smolcord.db")
    else:
        assert TEST_DATABASE_URL
        url = TEST_DATABASE_URL
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data_dir,
        database_url=url,
        learning_default=False,
        max_voter_share=1.0,
        min_new_pairs=4,
        retention_days=90,
        heldout_fraction=0.2,
    )


@pytest.fixture
async def engine(settings: Settings):
    engine = create_engine(settings.db_url)
    await empty_shared_database(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine):
    return sessionmaker(engine)


@pytest.fixture
def store(sessions, settings: Settings) -> StoreHarness:
    return StoreHarness(sessions, settings)
