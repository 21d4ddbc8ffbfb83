"""`smolcord run`: migrate, start the worker, wait until it is ready, start the bot, and stop both in order.

Both parts run as child processes of this one (`python -m smolcord worker` and `python -m smolcord
bot`), each in a process group of its own, so that a Ctrl-C in the terminal reaches only this
supervisor, which then stops them in order: the bot first (it closes its gateway, lets the vote
and answer handlers still running finish their writes and stops a training run it started, which
unwinds by itself), then the worker. A child that dies takes the other down, and `run` exits
non-zero saying which one died. No event loop runs here: the migration needs none to be running,
and the readiness check is a plain HTTP GET of /v1/models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = ["BOT_COMMAND", "WORKER_COMMAND", "Readiness", "Supervisor", "probe_worker", "run"]

log = logging.getLogger("smolcord.run")

WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "smolcord", "worker")
BOT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "smolcord", "bot")

POLL_S = 0.5
PROGRESS_EVERY_S = 10.0
# The bot may be stopping a training run (its grace is 15 s) and finishing handlers (10 s).
BOT_STOP_GRACE_S = 30.0
WORKER_STOP_GRACE_S = 15.0
_PR_SET_PDEATHSIG = 1


def run(settings: Settings) -> int:
    """The `smolcord run` command: token check (MissingDiscordToken), migration, then the two children."""
    settings.require_discord_token()  # the bot child would fail without it: say so before migrating
    from feedback.store.db import upgrade_to_head

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.db_url)  # before any event loop: Alembic runs one of its own
    token = settings.worker_token.get_secret_value() if settings.worker_token else None
    return Supervisor(settings.worker_url, model=settings.model, worker_token=token).run()


# ------------------------------------------------------------------------------ readiness


@dataclass(frozen=True)
class Readiness:
    """What GET /v1/models said: `ready`, `warming` (503), `down` (no answer) or `error` (another status)."""

    state: str
    detail: str


def probe_worker(url: str, timeout: float = 2.0, *, token: str | None = None) -> Readiness:
    """One readiness check of the worker at `url` (no proxy: the worker is local), with its token when set."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url.rstrip("/") + "/v1/models")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=timeout) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return Readiness("warming", "503: still loading")
        if exc.code in (401, 403):
            return Readiness("error", f"HTTP {exc.code}: the worker wants another SMOLCORD_WORKER_TOKEN")
        return Readiness("error", f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Readiness("down", str(reason))
    try:
        served = body["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        return Readiness("error", "its /v1/models lists no model")
    return Readiness("ready", str(served))


def _listening(url: str) -> bool:
    """Whether anything accepts connections at the host and port of `url`."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ the children


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if this supervisor dies without stopping it (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Supervisor:
    """Starts the worker, waits for its readiness, starts the bot, watches both, stops them in order."""

    def __init__(
        self,
        worker_url: str,
        *,
        model: str = "",
        worker_token: str | None = None,
        worker_command: Sequence[str] = WORKER_COMMAND,
        bot_command: Sequence[str] = BOT_COMMAND,
        env: Mapping[str, str] | None = None,
        poll_s: float = POLL_S,
        bot_grace_s: float = BOT_STOP_GRACE_S,
        worker_grace_s: float = WORKER_STOP_GRACE_S,
    ) -> None:
        self.worker_url = worker_url
        self.model = model
        self.worker_token = worker_token  # sent by the readiness probe (the worker requires it when set)
        self.worker_command = list(worker_command)
        self.bot_command = list(bot_command)
        self.env = dict(os.environ if env is None else env)
        self.poll_s = poll_s
        self.bot_grace_s = bot_grace_s
        self.worker_grace_s = worker_grace_s
        self.worker: Child | None = None
        self.bot: Child | None = None
        self._stop = threading.Event()
        self._hurry = threading.Event()

    # ------------------------------------------------------------------ public

    def run(self) -> int:
        """Run until stopped (0) or until a child dies (1); both children are gone when it returns."""
        with self._signals():
            try:
                code = self._run()
            finally:
                clean = self._stop_children()
        if code == 0 and not clean:
            log.error("a child had to be killed: see the log above")
            return 1
        return code

    def request_stop(self, reason: str = "asked to stop") -> None:
        """Stop both children (bot first); a second request stops them without waiting."""
        if self._stop.is_set():
            log.warning("%s again: killing what is still running", reason)
            self._hurry.set()
        else:
            log.info("%s: stopping the bot, then the worker", reason)
        self._stop.set()

    # ------------------------------------------------------------------ steps

    def _run(self) -> int:
        if _listening(self.worker_url):
            log.error(
                "something already listens at %s: stop it, or point SMOLCORD_WORKER_URL at a free port "
                "(to use a worker that runs elsewhere, run `smolcord bot` alone)",
                self.worker_url,
            )
            return 1
        worker_env = {
            k: v for k, v in self.env.items() if k not in ("DISCORD_TOKEN", "SMOLCORD_DISCORD_TOKEN")
        }
        self.worker = self._start("worker", self.worker_command, worker_env)
        if not self._wait_until_ready(self.worker):
            return 0 if self._stop.is_set() else 1
        self.bot = self._start("bot", self.bot_command, self.env)
        while not self._stop.wait(self.poll_s):
            for child, other in ((self.bot, "worker"), (self.worker, "bot")):
                code = child.poll()
                if code is not None:
                    log.error(
                        "the %s (pid %d) exited with code %s; stopping the %s too",
                        child.name,
                        child.pid,
                        code,
                        other,
                    )
                    return 1
        return 0

    def _start(self, name: str, command: Sequence[str], env: Mapping[str, str]) -> Child:
        process = subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            process_group=0,  # a terminal's Ctrl-C reaches the supervisor only: it stops them in order
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.info("started the %s (pid %d)", name, process.pid)
        return Child(name, process)

    def _wait_until_ready(self, worker: Child) -> bool:
        """Poll GET /v1/models until it answers; False when the worker died or a stop was asked for."""
        started = time.monotonic()
        last_state, last_report = "", started
        log.info("waiting for the worker at %s to load %s", self.worker_url, self.model or "its model")
        while not self._stop.is_set():
            code = worker.poll()
            if code is not None:
                log.error(
                    "the worker exited with code %s before it was ready (its log is above): check "
                    "SMOLCORD_MODEL (%s) and that the port of SMOLCORD_WORKER_URL (%s) is free",
                    code,
                    self.model or "?",
                    self.worker_url,
                )
                return False
            readiness = probe_worker(self.worker_url, token=self.worker_token)
            now = time.monotonic()
            if readiness.state == "ready":
                log.info("the worker is ready after %.0f s, serving %s", now - started, readiness.detail)
                return True
            if readiness.state != last_state or now - last_report >= PROGRESS_EVERY_S:
                state = {"down": "not listening yet", "warming": "warming up"}.get(
                    readiness.state, "not ready"
                )
                log.info(
                    "worker %s after %.0f s (GET /v1/models: %s)", state, now - started, readiness.detail
                )
                last_state, last_report = readiness.state, now
            self._stop.wait(self.poll_s)
        return False

    def _stop_children(self) -> bool:
        """The bot first (no vote is lost mid-write), then the worker; True if both stopped by themselves."""
        clean = True
        for child, grace in ((self.bot, self.bot_grace_s), (self.worker, self.worker_grace_s)):
            if child is not None:
                clean = self._stop_child(child, grace) and clean
        return clean

    def _stop_child(self, child: Child, grace: float) -> bool:
        if child.poll() is not None:
            return True
        log.info("stopping the %s (pid %d)", child.name, child.pid)
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._hurry.is_set():
            try:
                child.process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            log.info("the %s stopped (exit code %s)", child.name, child.poll())
            return True
        log.warning("the %s did not stop in %.0f s: killing it", child.name, grace)
        with contextlib.suppress(ProcessLookupError):
            child.process.kill()
        child.process.wait()
        return False

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM ask for a stop (only the main thread can take signals: tests run elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop(signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
