"""The whole bot under test: the real discord.py client against FakeDiscord, the real worker, a real SQLite file."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from fake_discord import CLIENT_OPTIONS, FakeDiscord, FakeGuild, FakeUser

from smolcord.settings import Settings


@dataclass
class BotWorld:
    """Everything a bot test touches."""

    fake: FakeDiscord
    bot: Any  # bot.app.SmolcordBot
    settings: Settings
    sessions: Any  # async_sessionmaker of the store the bot writes
    guild: FakeGuild
    channel: dict[str, Any]
    alice: FakeUser
    bob: FakeUser
    worker_url: str
    worker_app: web.Application | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def mention(self) -> str:
        return f"<@{self.fake.bot_user.id}>"


async def serve_worker(engine: Any, settings: Settings) -> tuple[web.AppRunner, str]:
    """The real worker app around a shared engine, listening on an ephemeral loopback port."""
    from model.app import init_app

    runner = web.AppRunner(await init_app(settings, engine=engine))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@asynccontextmanager
async def running_bot(
    *,
    engine: Any,
    tmp_path: Path,
    db_template: Path,
    worker: bool = True,
    worker_settings: dict[str, Any] | None = None,
    **overrides: Any,
) -> AsyncIterator[BotWorld]:
    """Start FakeDiscord, the worker (unless `worker=False`) and the bot; tear all down afterwards.

    Keyword overrides become bot settings. Defaults for tests: no cooldown, the fake's CDN as the
    only attachment host, the test guild as the dev guild (commands sync there).
    """
    from bot.answering import Answerer
    from bot.app import SmolcordBot
    from feedback.store.db import create_engine, sessionmaker
    from smolcord.worker_client import WorkerClient

    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(db_template, data_dir / "smolcord.db")
    async with AsyncExitStack() as stack:
        fake = await stack.enter_async_context(FakeDiscord())
        owner = fake.owner
        alice, bob = fake.add_user("alice"), fake.add_user("bob")
        guild = fake.add_guild("test-server", owner=owner)
        fake.add_member(guild, alice)
        fake.add_member(guild, bob)
        base: dict[str, Any] = {
            "data_dir": data_dir,
            "model": str(getattr(engine, "name", "tiny")),
            "attachment_hosts": [fake.cdn_base],
            "cooldown_s": 0,
            "dev_guild_id": guild.id,
            "max_tokens": 32,
        }
        worker_app = None
        worker_url = "http://127.0.0.1:9"  # nothing listens there: "the worker is down"
        if worker:
            worker_cfg = Settings(_env_file=None, **(base | (worker_settings or {})))  # type: ignore[call-arg]
            runner, worker_url = await serve_worker(engine, worker_cfg)
            stack.push_async_callback(runner.cleanup)
            worker_app = runner.app
        settings = Settings(_env_file=None, **(base | {"worker_url": worker_url} | overrides))  # type: ignore[call-arg]
        db = create_engine(settings.db_url)
        stack.push_async_callback(db.dispose)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        sessions = sessionmaker(db)
        worker_client = WorkerClient(http, settings.worker_url)
        bot = SmolcordBot(
            settings=settings,
            http_session=http,
            sessions=sessions,
            worker=worker_client,
            answerer=Answerer(settings=settings, sessions=sessions, worker=worker_client),
            **CLIENT_OPTIONS,
        )
        await stack.enter_async_context(fake.run_client(bot))
        yield BotWorld(
            fake=fake,
            bot=bot,
            settings=settings,
            sessions=sessionmaker(db),
            guild=guild,
            channel=guild.channel(),
            alice=alice,
            bob=bob,
            worker_url=worker_url,
            worker_app=worker_app,
        )
