"""What the bot says about consent, once per channel, and which channels it has told (consent_notices.json)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.json_files import read_json, write_json

__all__ = ["PRIVACY_HINT", "ConsentNotices", "consent_text", "notice_state"]

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


class ConsentNotices:
    """The learning state each channel's consent notice last stated (in memory, and in the data dir across restarts).

    The file is written off the event loop, one write at a time, each with the latest state.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        stored = read_json(path, {})
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
            await asyncio.to_thread(write_json, self.path, snapshot)
