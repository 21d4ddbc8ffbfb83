"""The learning loop's bot half: the nightly training run, `/smolcord retrain`'s runs, and the daily purge."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands, tasks

from bot.nightly import nightly_time, should_train, training_readiness
from bot.rollout import RolloutOutcome, decide_canary
from bot.training_runner import RunInProgress, RunResult, TrainingProgress, TrainingRunner
from feedback.store.deletion import purge_expired
from smolcord.registry import RegistryError
from smolcord.trainlock import training_running

if TYPE_CHECKING:
    from bot.app import SmolcordBot

log = logging.getLogger(__name__)

PROGRESS_EDIT_INTERVAL_S = 2.0  # Discord allows 5 edits per 5 s per channel; answers stream there too
REPORT_NAME = "report.png"
_VERDICT_MARK = {
    "promoted": "✅",
    "canary": "🐤",  # passed the gate: a share of users get it until their votes decide
    "rejected": "❌",
    "skipped": "⏭️",
    "dry-run": "🔍",
    "already-running": "⏳",
    "no-gpu-memory": "⚠️",
    "failed": "⚠️",
}


class ProgressMessage:
    """A channel message (not the interaction's, whose token expires after 15 minutes) edited with progress."""

    def __init__(self, message: discord.Message, title: str) -> None:
        self.message = message
        self.title = title
        self._last_edit = 0.0

    async def update(self, progress: TrainingProgress) -> None:
        now = time.monotonic()
        if now - self._last_edit < PROGRESS_EDIT_INTERVAL_S and progress.step != progress.total:
            return
        self._last_edit = now
        await self.message.edit(content=f"{self.title}\n{describe_progress(progress)}")

    async def finish(self, content: str, report: discord.File | None) -> None:
        attachments = [report] if report is not None else []
        await self.message.edit(content=content, attachments=attachments)


def describe_progress(progress: TrainingProgress) -> str:
    of = f"/{progress.total}" if progress.total else ""
    loss = f" · loss {progress.loss:.4f}" if progress.loss is not None else ""
    return f"step {progress.step}{of}{loss}"


def describe_result(result: RunResult) -> str:
    """The verdict in a few lines for Discord (the gate's numbers when there are some)."""
    record = result.record
    lines = [f"{_VERDICT_MARK.get(result.verdict, '•')} **{result.verdict}**: {result.message}"]
    accuracy, current = record.get("heldout_accuracy"), record.get("current_accuracy")
    if isinstance(accuracy, int | float):
        against = f" against {current:.3f} for current" if isinstance(current, int | float) else ""
        pairs = record.get("heldout_pairs")
        over = f" over {pairs} held-out pairs" if pairs is not None else ""
        lines.append(f"held-out preference accuracy {accuracy:.3f}{against}{over}")
    if record.get("current") is not None or result.verdict in ("promoted", "canary", "rejected"):
        lines.append(f"served now: {record.get('current') or 'the base model'}")
    if record.get("worker"):
        lines.append(str(record["worker"]))
    return "\n".join(lines)[:1900]


class Training(commands.Cog):
    """Runs the training job (one at a time) at night and on request, and purges expired data daily."""

    def __init__(self, bot: SmolcordBot) -> None:
        self.bot = bot
        self.runner = TrainingRunner(bot.settings)
        self.last_canary: RolloutOutcome | None = None  # the nightly run's last canary decision
        self._tasks: set[asyncio.Task[Any]] = set()
        self._purge_work: asyncio.Future[int] | None = None

    async def cog_load(self) -> None:
        at = nightly_time(self.bot.settings)
        if at is not None:
            self.nightly.change_interval(time=at)
            self.nightly.start()
        self.daily_purge.start()

    async def cog_unload(self) -> None:
        loops = [task for task in (self.nightly.get_task(), self.daily_purge.get_task()) if task]
        self.nightly.cancel()
        self.daily_purge.cancel()
        # A purge in flight is one short transaction: let it commit rather than cut it mid-write, and
        # wait for the loops to unwind before the caller closes the store under them (a cancelled
        # session left cleaning up on a closed engine would wait forever).
        if self._purge_work is not None and not self._purge_work.done():
            await asyncio.wait({self._purge_work}, timeout=30)
        pending = [task for task in loops if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=10)
        for task in list(self._tasks):
            task.cancel()  # the runner stops its child process
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ nightly

    @tasks.loop(time=dt.time(3, 0, tzinfo=dt.UTC))  # replaced by SMOLCORD_TRAIN_AT in cog_load
    async def nightly(self) -> None:
        await self.nightly_run()

    async def nightly_run(self) -> RunResult | None:
        """Train when enough new and held-out pairs exist; returns the run's result, None when skipped."""
        try:
            if self.runner.busy:
                log.info("nightly run skipped: a run started from Discord is still going")
                return None
            # A running canary is decided first: until its live votes decide, nothing new is trained.
            canary = await decide_canary(
                settings=self.bot.settings,
                registry=self.bot.registry,
                sessions=self.bot.sessions,
                worker=self.bot.worker,
            )
            if canary is not None:
                self.bot.answerer.router.forget()
                self.last_canary = canary
                if canary.decision == "waiting":
                    log.info("nightly run skipped: the canary of %s is waiting", canary.candidate)
                    return None
                log.info("nightly canary decision: %s", canary.message)
            readiness = await training_readiness(self.bot.sessions, self.bot.settings)
            go, why = should_train(readiness)
            if not go:
                log.info("nightly run skipped: %s", why)
                return None
            log.info("nightly run starting: %s", why)
            result = await self.runner.run()
            log.info(
                "nightly run ended: %s (exit %s) %s", result.verdict, result.exit_code, result.version or ""
            )
            return result
        except RunInProgress:
            return None
        except Exception:  # an exception would stop the loop for good
            log.exception("nightly run failed")
            return None

    # ------------------------------------------------------------------ purge

    @tasks.loop(hours=24)
    async def daily_purge(self) -> None:
        await self.purge()

    @daily_purge.before_loop
    async def _purge_after_ready(self) -> None:
        await self.bot.wait_until_ready()  # `smolcord sync` logs in but never connects: no purge there

    async def purge(self) -> int:
        """Delete what is older than SMOLCORD_RETENTION_DAYS; returns how many prompts went."""
        # shielded: stopping the bot waits for this transaction instead of cancelling it (cog_unload)
        self._purge_work = asyncio.ensure_future(self._purge_once())
        return await asyncio.shield(self._purge_work)

    async def _purge_once(self) -> int:
        try:
            async with self.bot.sessions() as session:
                deletion = await purge_expired(session, settings=self.bot.settings)
        except Exception:
            log.exception("purging expired data failed")
            return 0
        return len(deletion.prompt_ids)

    # ------------------------------------------------------------------ on request

    async def start_from_command(self, interaction: discord.Interaction, *, dry_run: bool) -> str:
        """Start a run for `/smolcord retrain` (already deferred); returns what to tell the admin."""
        if self.runner.busy:
            return "A training run is already going; wait for its verdict."
        if training_running(self.bot.settings.locks_dir):
            return "A training run (started outside the bot) holds the training lock; try again when it ends."
        kind = "Dry run" if dry_run else "Training run"
        title = f"🏋️ **{kind}** requested by {interaction.user.mention}"
        channel = interaction.channel
        message: discord.Message | None = None
        if isinstance(channel, discord.abc.Messageable):
            try:
                message = await channel.send(f"{title}\nstarting…")
            except discord.HTTPException as exc:
                log.warning(
                    "cannot post training progress in channel %s (%s)", interaction.channel_id, exc.status
                )
        if message is None:  # no right to post there: a follow-up works too, for 15 minutes
            message = await interaction.followup.send(f"{title}\nstarting…", wait=True)
        progress = ProgressMessage(message, title)
        task = asyncio.create_task(self._run_and_report(progress, dry_run), name="smolcord-retrain")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return f"Started: progress and verdict in {message.jump_url}"

    async def _run_and_report(self, progress: ProgressMessage, dry_run: bool) -> None:
        try:
            result = await self.runner.run(dry_run=dry_run, on_progress=progress.update)
            content = f"{progress.title}\n{describe_result(result)}"
            report = self._report_file(result)
        except RunInProgress:
            content, report = f"{progress.title}\n⏳ another run is still going", None
        except Exception as exc:
            log.exception("the training job could not be run")
            content, report = (
                f"{progress.title}\n⚠️ the training job could not be run ({type(exc).__name__})",
                None,
            )
        try:
            await progress.finish(content, report)
        except discord.HTTPException as exc:
            log.warning("could not post the training verdict (%s)", exc.status)

    def _report_file(self, result: RunResult) -> discord.File | None:
        """The new version's report.png, looked up through the registry (the job wrote it there)."""
        if result.version is None:
            return None
        try:
            path = self.bot.registry.path(result.version) / REPORT_NAME
        except RegistryError:
            return None
        if not path.is_file():
            return None
        return discord.File(path, filename=f"{result.version}-{REPORT_NAME}")


async def setup(bot: SmolcordBot) -> None:
    await bot.add_cog(Training(bot))
