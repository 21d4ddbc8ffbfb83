"""The bot process: a discord.py client given its HTTP session, store sessions, worker and answerer."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
import discord
from discord.ext import commands
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.answering import Answerer
from smolcord.registry import AdapterRegistry
from smolcord.settings import Settings
from smolcord.worker_client import WorkerClient

log = logging.getLogger(__name__)

# One cog per feature (python-discord/bot style); each module ends in `async def setup(bot)`. The
# error handler is an extension too, loaded first so that it answers the others' failures.
EXTENSIONS: Sequence[str] = (
    "bot.cogs.errors",
    "bot.cogs.chat",
    "bot.cogs.votes",
    "bot.cogs.privacy",
    "bot.cogs.admin",
    "bot.cogs.training",
)


class SmolcordBot(commands.Bot):
    """The Discord client. It is *given* everything it talks to (discord.py's advanced_startup)."""

    def __init__(
        self,
        *,
        settings: Settings,
        http_session: aiohttp.ClientSession,
        sessions: async_sessionmaker[AsyncSession],
        worker: WorkerClient,
        answerer: Answerer,
        registry: AdapterRegistry | None = None,
        extensions: Sequence[str] = EXTENSIONS,
        **options: Any,
    ) -> None:
        # No privileged intent: Discord still delivers content for messages that mention the bot,
        # DMs, and replies to it (message_content is only needed to read every message).
        intents = discord.Intents.default()
        super().__init__(
            command_prefix=commands.when_mentioned,  # unused: every command is a slash command
            intents=intents,
            help_command=None,
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        self.settings = settings
        self.http_session = http_session
        self.sessions = sessions
        self.worker = worker
        self.answerer = answerer  # shared by the chat and votes cogs
        answerer.attach(self)
        self.registry = registry or AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
        self.initial_extensions = list(extensions)

    async def setup_hook(self) -> None:
        for extension in self.initial_extensions:
            await self.load_extension(extension)
        await self.sync_commands_if_changed()

    async def on_message(self, message: discord.Message) -> None:
        # Cogs listen for messages themselves; there are no prefix commands to process.
        return

    # ------------------------------------------------------------------ command sync

    def commands_hash(self, guild_id: int | None) -> str:
        """A hash of every slash command's definition, so commands sync only when they change."""
        payload = [command.to_dict(self.tree) for command in self.tree.get_commands()]
        blob = json.dumps({"guild": guild_id, "commands": payload}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    async def sync_commands(self, guild_id: int | None = None) -> int:
        """Register the slash commands with Discord (one guild, or globally); returns how many."""
        if guild_id is not None:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
        else:
            synced = await self.tree.sync()
        path = self.settings.data_dir / "commands.sha256"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.commands_hash(guild_id))
        log.info("synced %d commands to %s", len(synced), f"guild {guild_id}" if guild_id else "every guild")
        return len(synced)

    async def sync_commands_if_changed(self) -> None:
        """Sync at start only when the definitions changed since the last sync (a hash in the data dir)."""
        guild_id = self.settings.dev_guild_id
        path = self.settings.data_dir / "commands.sha256"
        try:
            previous = path.read_text().strip()
        except OSError:
            previous = ""
        if previous == self.commands_hash(guild_id):
            return
        try:
            await self.sync_commands(guild_id)
        except discord.HTTPException as exc:  # a failed sync must not keep the bot from answering
            log.warning("command sync failed (%s); run `smolcord sync` later", exc.status)

    # ------------------------------------------------------------------ permissions

    async def is_bot_admin(self, user: discord.abc.User) -> bool:
        """The application owner (or team members) and SMOLCORD_ADMIN_IDS."""
        return user.id in self.settings.admin_ids or await self.is_owner(user)
