"""Small JSON files in the data dir the bot keeps for itself: consent notices posted, recent answers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PRIVACY_HINT = "`/privacy info` says what is kept and for how long."


def consent_text(*, in_dm: bool, learning: bool) -> str:
    """What the bot says, once per channel, about what it keeps and whether it learns from it."""
    kept = "ℹ️ I keep questions, answers and votes so that follow-ups, 🔁 and 🗑️ work."
    if in_dm:
        return f"{kept} DMs never train the model. {PRIVACY_HINT} `/privacy forget-me` deletes it all."
    if learning:
        return (
            f"{kept} Learning is **on** in this server: 👍 / 👎 here may train the next version of the "
            f"model. To keep yours out, use `/privacy opt-out`. {PRIVACY_HINT}"
        )
    return (
        f"{kept} Learning is **off** in this server: nothing here trains the model. "
        f"If its admins turn it on (`/learning`), you can still keep yours out with `/privacy opt-out`. "
        f"{PRIVACY_HINT}"
    )


def notice_state(*, in_dm: bool, learning: bool) -> str:
    """What a channel's notice said about learning: "dm", "on" or "off" (a change means telling again)."""
    return "dm" if in_dm else ("on" if learning else "off")


def _write_json(path: Path, data: Any) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s)", path.name, type(exc).__name__)
        return default


class ConsentNotices:
    """The learning state each channel's consent notice last stated (in memory, and in the data dir across restarts).

    The file is written off the event loop, one write at a time, each with the latest state.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        stored = _read_json(path, {})
        # A list is the older file (channels told, state not recorded): told again once.
        self._told: dict[int, str] = (
            {int(channel): str(state) for channel, state in stored.items()}
            if isinstance(stored, dict)
            else {}
        )
        self._writing = asyncio.Lock()

    def due(self, channel_id: int, state: str) -> bool:
        """Whether this channel has not been told this state yet (never told, or learning changed since)."""
        return self._told.get(channel_id) != state

    async def mark(self, channel_id: int, state: str) -> None:
        self._told[channel_id] = state
        async with self._writing:
            snapshot = {str(channel): told for channel, told in sorted(self._told.items())}
            await asyncio.to_thread(_write_json, self.path, snapshot)


class RecentAnswers:
    """The last answers the bot posted, so that it can reconcile their reactions after being offline.

    The store has the messages and votes; this only remembers which responses are recent. The file
    is written off the event loop, by one writer at a time that always writes the latest list (a
    burst of answers costs one or two writes, never a write each on the loop).
    """

    def __init__(self, path: Path, *, keep: int = 200, max_age_s: float = 24 * 3600) -> None:
        self.path = path
        self.keep = keep
        self.max_age_s = max_age_s
        self._entries: list[dict[str, Any]] = list(_read_json(path, []))
        self._dirty = False
        self._saving: asyncio.Task[None] | None = None

    def add(self, *, response_id: int, channel_id: int, guild_id: int | None) -> None:
        entry = {
            "response_id": response_id,
            "channel_id": channel_id,
            "guild_id": guild_id,
            "at": time.time(),
        }
        self._entries = [*self._fresh(), entry][-self.keep :]
        self._save_soon()

    def recent(self) -> list[dict[str, Any]]:
        """Entries younger than max_age_s, newest first."""
        return list(reversed(self._fresh()))

    def forget(self, response_ids: set[int]) -> None:
        if response_ids:
            self._entries = [e for e in self._entries if e["response_id"] not in response_ids]
            self._save_soon()

    async def flush(self) -> None:
        """Wait until the file holds the latest list (the bot calls this on its way out)."""
        while self._saving is not None and not self._saving.done():
            await asyncio.shield(self._saving)

    def _save_soon(self) -> None:
        self._dirty = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script, a test): write now
            self._dirty = False
            _write_json(self.path, self._entries)
            return
        if self._saving is None or self._saving.done():
            self._saving = loop.create_task(self._save(), name="smolcord-recent-answers")

    async def _save(self) -> None:
        while self._dirty:
            self._dirty = False
            snapshot = list(self._entries)  # the entries themselves are never changed in place
            try:
                await asyncio.to_thread(_write_json, self.path, snapshot)
            except OSError as exc:  # a full disk must not break answering: reconciling is best effort
                log.warning("could not write %s (%s)", self.path.name, type(exc).__name__)

    def _fresh(self) -> list[dict[str, Any]]:
        cutoff = time.time() - self.max_age_s
        return [e for e in self._entries if e.get("at", 0) >= cutoff]
