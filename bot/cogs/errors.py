"""The one error handler of the slash commands and the bot's buttons: say briefly what went wrong.

An extension of its own (python-discord/bot style): loaded first, it makes `on_app_command_error`
the command tree's error handler. Buttons have no tree, so their callbacks call it themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import Refused

if TYPE_CHECKING:
    from bot.app import SmolcordBot

__all__ = ["Errors", "on_app_command_error", "send_ephemeral"]

log = logging.getLogger(__name__)


async def send_ephemeral(interaction: discord.Interaction, content: str) -> None:
    """Answer only the user: the response if none was sent yet, else a follow-up."""
    if interaction.response.is_done():
        await interaction.followup.send(content, ephemeral=True)
    else:
        await interaction.response.send_message(content, ephemeral=True)


def _command_name(interaction: discord.Interaction) -> str:
    command = interaction.command
    if command is not None:
        return "/" + command.qualified_name
    data: Mapping[str, Any] = interaction.data or {}
    return str(data.get("custom_id") or data.get("name") or "?")


async def on_app_command_error(interaction: discord.Interaction, error: Exception) -> None:
    """The one error handler of the command tree (and of the bot's buttons): say what went wrong, briefly."""
    name = _command_name(interaction)
    if isinstance(error, Refused):
        log.info("refused %s for user %s: %s", name, interaction.user.id, type(error).__name__)
        message = str(error)
    elif isinstance(error, app_commands.CheckFailure):
        log.info("refused %s for user %s: %s", name, interaction.user.id, type(error).__name__)
        message = "You can't use that here."
    elif isinstance(error, app_commands.TransformerError):
        message = f"I couldn't read `{error.value}` as a {error.type.name.lower()}."
    else:
        original = getattr(error, "original", error)
        log.error(
            "%s failed for user %s in guild %s",
            name,
            interaction.user.id,
            interaction.guild_id,
            exc_info=original,
        )
        message = "Something went wrong on my side. It has been logged; please try again later."
    try:
        await send_ephemeral(interaction, message)
    except discord.HTTPException as exc:  # the interaction expired, or Discord is unreachable
        log.warning("could not report an error of %s to user %s (%s)", name, interaction.user.id, exc.status)


class Errors(commands.Cog):
    """Makes `on_app_command_error` the command tree's error handler while the extension is loaded."""

    def __init__(self, bot: SmolcordBot) -> None:
        self.bot = bot
        self._previous = bot.tree.on_error

    async def cog_load(self) -> None:
        self.bot.tree.on_error = on_app_command_error  # type: ignore[method-assign]

    async def cog_unload(self) -> None:
        self.bot.tree.on_error = self._previous  # type: ignore[method-assign]


async def setup(bot: SmolcordBot) -> None:
    await bot.add_cog(Errors(bot))
