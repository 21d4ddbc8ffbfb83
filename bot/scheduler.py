"""When the bot trains, and how: the nightly decision, and the training job run as a child process.

The job is `python -m smolcord train --progress json` (feedback/train.py): it writes JSON lines on
stdout, `{"step", "total", "loss"}` after each optimizer step and one final line with "verdict",
"exit_code" and "message" (and, after training, "version", "report", "heldout_accuracy", ...). It
runs in its own process so the bot and the worker keep serving, and it tells the worker itself
when it promotes. The child gets the bot's settings through its environment (the Discord token
left out, and no `.env` read), so both read one data dir, one store and one registry.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from feedback.store.stats import PairCounts, StoreStats, count_pairs
from smolcord.settings import ENV_FILE_VARIABLE, Settings

__all__ = [
    "TRAIN_COMMAND",
    "RunInProgress",
    "RunResult",
    "TrainingProgress",
    "TrainingReadiness",
    "TrainingRunner",
    "child_env",
    "next_nightly_run",
    "nightly_time",
    "should_train",
    "training_readiness",
]

log = logging.getLogger(__name__)

TRAIN_COMMAND: tuple[str, ...] = (sys.executable, "-m", "smolcord", "train", "--progress", "json")
# After SIGTERM the job unwinds (removes its staged version, releases its lock); this is how long
# it gets before SIGKILL, which the registry's and the lock's flocks also survive.
TERMINATE_GRACE_S = 15.0
_STDOUT_LINE_LIMIT = 1 << 20  # the final line carries the data summary: more than asyncio's 64 KiB default


# ------------------------------------------------------------------------------ when


def nightly_time(settings: Settings) -> dt.time | None:
    """SMOLCORD_TRAIN_AT as an aware UTC time, None when the nightly run is off."""
    if settings.train_at is None:
        return None
    hour, minute = (int(part) for part in settings.train_at.split(":"))
    return dt.time(hour, minute, tzinfo=dt.UTC)


def next_nightly_run(settings: Settings, now: dt.datetime | None = None) -> dt.datetime | None:
    """When the nightly check fires next (UTC), None when it is off."""
    at = nightly_time(settings)
    if at is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    today = dt.datetime.combine(now.date(), at)
    return today if today > now else today + dt.timedelta(days=1)


@dataclass(frozen=True)
class TrainingReadiness:
    """What the nightly decision looks at: pairs now, those no successful run used yet, and held-out ones."""

    pairs: int
    new_pairs: int
    heldout_pairs: int
    min_new_pairs: int
    min_heldout: int

    @classmethod
    def of(cls, counts: PairCounts | StoreStats, settings: Settings) -> TrainingReadiness:
        """The readiness those counts mean under these settings."""
        return cls(
            pairs=counts.pairs,
            new_pairs=counts.new_pairs,
            heldout_pairs=counts.heldout_pairs,
            min_new_pairs=settings.min_new_pairs,
            min_heldout=settings.gate_min_heldout,
        )

    @property
    def new_pairs_needed(self) -> int:
        return max(0, self.min_new_pairs - self.new_pairs)

    @property
    def heldout_needed(self) -> int:
        return max(0, self.min_heldout - self.heldout_pairs)


async def training_readiness(
    sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> TrainingReadiness:
    """Count the pairs a run would find now (every consent rule applied) and their held-out split.

    Counted in SQL (feedback.store.stats), never built: this runs on the bot's event loop. The count is
    taken before the voter-share cap, which only the training job applies.
    """
    async with sessions() as session:
        counts = await count_pairs(session, settings=settings)
    return TrainingReadiness.of(counts, settings)


def should_train(readiness: TrainingReadiness) -> tuple[bool, str]:
    """Whether the nightly run trains, and why (or why not), in words for the log."""
    missing = []
    if readiness.new_pairs_needed:
        missing.append(
            f"{readiness.new_pairs} new pairs of the {readiness.min_new_pairs} needed (SMOLCORD_MIN_NEW_PAIRS)"
        )
    if readiness.heldout_needed:
        missing.append(
            f"{readiness.heldout_pairs} held-out pairs of the {readiness.min_heldout} needed "
            "(SMOLCORD_GATE_MIN_HELDOUT)"
        )
    if missing:
        return False, "only " + " and ".join(missing)
    return True, f"{readiness.new_pairs} new pairs, {readiness.heldout_pairs} held out"


# ------------------------------------------------------------------------------ the child process


def _env_value(name: str, value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if value is None:
        return "off" if name == "train_at" else ""  # blank reads as unset for the optional settings
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def child_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a training job: the bot's own settings, spelled out, without the Discord token."""
    env = dict(os.environ if base is None else base)
    for key in ("DISCORD_TOKEN", "SMOLCORD_DISCORD_TOKEN"):
        env.pop(key, None)
    for name, value in settings.model_dump().items():
        if name != "discord_token":
            env[f"SMOLCORD_{name.upper()}"] = _env_value(name, value)
    # Absolute, so a child started elsewhere still finds the same store and registry.
    env["SMOLCORD_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    env["SMOLCORD_DATABASE_URL"] = settings.db_url
    # Every setting is spelled out above: the job reads no `.env`, where DISCORD_TOKEN usually is.
    env[ENV_FILE_VARIABLE] = "off"
    return env


@dataclass(frozen=True)
class TrainingProgress:
    step: int
    total: int
    loss: float | None


@dataclass(frozen=True)
class RunResult:
    """How a run ended: the final JSON line's verdict, exit code and message (and the whole line)."""

    verdict: str
    exit_code: int
    message: str
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str | None:
        version = self.record.get("version")
        return str(version) if version else None


class RunInProgress(RuntimeError):
    """This bot is running a training job already."""


ProgressCallback = Callable[[TrainingProgress], Awaitable[None]]


class TrainingRunner:
    """Runs the training job one at a time and reads its progress; cancelling a run stops the child."""

    def __init__(self, settings: Settings, command: Sequence[str] = TRAIN_COMMAND) -> None:
        self.settings = settings
        self.command = list(command)
        self._lock = asyncio.Lock()
        self.started_at: float | None = None  # time.monotonic() of the running job
        self.last_progress: TrainingProgress | None = None

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def run(self, *, dry_run: bool = False, on_progress: ProgressCallback | None = None) -> RunResult:
        """Run the job to its end; RunInProgress if this runner is running one already."""
        if self._lock.locked():
            raise RunInProgress("a training run started by this bot is still running")
        async with self._lock:
            self.started_at, self.last_progress = time.monotonic(), None
            try:
                return await self._run(dry_run, on_progress)
            finally:
                self.started_at = None

    async def _run(self, dry_run: bool, on_progress: ProgressCallback | None) -> RunResult:
        argv = [*self.command, *(["--dry-run"] if dry_run else [])]
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(self.settings),
            limit=_STDOUT_LINE_LIMIT,
        )
        log.info("training job started (pid %s%s)", process.pid, ", dry run" if dry_run else "")
        final: dict[str, Any] = {}
        stderr_tail: collections.deque[str] = collections.deque(maxlen=12)

        async def read_stdout() -> None:
            assert process.stdout is not None
            async for raw in process.stdout:
                record = _json_line(raw)
                if record is None:
                    continue
                if "verdict" in record:
                    final.clear()
                    final.update(record)
                elif "step" in record:
                    progress = _progress(record)
                    if progress is not None:
                        self.last_progress = progress
                        if on_progress is not None:
                            await _call_safely(on_progress, progress)

        async def read_stderr() -> None:
            assert process.stderr is not None
            async for raw in process.stderr:  # drained, or a chatty child would block on a full pipe
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    stderr_tail.append(line)

        try:
            await asyncio.gather(read_stdout(), read_stderr())
            code = await process.wait()
        except BaseException:  # cancelled (the bot is stopping) or broken: do not leave the job behind
            await _stop(process)
            raise
        log.info("training job %s exited with %s: %s", process.pid, code, final.get("verdict", "no verdict"))
        if final:
            return RunResult(
                verdict=str(final.get("verdict")),
                exit_code=int(final.get("exit_code", code)),
                message=str(final.get("message", "")),
                record=final,
            )
        last = stderr_tail[-1] if stderr_tail else "no output"
        return RunResult(
            verdict="failed",
            exit_code=code if code else 1,
            message=f"the training job exited with code {code} without a verdict ({last[:300]})",
            record={"stderr": list(stderr_tail)},
        )


def _json_line(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _progress(record: dict[str, Any]) -> TrainingProgress | None:
    try:
        loss = record.get("loss")
        return TrainingProgress(
            step=int(record["step"]),
            total=int(record.get("total") or 0),
            loss=None if loss is None else float(loss),
        )
    except (TypeError, ValueError):
        return None


async def _call_safely(callback: ProgressCallback, progress: TrainingProgress) -> None:
    """A progress report that fails (Discord unreachable, say) must not stop reading the job."""
    try:
        await callback(progress)
    except Exception:
        log.warning("reporting training progress failed", exc_info=True)


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    log.warning("stopping training job %s", process.pid)
    try:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), TERMINATE_GRACE_S)
        except TimeoutError:
            process.kill()
            await process.wait()
    except ProcessLookupError:
        pass
