"""Engines, sessions and migrations of the feedback store; the only place that knows about SQLite.

On SQLite every connection gets WAL (readers never block the writer), a busy timeout (a writer
waits for the lock instead of failing with "database is locked"), foreign keys (off by default in
SQLite) and synchronous=NORMAL (safe in WAL mode, and much faster). Any other URL, PostgreSQL's
included, is used as it is.

Otherwise the SQLite driver keeps its own transaction handling: it begins a transaction at the
first write, so the reads a service function does first take no lock, and its write transaction
lasts from that first write to the commit.

`transaction(session)` is the one transaction of a service call; `dialect_insert` is the INSERT
with ON CONFLICT of SQLite or PostgreSQL, whichever the session is bound to.
`hold_writes` and `lock_rows` are the locks a deletion and a prompt quoting what it deletes
agree on; `ids_where_in` and `delete_where_in` keep IN lists in batches (`chunks`).

Migrations: `upgrade_to_head(url)` runs Alembic synchronously, and Alembic's async env.py calls
`asyncio.run`, which cannot run inside a running event loop. Call it before the loop starts (the
CLI does, before `asyncio.run(main())`), or from async code as `await upgrade_to_head_async(url)`,
which runs it in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Table, delete, event, false, select, update
from sqlalchemy.dialects.postgresql import dml as postgresql_dml
from sqlalchemy.dialects.sqlite import dml as sqlite_dml
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

from feedback.store.models import Prompt

__all__ = [
    "ALEMBIC_DIR",
    "BUSY_TIMEOUT_MS",
    "alembic_config",
    "chunks",
    "create_engine",
    "current_revision",
    "delete_where_in",
    "dialect_insert",
    "head_revision",
    "hold_writes",
    "ids_where_in",
    "lock_rows",
    "sessionmaker",
    "transaction",
    "upgrade_to_head",
    "upgrade_to_head_async",
]

# A writer waits this long for another writer's lock before SQLite gives up. Transactions here
# last milliseconds; 30 s only runs out if something holds the write lock far too long.
BUSY_TIMEOUT_MS = 30_000

# alembic/ sits beside the packages (the project is installed editable), as alembic.ini says.
ALEMBIC_DIR = Path(__file__).resolve().parents[2] / "alembic"


def create_engine(url: str, *, for_migrations: bool = False, **kwargs: Any) -> AsyncEngine:
    """An async engine for `url`; on SQLite, WAL, busy timeout, foreign keys and synchronous=NORMAL."""
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, for_migrations=for_migrations)
    return engine


def _configure_sqlite(engine: AsyncEngine, *, for_migrations: bool) -> None:
    # For migrations (alembic/env.py), foreign keys stay off: Alembic's batch mode rebuilds a table by
    # copying it and dropping the old one, and with foreign keys on that drop would cascade into its
    # children. And the driver's own transaction handling, which commits before DDL, is replaced by
    # an explicit BEGIN, so that a failing migration rolls back whole.
    foreign_keys = not for_migrations
    pragmas = [
        f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",  # first: the pragmas below may need a lock
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = NORMAL",
        f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}",
    ]

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()
        if for_migrations:
            dbapi_connection.isolation_level = None  # the "begin" listener below emits BEGIN

    if for_migrations:

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN")


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for the service functions; objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(session: AsyncSession) -> AsyncIterator[AsyncSession]:
    """One transaction for one service call: committed on success, rolled back on any error."""
    if session.in_transaction():
        # Committing here would commit the caller's unrelated pending work along with ours.
        raise RuntimeError("service functions run one transaction each: pass a session with none open")
    async with session.begin():
        yield session


def dialect_insert(
    session: AsyncSession, target: type[DeclarativeBase] | Table
) -> sqlite_dml.Insert | postgresql_dml.Insert:
    """An INSERT that supports `on_conflict_do_update/nothing` on SQLite and PostgreSQL alike."""
    name = session.get_bind().dialect.name
    if name == "sqlite":
        return sqlite_dml.insert(target)
    if name == "postgresql":
        return postgresql_dml.insert(target)
    raise NotImplementedError(f"the feedback store supports SQLite and PostgreSQL, not {name}")


T = TypeVar("T")


def chunks(items: Iterable[T], size: int = 500) -> Iterator[Sequence[T]]:
    """Items in lists of at most `size`: IN (...) lists stay under every backend's parameter limit."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def ids_where_in(
    session: AsyncSession, column: Any, where_column: Any, values: Iterable[Any]
) -> set[Any]:
    """The `column` values of the rows whose `where_column` is in `values` (in batches)."""
    found: set[Any] = set()
    for batch in chunks(sorted(set(values))):
        found.update(await session.scalars(select(column).where(where_column.in_(batch))))
    return found


async def delete_where_in(session: AsyncSession, model: Any, column: Any, values: Iterable[Any]) -> int:
    """Delete the rows of `model` whose `column` is in `values` (in batches); returns how many."""
    count = 0
    for batch in chunks(sorted(set(values))):
        result = await session.execute(delete(model).where(column.in_(batch)))
        count += int(result.rowcount)  # type: ignore[attr-defined]
    return count


async def hold_writes(session: AsyncSession) -> None:
    """On SQLite, take the database's write lock now, before a deletion reads what quotes its rows.

    The driver begins a transaction only at the first write; until then a prompt quoting a row
    being deleted could be committed after the closure was read and survive with the quoted words.
    A write that changes nothing takes the lock (other writers wait on the busy timeout).
    """
    if session.get_bind().dialect.name == "sqlite":
        await session.execute(update(Prompt).where(false()).values(key=Prompt.key))


async def lock_rows(session: AsyncSession, column: Any, ids: set[int]) -> None:
    """Row-lock what is about to be deleted (PostgreSQL; SQLite holds its write lock already).

    A prompt recorded concurrently that quotes one of these rows then either committed before (and
    the closure, read next, finds it) or waits and fails its foreign key (UnknownPrompt: refused).
    """
    if session.get_bind().dialect.name == "sqlite":
        return
    for batch in chunks(sorted(ids)):
        await session.execute(select(column).where(column.in_(batch)).with_for_update())


# ------------------------------------------------------------------------------ migrations


def alembic_config(url: str) -> Any:
    """An Alembic Config for `url` that needs no alembic.ini (the URL never goes through ini interpolation)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes["database_url"] = url
    return config


def _ensure_sqlite_dir(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def upgrade_to_head(url: str) -> str:
    """Migrate the database at `url` to the newest revision (synchronous: no event loop may be running)."""
    from alembic import command

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "upgrade_to_head() runs its own event loop: call it before asyncio.run(), "
            "or use `await upgrade_to_head_async(url)` from async code"
        )
    _ensure_sqlite_dir(url)
    plugins = logging.getLogger("alembic.runtime.plugins")
    if plugins.level == logging.NOTSET:  # one INFO line per autogenerate plugin on every upgrade
        plugins.setLevel(logging.WARNING)
    command.upgrade(alembic_config(url), "head")
    return head_revision()


async def upgrade_to_head_async(url: str) -> str:
    """`upgrade_to_head` from async code: runs it in a worker thread with its own event loop."""
    return await asyncio.to_thread(upgrade_to_head, url)


def head_revision() -> str:
    """The newest migration's revision id."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config("")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads: {heads}")
    return heads[0]


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None: not migrated)."""
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
