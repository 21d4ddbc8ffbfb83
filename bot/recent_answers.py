"""The answers the bot posted lately, kept in recent_answers.json to reconcile their votes after a restart."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from bot.json_files import read_json, write_json

__all__ = ["RecentAnswers"]

log = logging.getLogger(__name__)


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
        self._entries: list[dict[str, Any]] = list(read_json(path, []))
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
            write_json(self.path, self._entries)
            return
        if self._saving is None or self._saving.done():
            self._saving = loop.create_task(self._save(), name="smolcord-recent-answers")

    async def _save(self) -> None:
        while self._dirty:
            self._dirty = False
            snapshot = list(self._entries)  # the entries themselves are never changed in place
            try:
                await asyncio.to_thread(write_json, self.path, snapshot)
            except OSError as exc:  # a full disk must not break answering: reconciling is best effort
                log.warning("could not write %s (%s)", self.path.name, type(exc).__name__)

    def _fresh(self) -> list[dict[str, Any]]:
        cutoff = time.time() - self.max_age_s
        return [e for e in self._entries if e.get("at", 0) >= cutoff]
