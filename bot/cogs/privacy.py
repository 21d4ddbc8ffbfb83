"""Consent: `/privacy info|opt-out|opt-in|forget-me` for everyone, `/learning on|off|voter-role` for server managers."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import require_server_manager
from bot.cogs.errors import on_app_command_error
from feedback.store import consent as consent_service
from feedback.store import deletion as deletion_service

if TYPE_CHECKING:
    from bot.app import SmolcordBot

log = logging.getLogger(__name__)


class ForgetButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"smolcord:forget:(?P<action>confirm|cancel):(?P<user_id>[0-9]+)",
):
    """The confirm / cancel buttons under `/privacy forget-me`. All their state is in the custom id,
    so a click works after a restart too (discord.py's persistent views)."""

    def __init__(self, action: str, user_id: int) -> None:
        confirm = action == "confirm"
        super().__init__(
            discord.ui.Button(
                label="Forget me" if confirm else "Cancel",
                style=discord.ButtonStyle.danger if confirm else discord.ButtonStyle.secondary,
                custom_id=f"smolcord:forget:{action}:{user_id}",
            )
        )
        self.action = action
        self.user_id = user_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ForgetButton:
        return cls(match["action"], int(match["user_id"]))

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        """Only the user who asked to be forgotten may press these (discord.py's dynamic_counter)."""
        if interaction.user.id == self.user_id:
            return True
        try:
            await interaction.response.send_message("These buttons are not yours.", ephemeral=True)
        except Exception as exc:  # views have no tree: route failures to the same handler
            await on_app_command_error(interaction, exc)
        return False

    async def callback(self, interaction: discord.Interaction) -> None:
        try:
            await self._answer(interaction)
        except Exception as exc:  # views have no tree: route failures to the same handler
            await on_app_command_error(interaction, exc)

    async def _answer(self, interaction: discord.Interaction) -> None:
        if self.action == "cancel":
            await interaction.response.edit_message(content="Cancelled: nothing was deleted.", view=None)
            return
        await interaction.response.defer()  # deleting may take a while; 3 s is all Discord waits
        bot: SmolcordBot = interaction.client  # type: ignore[assignment]
        async with bot.sessions() as session:
            deletion = await deletion_service.forget_user(
                session, settings=bot.settings, user_id=self.user_id
            )
        log.info("user %s forgotten: %d prompts", self.user_id, len(deletion.prompt_ids))
        await interaction.edit_original_response(
            content=(
                f"Done. I deleted {len(deletion.prompt_ids)} questions, {len(deletion.response_ids)} answers "
                f"and {deletion.reactions} votes of yours, with their images. Nothing new of yours will be "
                "used for training unless you run `/privacy opt-in`. Your own Discord messages stay where "
                "they are; delete them there if you want them gone too."
            ),
            view=None,
        )


def forget_view(user_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(ForgetButton("confirm", user_id))
    view.add_item(ForgetButton("cancel", user_id))
    return view


class Privacy(commands.Cog):
    """What is stored, and each user's and each server's say in whether it trains the model."""

    privacy = app_commands.Group(
        name="privacy", description="What smolcord stores about you, and your choices"
    )
    learning = app_commands.Group(
        name="learning",
        description="Whether smolcord learns from the votes in this server (Manage Server)",
        guild_only=True,
        allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=False, private_channel=False),
        # A hint for Discord's client only; require_server_manager checks on our side.
        default_permissions=discord.Permissions(manage_guild=True),
    )

    def __init__(self, bot: SmolcordBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(ForgetButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(ForgetButton)

    # ------------------------------------------------------------------ /privacy

    @privacy.command(name="info", description="What smolcord stores, why, for how long, and your choices")
    async def info(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        settings = self.bot.settings
        async with self.bot.sessions() as session:
            status = await consent_service.get_user_status(session, user_id=interaction.user.id)
        consent = None
        if interaction.guild_id is not None:
            async with self.bot.sessions() as session:
                consent = await consent_service.get_guild_settings(
                    session, settings=settings, guild_id=interaction.guild_id
                )
        await interaction.followup.send(
            info_text(settings.retention_days, status, consent, grace_days=settings.guild_grace_days),
            ephemeral=True,
        )

    @privacy.command(name="opt-out", description="Keep your questions and votes out of training from now on")
    async def opt_out(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with self.bot.sessions() as session:
            changed = await consent_service.opt_out(session, user_id=interaction.user.id)
        if changed:
            text = (
                "Done: from now on your questions and votes never reach training, in any server. They are "
                f"still stored for follow-ups, 🔁 and 🗑️ (for {self.bot.settings.retention_days} days); "
                "`/privacy forget-me` deletes them now, `/privacy opt-in` undoes this."
            )
        else:
            text = "Your questions and votes are kept out of training already (`/privacy opt-in` undoes it)."
        await interaction.followup.send(text, ephemeral=True)

    @privacy.command(name="opt-in", description="Let your new questions and votes help train smolcord again")
    async def opt_in(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with self.bot.sessions() as session:
            changed = await consent_service.opt_in(session, user_id=interaction.user.id)
        if changed:
            text = (
                "Done: your new questions and votes may help train smolcord, in servers whose admins "
                "turned learning on (never in DMs). What you asked while opted out stays out."
            )
        else:
            text = "You had not opted out: nothing changed."
        await interaction.followup.send(text, ephemeral=True)

    @privacy.command(name="forget-me", description="Delete everything smolcord stored of yours (asks first)")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(
            "This deletes every question you asked me, my answers to them, their images and your votes, "
            "in every server and in DMs, now. It cannot be undone. Afterwards nothing new of yours is used "
            "for training unless you run `/privacy opt-in`.",
            view=forget_view(interaction.user.id),
            ephemeral=True,
        )

    # ------------------------------------------------------------------ /learning

    @learning.command(
        name="on", description="Let smolcord learn from the votes on its answers in this server"
    )
    @app_commands.check(require_server_manager)
    async def learning_on(self, interaction: discord.Interaction) -> None:
        await self._set_learning(interaction, enabled=True)

    @learning.command(name="off", description="Keep everything from this server out of training")
    @app_commands.check(require_server_manager)
    async def learning_off(self, interaction: discord.Interaction) -> None:
        await self._set_learning(interaction, enabled=False)

    @learning.command(
        name="voter-role", description="Count only this role's votes for training (none: everyone's)"
    )
    @app_commands.describe(role="Members whose votes count; leave empty to count everyone's again")
    @app_commands.check(require_server_manager)
    async def voter_role(self, interaction: discord.Interaction, role: discord.Role | None = None) -> None:
        assert interaction.guild_id is not None  # guild_only, and require_server_manager checked it
        await interaction.response.defer(thinking=True)
        role_id = None if role is None or role.is_default() else role.id
        async with self.bot.sessions() as session:
            await consent_service.set_voter_role(
                session, settings=self.bot.settings, guild_id=interaction.guild_id, role_id=role_id
            )
        log.info(
            "guild %s voter role set to %s by user %s", interaction.guild_id, role_id, interaction.user.id
        )
        if role_id is None:
            text = "From now on everyone's 👍/👎 count for training in this server."
        else:
            text = (
                f"From now on only the votes of members with <@&{role_id}> count for training in this server."
            )
        await interaction.followup.send(text)

    async def _set_learning(self, interaction: discord.Interaction, *, enabled: bool) -> None:
        assert interaction.guild_id is not None
        # Public on purpose: members should see when their server starts or stops training the model.
        await interaction.response.defer(thinking=True)
        async with self.bot.sessions() as session:
            await consent_service.set_learning(
                session, settings=self.bot.settings, guild_id=interaction.guild_id, enabled=enabled
            )
        log.info("guild %s learning %s by user %s", interaction.guild_id, enabled, interaction.user.id)
        if enabled:
            text = (
                "Learning is now **on** in this server: questions asked here from now on, and the 👍/👎 on my "
                "answers, may be used to train me (nightly). Anyone can keep theirs out with "
                "`/privacy opt-out`; `/privacy info` says what is stored and for how long."
            )
        else:
            text = (
                "Learning is now **off** in this server: nothing from here reaches training any more, "
                "including what was recorded while it was on."
            )
        await interaction.followup.send(text)


def info_text(
    retention_days: int,
    status: str | None,
    consent: consent_service.GuildConsent | None,
    *,
    grace_days: int = 7,
) -> str:
    """`/privacy info`: what is stored, why, for how long, and where this user and server stand."""
    if status == consent_service.FORGOTTEN:
        yours = "you asked to be forgotten: what you had was deleted, and nothing new of yours trains me"
    elif status == consent_service.OPTED_OUT:
        yours = "you opted out: nothing of yours reaches training"
    else:
        yours = "you have not opted out"
    if consent is None:
        here = "this is a DM: nothing from DMs ever reaches training"
    elif consent.learning:
        here = "learning is **on** in this server"
    else:
        here = "learning is **off** in this server: nothing from here reaches training"
    return (
        "**What smolcord stores**\n"
        "• your questions to me and the images attached to them (re-encoded, metadata such as location "
        "removed), my answers, and which Discord messages they are; a reply to me also keeps the earlier "
        "messages of its chain that I was shown, with who wrote each;\n"
        "• the 👍 / 👎 / 🔁 reactions on my answers (who reacted with what).\n"
        "**Why**\n"
        "• to follow up when you reply to me, to answer 🔁 and 🗑️, and to delete what belongs to a "
        "message when it is deleted;\n"
        "• only where a server's admins turned learning on (`/learning`): to train me nightly from the "
        "votes. DMs never do, nor anything of users who opted out.\n"
        f"**How long**: {retention_days} days, then it is deleted automatically. Deleting your message deletes "
        "what was stored of it, and every reply that quoted it (someone else's too: the whole reply, since "
        "my answers to it were written from your words); forget-me and the expiry reach those replies "
        "the same way. A reply quoting you never trains me unless you and your server allow it. A deleted "
        "channel or thread takes its data along; if I am removed from this server, its data is deleted "
        f"after {grace_days} days unless I am invited back first.\n"
        f"**You**: {yours}; **here**: {here}.\n"
        "`/privacy opt-out` keeps your data out of training, `/privacy opt-in` lets it back in, "
        "`/privacy forget-me` deletes everything of yours now."
    )


async def setup(bot: SmolcordBot) -> None:
    await bot.add_cog(Privacy(bot))
