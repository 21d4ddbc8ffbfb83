"""Server-side permission checks for the slash commands (their failures are answered by cogs/errors.py).

`default_permissions` on a command is only a hint to Discord's client (server admins can change it,
and it works on top-level commands only), so every privileged command checks here as well:

- bot admins: the application owner (or its team) and SMOLCORD_ADMIN_IDS (`/smolcord`);
- server managers: members with Manage Server in the guild the command runs in, or bot admins
  (`/learning`);
- the application owner alone: a global command sync.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import discord
from discord import app_commands

if TYPE_CHECKING:
    from bot.app import SmolcordBot

__all__ = [
    "GuildOnly",
    "NotBotAdmin",
    "NotOwner",
    "NotServerManager",
    "Refused",
    "is_bot_admin",
    "require_bot_admin",
    "require_owner",
    "require_server_manager",
]


class Refused(app_commands.CheckFailure):
    """A server-side check said no; its message is what the user sees."""


class NotBotAdmin(Refused):
    def __init__(self) -> None:
        super().__init__("Only smolcord's owner and its admins (SMOLCORD_ADMIN_IDS) can do that.")


class NotOwner(Refused):
    def __init__(self) -> None:
        super().__init__("Only the application's owner can do that.")


class NotServerManager(Refused):
    def __init__(self) -> None:
        super().__init__("Only members with the Manage Server permission can change that here.")


class GuildOnly(Refused):
    def __init__(self) -> None:
        super().__init__("That only works in a server.")


def _bot(interaction: discord.Interaction) -> SmolcordBot:
    return cast("SmolcordBot", interaction.client)


async def is_bot_admin(interaction: discord.Interaction) -> bool:
    """The application owner (or a team member) or one of SMOLCORD_ADMIN_IDS."""
    return await _bot(interaction).is_bot_admin(interaction.user)


async def require_bot_admin(interaction: discord.Interaction) -> bool:
    if not await is_bot_admin(interaction):
        raise NotBotAdmin()
    return True


async def require_owner(interaction: discord.Interaction) -> bool:
    if not await _bot(interaction).is_owner(interaction.user):
        raise NotOwner()
    return True


async def require_server_manager(interaction: discord.Interaction) -> bool:
    """Manage Server in this guild (as Discord resolved it for this interaction), or a bot admin."""
    if interaction.guild_id is None:
        raise GuildOnly()
    # interaction.permissions comes with the interaction, computed by Discord (owner and
    # Administrator included), so it needs no member cache and no privileged intent.
    if interaction.permissions.manage_guild or await is_bot_admin(interaction):
        return True
    raise NotServerManager()
