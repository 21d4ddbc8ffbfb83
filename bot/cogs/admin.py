"""`/smolcord status|retrain|rollback|sync|canary`: running the bot, for its owner and SMOLCORD_ADMIN_IDS only."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import require_bot_admin, require_owner
from bot.nightly import TrainingReadiness, next_nightly_run
from bot.rollout import CanaryView, canary_view, conclude_canary
from feedback.store import canary as canary_service
from feedback.store import stats as stats_service
from feedback.store.adapters import RollbackRefused, roll_back
from smolcord.registry import RegistryError
from smolcord.worker_client import WorkerDown, WorkerError

if TYPE_CHECKING:
    from bot.app import SmolcordBot
    from bot.cogs.training import Training

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0


class Admin(commands.Cog):
    """The operator's commands. Discord hides them from non-administrators (a hint only); the
    cog-wide check below is what actually keeps everyone but the bot's admins out."""

    smolcord = app_commands.Group(
        name="smolcord",
        description="Run smolcord: status, retraining, rollback, command sync (bot admins only)",
        default_permissions=discord.Permissions(administrator=True),
    )
    canary = app_commands.Group(name="canary", description="Decide the running canary now", parent=smolcord)

    def __init__(self, bot: SmolcordBot) -> None:
        self.bot = bot

    async def interaction_check(self, interaction: discord.Interaction) -> bool:  # type: ignore[override]
        # Applies to every command of this cog (discord.py runs it as a check before each).
        return await require_bot_admin(interaction)

    # ------------------------------------------------------------------ status

    @smolcord.command(
        name="status", description="Worker, adapter, data and training counts, 👍 share per version"
    )
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        health, stats, view = await asyncio.gather(self._worker_health(), self._stats(), self._canary())
        readiness = TrainingReadiness.of(stats, self.bot.settings)  # the pairs are counted once, in SQL
        text = self._status_text(health, stats, readiness, view)
        await interaction.followup.send(text, ephemeral=True)

    async def _canary(self) -> CanaryView | str | None:
        """The running canary; else a line on the last one decided (None: there never was one)."""
        try:
            view = await canary_view(
                settings=self.bot.settings, registry=self.bot.registry, sessions=self.bot.sessions
            )
        except RegistryError as exc:
            return f"the registry is unreadable ({exc})"
        if view is not None:
            return view
        async with self.bot.sessions() as session:
            last = await canary_service.canary_history(session, limit=1)
        record = last[0] if last else None
        if record is None or record.decided_at is None:
            return None
        when = discord.utils.format_dt(record.decided_at, "R")
        return (
            f"none running; the last, {record.candidate_version} against "
            f"{record.current_version or 'the base model'}, ended **{record.decision}** "
            f"(rule {record.rule}) {when}"
        )

    async def _worker_health(self) -> dict[str, Any] | str:
        try:
            return await asyncio.wait_for(self.bot.worker.health(), HEALTH_TIMEOUT_S)
        except WorkerDown:
            return f"down: nothing answers at {self.bot.settings.worker_url}"
        except TimeoutError:
            return f"no answer within {HEALTH_TIMEOUT_S:g} s"
        except WorkerError as exc:
            return f"unhealthy: {exc}"

    async def _stats(self) -> stats_service.StoreStats:
        async with self.bot.sessions() as session:
            return await stats_service.store_stats(session, settings=self.bot.settings)

    def _status_text(
        self,
        health: dict[str, Any] | str,
        stats: stats_service.StoreStats,
        readiness: TrainingReadiness,
        view: CanaryView | str | None = None,
    ) -> str:
        settings = self.bot.settings
        lines = ["**smolcord status**"]
        if isinstance(health, dict):
            lines.append(
                f"Worker: ✅ {health.get('status', '?')}, serving `{health.get('model', '?')}` "
                f"(adapter {health.get('adapter') or 'none: the base model'}), "
                f"queue {health.get('queue_depth', '?')}, {health.get('in_flight', '?')} in flight"
            )
        else:
            lines.append(f"Worker: ❌ {health}")
        try:
            current = self.bot.registry.current()
            versions = self.bot.registry.versions()
            lines.append(
                f"Adapter: current **{current or 'base model'}**; versions kept: {', '.join(versions) or 'none'}"
            )
        except RegistryError as exc:
            lines.append(f"Adapter: the registry is unreadable ({exc})")
        lines.extend(canary_lines(view, settings))
        lines.append(
            f"Store: {stats.prompts} prompts ({stats.trainable_prompts} trainable), {stats.responses} answers, "
            f"{stats.votes} votes"
        )
        lines.append(
            f"Pairs: {readiness.pairs}, of which {readiness.new_pairs} new since the last run "
            f"(nightly needs {readiness.min_new_pairs}: {readiness.new_pairs_needed} still needed) and "
            f"{readiness.heldout_pairs} held out (the gate needs {readiness.min_heldout}: "
            f"{readiness.heldout_needed} still needed)"
        )
        upcoming = next_nightly_run(settings)
        if upcoming is None:
            lines.append("Nightly run: off (SMOLCORD_TRAIN_AT)")
        else:
            stamp = int(upcoming.timestamp())
            lines.append(f"Nightly run: {settings.train_at} UTC, next <t:{stamp}:R>")
        training = self._training()
        if training is not None and training.runner.busy:
            progress = training.runner.last_progress
            step = f" (step {progress.step}/{progress.total})" if progress else ""
            lines.append(f"Training: a run is going{step}")
        if stats.last_run is not None:
            run = stats.last_run
            when = discord.utils.format_dt(run.finished_at or run.started_at, "R")
            lines.append(
                f"Last run: #{run.id} {run.method} {run.status} {when}, "
                f"adapter {run.adapter_version or 'none'}, {run.pairs} pairs ({run.heldout} held out)"
            )
        if stats.by_adapter:
            shares = []
            for votes in stats.by_adapter:
                share = votes.up_share
                percent = f"{share:.0%}" if share is not None else "n/a"
                shares.append(f"{votes.adapter_version or 'base'} {percent} ({votes.up}👍 {votes.down}👎)")
            lines.append("👍 share: " + " · ".join(shares))
        else:
            lines.append("👍 share: no votes yet")
        return "\n".join(lines)[:2000]

    # ------------------------------------------------------------------ retrain

    @smolcord.command(
        name="retrain", description="Run the training job now; progress and verdict in this channel"
    )
    @app_commands.describe(
        dry_run="Only say what it would train on (pairs, held-out, lengths); train nothing"
    )
    async def retrain(self, interaction: discord.Interaction, dry_run: bool = False) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        training = self._training()
        if training is None:
            await interaction.followup.send("Training is not loaded in this bot.", ephemeral=True)
            return
        log.info("retrain requested by user %s (dry run: %s)", interaction.user.id, dry_run)
        answer = await training.start_from_command(interaction, dry_run=dry_run)
        await interaction.followup.send(answer, ephemeral=True)

    # ------------------------------------------------------------------ rollback

    @smolcord.command(name="rollback", description="Serve an earlier adapter version again")
    @app_commands.describe(version="Version to serve (default: the newest older one the gate did not reject)")
    async def rollback(self, interaction: discord.Interaction, version: str | None = None) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send(await self._rollback(version), ephemeral=True)

    @rollback.autocomplete("version")
    async def _version_choices(
        self, interaction: discord.Interaction, typed: str
    ) -> list[app_commands.Choice[str]]:
        try:
            current, versions = self.bot.registry.current(), self.bot.registry.versions()
        except RegistryError:
            return []
        return [
            app_commands.Choice(name=f"{v} (served now)" if v == current else v, value=v)
            for v in reversed(versions)
            if typed.lower() in v
        ][:25]

    async def _rollback(self, version: str | None) -> str:
        try:
            done = await roll_back(
                settings=self.bot.settings,
                registry=self.bot.registry,
                sessions=self.bot.sessions,
                worker=self.bot.worker,
                version=version,
            )
        except RollbackRefused as exc:
            return str(exc)
        return done.describe()

    # ------------------------------------------------------------------ canary

    @canary.command(name="promote", description="Serve the canary's candidate to everyone now")
    async def canary_promote(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send(await self._decide(interaction, "promote"), ephemeral=True)

    @canary.command(name="abort", description="Drop the canary's candidate; everyone keeps current")
    async def canary_abort(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send(await self._decide(interaction, "abort"), ephemeral=True)

    async def _decide(self, interaction: discord.Interaction, decision: str) -> str:
        view = await self._canary()
        if not isinstance(view, CanaryView):
            return f"No canary is running{f': {view}' if view else ''}."
        log.info("canary %s: %s by user %s", view.candidate, decision, interaction.user.id)
        outcome = await conclude_canary(
            settings=self.bot.settings,
            registry=self.bot.registry,
            sessions=self.bot.sessions,
            worker=self.bot.worker,
            view=view,
            decision=decision,
            rule="admin",
            reason=f"decided by an admin ({view.decision.reason})",
            decided_by=interaction.user.id,
        )
        self.bot.answerer.router.forget()
        return f"{outcome.message}\n{outcome.worker}"[:2000]

    # ------------------------------------------------------------------ sync

    @smolcord.command(name="sync", description="Register the slash commands with Discord again")
    @app_commands.describe(
        globally="Sync to every server instead of the dev guild (the application owner only)"
    )
    async def sync(self, interaction: discord.Interaction, globally: bool = False) -> None:
        guild_id = self.bot.settings.dev_guild_id
        if globally or guild_id is None:
            await require_owner(interaction)  # a global sync is the owner's call (RoboDanny's admin cog)
            guild_id = None
        await interaction.response.defer(ephemeral=True, thinking=True)
        count = await self.bot.sync_commands(guild_id)
        where = (
            f"the dev guild ({guild_id})" if guild_id else "every server (global: may take a while to show)"
        )
        await interaction.followup.send(f"Synced {count} commands to {where}.", ephemeral=True)

    # ------------------------------------------------------------------ helpers

    def _training(self) -> Training | None:
        return self.bot.get_cog("Training")  # type: ignore[return-value]


def canary_lines(view: CanaryView | str | None, settings: Any) -> list[str]:
    """Both arms of a running canary for /smolcord status: versions, rated answers, 👍 share and
    its interval, and what the decision waits for."""
    if view is None:
        return [f"Canary: none running (SMOLCORD_CANARY {'on' if settings.canary else 'off'})"]
    if isinstance(view, str):
        return [f"Canary: {view}"]
    numbers = view.decision.numbers
    lines = [
        f"Canary: **{view.candidate}** for {settings.canary_share:.0%} of users in servers learning, "
        f"against {view.current or 'the base model'}, since <t:{int(view.started_at.timestamp())}:R>"
    ]
    for label, arm, key in (
        ("candidate", view.candidate_arm, "candidate"),
        ("current", view.current_arm, "current"),
    ):
        interval = numbers.get(key, {}).get("interval")
        spread = f" [{interval[0]:.0%}–{interval[1]:.0%}]" if interval else ""
        share = f"{arm.share:.0%}{spread}" if arm.share is not None else "n/a"
        lines.append(
            f"  {label} {arm.version or 'base'}: {arm.rated} rated answers "
            f"(needs {settings.canary_min_rated}), 👍 {share}"
        )
    lines.append(f"  Decision: {view.decision.decision} ({view.decision.rule}): {view.decision.reason}")
    return lines


async def setup(bot: SmolcordBot) -> None:
    await bot.add_cog(Admin(bot))
