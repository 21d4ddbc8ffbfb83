"""Alembic environment of the feedback store (async template); the URL comes from smolcord's settings.

`feedback.store.db.upgrade_to_head(url)` passes its URL in `config.attributes["database_url"]`; the
`alembic` command line uses SMOLCORD_DATABASE_URL, or the SQLite file in SMOLCORD_DATA_DIR.
This file calls `asyncio.run`: it must run where no event loop is running.
"""

import asyncio
from logging.config import fileConfig

from sqlalchemy import pool
from sqlalchemy.engine import Connection

from alembic import context
from feedback.store.db import create_engine
from feedback.store.models import Base, UTCDateTime

config = context.config

# Only the alembic command line configures logging from alembic.ini; called from the app
# (Config() without a file) the app's own logging stays as it is.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return url
    from smolcord.settings import get_settings

    return get_settings().db_url


def render_item(type_: str, obj: object, autogen_context: object) -> str | bool:
    """Autogenerate writes UTCDateTime as the plain type it stores, so migrations never import the app."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_item=render_item,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit the SQL instead of running it (`alembic upgrade head --sql`)."""
    url = database_url()
    configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    configure(
        connection=connection,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=sqlite,
        # create_engine(for_migrations=True) emits a real BEGIN on SQLite, so DDL is transactional
        # there too: a failing upgrade leaves the database at the revision it started from.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_engine(database_url(), for_migrations=True, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
