"""Migrations: one head, named by date and purpose, up/down/up, no drift, and data at 0001 survives."""

import re
import shutil

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text
from test_feedback.harness import TEST_DATABASE_URL, sqlite_only, sqlite_url

from alembic import command
from feedback.store.db import (
    ALEMBIC_DIR,
    alembic_config,
    create_engine,
    current_revision,
    head_revision,
    upgrade_to_head,
    upgrade_to_head_async,
)
from feedback.store.models import Base


@pytest.fixture
def empty_url(tmp_path):
    """A database with nothing in it: a new SQLite file, or the test PostgreSQL downgraded to base."""
    if TEST_DATABASE_URL:
        command.downgrade(alembic_config(TEST_DATABASE_URL), "base")
        yield TEST_DATABASE_URL
        upgrade_to_head(TEST_DATABASE_URL)  # leave it as the other tests expect it
    else:
        yield sqlite_url(tmp_path / "store.db")


def drift(url: str) -> list:
    """What autogenerate would change to make the database match the models (nothing, hopefully)."""

    async def compare():
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(
                    lambda sync: compare_metadata(
                        MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                    )
                )
        finally:
            await engine.dispose()

    import asyncio

    return asyncio.run(compare())


def revision_of(url: str) -> str | None:
    import asyncio

    async def read():
        engine = create_engine(url)
        try:
            return await current_revision(engine)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_one_head_and_files_named_by_date_and_purpose():
    scripts = ScriptDirectory.from_config(alembic_config(""))
    assert len(scripts.get_heads()) == 1 and scripts.get_heads()[0] == head_revision()
    names = sorted(path.name for path in (ALEMBIC_DIR / "versions").glob("*.py"))
    assert len(names) >= 2
    for name in names:
        assert re.fullmatch(r"20\d\d_\d\d_\d\d_\d{4}_[a-z0-9_]+\.py", name), name
    assert [s.revision for s in scripts.walk_revisions()][::-1] == [n.split("_")[3] for n in names]


def test_upgrade_downgrade_upgrade_without_drift(empty_url):
    config = alembic_config(empty_url)
    assert upgrade_to_head(empty_url) == head_revision()
    assert drift(empty_url) == []
    command.downgrade(config, "base")
    assert revision_of(empty_url) is None
    assert upgrade_to_head(empty_url) == head_revision()
    assert revision_of(empty_url) == head_revision()
    assert drift(empty_url) == []
    upgrade_to_head(empty_url)  # at head already: nothing to do


def test_data_at_the_first_migration_upgrades_intact(empty_url):
    command.upgrade(alembic_config(empty_url), "0001")
    rows = {
        "guild_settings": "INSERT INTO guild_settings VALUES (9000000000000000001, true, 8000000000000000001, '2026-01-01 00:00:00')",
        "opted_out_users": "INSERT INTO opted_out_users VALUES (5, 'opted_out', '2026-01-01 00:00:00')",
        "images": f"INSERT INTO images VALUES ('{'a' * 64}', 'image/png', '.png', 4, 3, 120, '2026-01-01 00:00:00')",
        "prompts": "INSERT INTO prompts (id, key, guild_id, channel_id, message_id, author_id, question, history,"
        " trainable, created_at) VALUES (1, 'k', 9000000000000000001, 2, 7000000000000000001, 3, 'what?',"
        " '[]', true, '2026-01-01 00:00:00')",
        "prompt_images": f"INSERT INTO prompt_images VALUES (1, 0, '{'a' * 64}', false)",
        "responses": "INSERT INTO responses (id, prompt_id, text, adapter_version, sampling, regenerated,"
        " created_at) VALUES (1, 1, 'a cat', 'v1', '{}', false, '2026-01-01 00:00:00'),"
        " (2, 1, 'a dog', 'v1', '{}', true, '2026-01-01 00:00:00')",
        "response_messages": "INSERT INTO response_messages VALUES (7000000000000000002, 1, 0),"
        " (7000000000000000003, 2, 0)",
        "reactions": "INSERT INTO reactions VALUES (1, 5, '👍', NULL, false, '2026-01-01 00:00:00',"
        " '2026-01-01 00:00:00'), (2, 6, '👎', NULL, false, '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
        "training_runs": "INSERT INTO training_runs (id, method, status, started_at, adapter_version, metrics)"
        " VALUES (1, 'dpo', 'succeeded', '2026-01-01 00:00:00', 'v1', '{\"heldout_accuracy\": 0.7}')",
        "training_run_pairs": "INSERT INTO training_run_pairs VALUES (1, 1, 1, 2, false)",
    }

    async def fill_and_dump(statements):
        engine = create_engine(empty_url)
        try:
            async with engine.begin() as connection:
                for statement in statements:
                    await connection.execute(text(statement))
            async with engine.connect() as connection:
                # as {column: value}: later revisions may add columns (compared below on the old ones)
                return {
                    table: sorted(
                        (
                            dict(row._mapping)
                            for row in await connection.execute(text(f"SELECT * FROM {table}"))
                        ),
                        key=repr,
                    )
                    for table in rows
                }
        finally:
            await engine.dispose()

    import asyncio

    before = asyncio.run(fill_and_dump(rows.values()))
    assert all(before.values())
    upgrade_to_head(empty_url)
    after = asyncio.run(fill_and_dump([]))
    assert {
        table: [{column: row[column] for column in old[0]} for row in after[table]]
        for table, old in before.items()
    } == before
    # 0003 added a thread's parent channel: unknown for what was recorded before
    assert [row["parent_channel_id"] for row in after["prompts"]] == [None]

    async def adapters():
        engine = create_engine(empty_url)
        try:
            async with engine.connect() as connection:
                return (
                    await connection.execute(text("SELECT version, status, run_id FROM adapter_versions"))
                ).all()
        finally:
            await engine.dispose()

    # 0002 started the adapter history from the runs that had produced versions
    assert [tuple(row) for row in asyncio.run(adapters())] == [("v1", "candidate", 1)]


def rebuild_prompts_table(url: str, *, for_migrations: bool) -> int:
    """Rebuild `prompts` the way batch mode does (copy, drop, rename); returns the responses left."""
    import asyncio

    import sqlalchemy as sa
    from alembic.operations import Operations

    def rebuild(sync):
        context = MigrationContext.configure(sync, opts={"transactional_ddl": True})
        with context.begin_transaction():
            with Operations(context).batch_alter_table("prompts", recreate="always") as batch:
                batch.alter_column("question", existing_type=sa.Text(), nullable=False)

    async def run():
        engine = create_engine(url, for_migrations=for_migrations)
        try:
            async with engine.connect() as connection:
                await connection.run_sync(rebuild)
            async with engine.connect() as connection:
                return (await connection.exec_driver_sql("SELECT count(*) FROM responses")).scalar()
        finally:
            await engine.dispose()

    return asyncio.run(run())


@sqlite_only
def test_batch_rebuilds_in_migrations_keep_children(tmp_path):
    """Migrations run with foreign keys off: with them on, dropping the old `prompts` cascades."""
    import asyncio

    url = sqlite_url(tmp_path / "store.db")
    upgrade_to_head(url)

    async def fill():
        engine = create_engine(url)
        try:
            async with engine.begin() as connection:
                await connection.execute(
                    text(
                        "INSERT INTO prompts (id, key, channel_id, author_id, question, history, trainable,"
                        " created_at) VALUES (1, 'k', 1, 1, 'q', '[]', false, '2026-01-01 00:00:00')"
                    )
                )
                await connection.execute(
                    text(
                        "INSERT INTO responses (prompt_id, text, sampling, regenerated, created_at)"
                        " VALUES (1, 'a', '{}', false, '2026-01-01 00:00:00')"
                    )
                )
        finally:
            await engine.dispose()

    asyncio.run(fill())
    assert rebuild_prompts_table(url, for_migrations=True) == 1
    assert rebuild_prompts_table(url, for_migrations=False) == 0  # the control: what env.py avoids


@sqlite_only
@pytest.mark.parametrize("for_migrations", [True, False])
def test_migrations_roll_back_whole_on_sqlite(tmp_path, for_migrations):
    """The migration engine wraps DDL in a real transaction; the driver's default commits it at once."""
    import asyncio

    url = sqlite_url(tmp_path / "store.db")

    async def fail_halfway():
        engine = create_engine(url, for_migrations=for_migrations)
        try:
            with pytest.raises(RuntimeError):
                async with engine.begin() as connection:
                    await connection.exec_driver_sql("CREATE TABLE half_done (x INTEGER)")
                    raise RuntimeError("the migration failed here")
            async with engine.connect() as connection:
                found = await connection.exec_driver_sql(
                    "SELECT count(*) FROM sqlite_master WHERE name = 'half_done'"
                )
                return found.scalar()
        finally:
            await engine.dispose()

    assert asyncio.run(fail_halfway()) == (0 if for_migrations else 1)


async def test_upgrade_refuses_to_run_inside_an_event_loop_and_has_a_thread_variant(tmp_path):
    url = sqlite_url(tmp_path / "async" / "store.db")
    with pytest.raises(RuntimeError, match="upgrade_to_head_async"):
        upgrade_to_head(url)
    assert await upgrade_to_head_async(url) == head_revision()


@sqlite_only
def test_a_copied_template_is_at_head(migrated_template, tmp_path):
    copy = tmp_path / "copy.db"
    shutil.copyfile(migrated_template, copy)
    assert revision_of(sqlite_url(copy)) == head_revision()


def test_prompts_with_a_history_from_before_provenance_stop_being_trainable(empty_url):
    """0003: a quoted turn recorded before provenance has no known author, so its prompt never trains."""
    import asyncio

    command.upgrade(alembic_config(empty_url), "0002")
    insert = (
        "INSERT INTO prompts (id, key, guild_id, channel_id, message_id, author_id, question, history,"
        " trainable, created_at) VALUES (:id, :key, 9, 2, :message, 3, 'what?', :history, :trainable,"
        " '2026-01-01 00:00:00')"
    )
    quoted = '[{"role": "user", "content": "hi", "images": []}, {"role": "assistant", "content": "hello"}]'
    rows = [
        {"id": 1, "key": "a", "message": 11, "history": "[]", "trainable": True},
        {"id": 2, "key": "b", "message": 12, "history": quoted, "trainable": True},
        {"id": 3, "key": "c", "message": 13, "history": quoted, "trainable": False},
    ]

    async def run(statements):
        engine = create_engine(empty_url)
        try:
            async with engine.begin() as connection:
                for statement, params in statements:
                    await connection.execute(text(statement), params)
            async with engine.connect() as connection:
                found = await connection.execute(text("SELECT id, trainable FROM prompts ORDER BY id"))
                return [(row[0], bool(row[1])) for row in found]
        finally:
            await engine.dispose()

    assert asyncio.run(run([(insert, row) for row in rows])) == [(1, True), (2, True), (3, False)]
    upgrade_to_head(empty_url)
    assert asyncio.run(run([])) == [(1, True), (2, False), (3, False)]


def test_canaries_table_upgrades_and_downgrades(empty_url):
    """0004: the canaries table comes and goes; the data of 0003 is untouched either way."""
    import asyncio

    config = alembic_config(empty_url)
    command.upgrade(config, "0003")

    async def run(statements):
        engine = create_engine(empty_url)
        try:
            async with engine.begin() as connection:
                for statement in statements:
                    await connection.execute(text(statement))
            async with engine.connect() as connection:
                tables = await connection.run_sync(lambda sync: set(sa_inspect(sync).get_table_names()))
                prompts = (await connection.execute(text("SELECT id FROM prompts"))).scalars().all()
                canaries = (
                    (await connection.execute(text("SELECT candidate_version, rule FROM canaries"))).all()
                    if "canaries" in tables
                    else None
                )
                return "canaries" in tables, list(prompts), canaries
        finally:
            await engine.dispose()

    prompt = (
        "INSERT INTO prompts (id, key, guild_id, channel_id, author_id, question, history, trainable,"
        " created_at) VALUES (1, 'k', 9, 2, 3, 'what?', '[]', true, '2026-01-01 00:00:00')"
    )
    assert asyncio.run(run([prompt])) == (False, [1], None)
    command.upgrade(config, "0004")
    canary = (
        "INSERT INTO canaries (candidate_version, current_version, share, started_at, decided_at, decision,"
        " rule, stats, decided_by) VALUES ('v3', 'v2', 0.2, '2026-01-01 00:00:00', '2026-01-02 00:00:00',"
        " 'promote', 'live', '{\"p_not_worse\": 0.97}', NULL)"
    )
    assert asyncio.run(run([canary])) == (True, [1], [("v3", "live")])
    command.downgrade(config, "0003")
    assert asyncio.run(run([])) == (False, [1], None)
    assert upgrade_to_head(empty_url) == head_revision()
    assert asyncio.run(run([])) == (True, [1], [])
    assert drift(empty_url) == []
