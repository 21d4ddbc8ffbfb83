"""Per-user cooldowns, bounds on answers in flight, 🔁 quotas, and the per-channel edit pace."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable, Hashable


class Cooldown:
    """At most one question per user every `seconds`."""

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._last: dict[int, float] = {}

    def retry_after(self, user_id: int) -> float:
        """0 and counts this use when the user may ask now, else the seconds left."""
        now = self._clock()
        last = self._last.get(user_id)
        if last is not None and now - last < self.seconds:
            return self.seconds - (now - last)
        self._last[user_id] = now
        if len(self._last) > 10_000:  # forget old entries so the map stays small on big servers
            self._last = {u: t for u, t in self._last.items() if now - t < self.seconds}
        return 0.0

    def reset(self, user_id: int) -> None:
        """Give the use back (the answer failed before it started)."""
        self._last.pop(user_id, None)


class HourlyQuota:
    """At most `per_hour` uses per user in any sliding hour."""

    def __init__(self, per_hour: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_hour = per_hour
        self._clock = clock
        self._uses: dict[int, deque[float]] = defaultdict(deque)

    def take(self, user_id: int) -> bool:
        """Count a use now, if the user has one left in the last hour."""
        uses = self._recent(user_id)
        if len(uses) >= self.per_hour:
            return False
        uses.append(self._clock())
        return True

    def used(self, user_id: int) -> int:
        """Uses in the last hour."""
        return len(self._recent(user_id))

    def give_back(self, user_id: int) -> None:
        """Undo the latest use (it turned out not to be one: nothing was asked of the model)."""
        uses = self._uses.get(user_id)
        if uses:
            uses.pop()

    def _recent(self, user_id: int) -> deque[float]:
        now = self._clock()
        uses = self._uses[user_id]
        while uses and now - uses[0] >= 3600:
            uses.popleft()
        return uses


class InflightLimit:
    """At most `limit` answers being generated per key (a guild, a DM user, or one key for everything)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count: dict[Hashable, int] = defaultdict(int)

    def try_acquire(self, key: Hashable) -> bool:
        if self._count[key] >= self.limit:
            return False
        self._count[key] += 1
        return True

    def held(self, key: Hashable) -> int:
        """Answers in flight under `key` now."""
        return self._count.get(key, 0)

    def release(self, key: Hashable) -> None:
        left = self._count[key] - 1
        if left > 0:
            self._count[key] = left
        else:  # forget idle keys: one per DM user would otherwise pile up
            self._count.pop(key, None)


class ChannelPacer:
    """One message edit per `interval` seconds per channel, shared by every answer streaming there.

    Discord rate-limits edits per channel; pacing here keeps streaming smooth instead of
    bursting into 429s.
    """

    def __init__(self, interval: float = 1.5, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next: dict[int, float] = {}
        self._locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def turn(self, channel_id: int) -> None:
        """Wait until this channel may be edited again, and take the slot."""
        async with self._locks[channel_id]:
            wait = self._next.get(channel_id, 0.0) - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next[channel_id] = self._clock() + self.interval
