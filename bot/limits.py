"""Per-user cooldowns, per-guild bounds on answers in flight, 🔁 quotas, and the per-channel edit pace."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable


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
        now = self._clock()
        uses = self._uses[user_id]
        while uses and now - uses[0] >= 3600:
            uses.popleft()
        if len(uses) >= self.per_hour:
            return False
        uses.append(now)
        return True


class InflightLimit:
    """At most `limit` answers being generated per guild (DMs share key 0)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count: dict[int, int] = defaultdict(int)

    def try_acquire(self, key: int) -> bool:
        if self._count[key] >= self.limit:
            return False
        self._count[key] += 1
        return True

    def release(self, key: int) -> None:
        self._count[key] = max(0, self._count[key] - 1)


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
