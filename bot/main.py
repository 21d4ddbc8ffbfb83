"""Open what the bot talks to, run it, close everything on the way out."""

from __future__ import annotations

import logging

import aiohttp

from feedback.db import create_engine, sessionmaker
from smolcord.settings import Settings
from smolcord.worker_client import WorkerClient

log = logging.getLogger(__name__)

TOKEN_HELP = """\
DISCORD_TOKEN is not set. To get one:
  1. Open https://discord.com/developers/applications and press "New Application".
  2. In "Bot", press "Reset Token" and copy it. No privileged intent is needed.
  3. Put it in a .env file beside where you run smolcord:  DISCORD_TOKEN=...
  4. Invite the bot: in "OAuth2 → URL Generator" tick `bot` and `applications.commands`, then the
     permissions View Channels, Send Messages, Send Messages in Threads, Read Message History,
     Add Reactions, Attach Files and Embed Links; open the generated URL and pick your server.
The README walks through it with screenshots' worth of detail."""


async def run_bot(settings: Settings) -> None:
    """Run the Discord bot until it is stopped (migrations must have run already)."""
    from bot.app import SmolcordBot  # discord.py is imported only by the processes that need it

    if settings.discord_token is None:
        raise SystemExit(TOKEN_HELP)
    engine = create_engine(settings.db_url)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=settings.request_timeout_s + 30)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http_session:
            token = settings.worker_token.get_secret_value() if settings.worker_token else None
            worker = WorkerClient(http_session, settings.worker_url, token=token)
            bot = SmolcordBot(
                settings=settings, http_session=http_session, sessions=sessionmaker(engine), worker=worker
            )
            async with bot:
                await bot.start(settings.discord_token.get_secret_value())
    finally:
        await engine.dispose()
