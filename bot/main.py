"""Open what the bot talks to, run it, close everything on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import aiohttp

from feedback.store.db import create_engine, sessionmaker
from smolcord.settings import Settings
from smolcord.worker_client import WorkerClient

if TYPE_CHECKING:
    from bot.app import SmolcordBot

log = logging.getLogger(__name__)

# Test-only: a Discord-compatible server at another address (tests/fake_discord/'s FakeDiscord, for
# a bot running in a child process, as `smolcord run` starts it). Unset in production.
API_BASE_ENV = "SMOLCORD_DISCORD_API_BASE"  # e.g. http://127.0.0.1:PORT/api/v10
GATEWAY_ENV = "SMOLCORD_DISCORD_GATEWAY"  # e.g. ws://127.0.0.1:PORT/gateway

# On the way out, event handlers still running (a vote being written, an answer being finished)
# get this long before the store closes; a vote lost anyway is reconciled at the next start.
DRAIN_S = 10.0
_HANDLER_TASKS = ("discord.py: ", "CommandTree-invoker")


async def run_bot(settings: Settings) -> None:
    """Run the Discord bot until it is stopped (migrations must have run already).

    SIGTERM (systemd, `smolcord run`) stops it cleanly: the handlers still running (a vote being
    written, an answer being posted) finish first, then the bot closes (a training run it started
    is stopped, and unwinds), then the store. Ctrl-C closes it at once; the store still outlives
    the handlers.
    """
    # discord.py is imported only by the processes that need it
    from bot.answering import Answerer
    from bot.app import SmolcordBot

    discord_token = settings.require_discord_token()
    _use_discord_at(os.environ.get(API_BASE_ENV), os.environ.get(GATEWAY_ENV))
    engine = create_engine(settings.db_url)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=settings.request_timeout_s + 30)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http_session:
            token = settings.worker_token.get_secret_value() if settings.worker_token else None
            worker = WorkerClient(http_session, settings.worker_url, token=token, model=settings.worker_model)
            sessions = sessionmaker(engine)
            bot = SmolcordBot(
                settings=settings,
                http_session=http_session,
                sessions=sessions,
                worker=worker,
                answerer=Answerer(settings=settings, sessions=sessions, worker=worker),
            )
            try:
                async with bot:
                    with _close_on_sigterm(bot):
                        await bot.start(discord_token)
            finally:
                await _drain_handlers(DRAIN_S)
    finally:
        await engine.dispose()


def _use_discord_at(api_base: str | None, gateway: str | None) -> None:
    """Point discord.py's REST base and first gateway elsewhere (the test hook above)."""
    if not api_base and not gateway:
        return
    import discord.gateway
    import discord.http
    import yarl

    if api_base:
        discord.http.Route.BASE = api_base.rstrip("/")
    if gateway:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)
    log.warning("talking to a Discord-compatible server at %s (%s, %s)", api_base, API_BASE_ENV, GATEWAY_ENV)


@contextlib.contextmanager
def _close_on_sigterm(bot: SmolcordBot) -> Iterator[None]:
    """SIGTERM lets running handlers finish, then closes the bot, which makes `bot.start` return."""
    loop = asyncio.get_running_loop()
    closing: set[asyncio.Task[None]] = set()

    async def drain_then_close() -> None:
        await _drain_handlers(DRAIN_S)
        await bot.close()

    def close() -> None:
        if closing:
            return
        log.info("SIGTERM: stopping the bot")
        closing.add(loop.create_task(drain_then_close()))

    try:
        loop.add_signal_handler(signal.SIGTERM, close)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or not Unix
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _drain_handlers(timeout: float) -> None:  # noqa: ASYNC109
    """Wait (a bounded time) for discord.py's event and command tasks still running."""
    current = asyncio.current_task()
    pending = [
        task
        for task in asyncio.all_tasks()
        if task is not current and not task.done() and task.get_name().startswith(_HANDLER_TASKS)
    ]
    if not pending:
        return
    log.info("letting %d handlers finish", len(pending))
    _, late = await asyncio.wait(pending, timeout=timeout)
    if late:
        log.warning("%d handlers still running after %.0f s; stopping them", len(late), timeout)
