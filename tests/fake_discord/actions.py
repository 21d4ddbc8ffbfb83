"""What the client did, as a log of `Action`s, and waiting for the next one (``wait_for``, ``assert_no_action``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from .records import Action, FakeInteraction, FakeMessage

log = logging.getLogger("fake_discord")


class ActionLog:
    """The bottom layer: every layer above records here what the client did."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self._mark = 0  # where wait_for starts looking by default: the last event the test sent
        self._waiters: list[asyncio.Future[None]] = []

    def mark(self) -> int:
        """The current position in ``actions``; pass it as ``since`` to wait_for."""
        return len(self.actions)

    def actions_of(self, kind: str) -> list[Action]:
        return [action for action in self.actions if action.kind == kind]

    async def wait_for(
        self,
        kind: str | Callable[[Action], bool],
        check: Callable[[Action], bool] | None = None,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109
        since: int | None = None,
    ) -> Action:
        """The first action of ``kind`` (or matching a predicate) passing ``check``, recorded since
        ``since`` (default: since the last event the test sent), waiting up to ``timeout`` seconds."""
        start = self._mark if since is None else since

        def matches(action: Action) -> bool:
            if callable(kind):
                return kind(action) and (check is None or check(action))
            return action.kind == kind and (check is None or check(action))

        def find() -> Action | None:
            return next((a for a in self.actions[start:] if matches(a)), None)

        return await self._wait_until(find, timeout, lambda: f"{kind!r} since action #{start}")

    async def assert_no_action(
        self,
        kind: str | Callable[[Action], bool],
        check: Callable[[Action], bool] | None = None,
        *,
        within: float = 0.3,
        since: int | None = None,
    ) -> None:
        """Fail if such an action is (or gets, within ``within`` seconds) recorded."""
        try:
            found = await self.wait_for(kind, check, timeout=within, since=since)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected action: {found}")

    @property
    def identify_count(self) -> int:
        return len(self.actions_of("identify"))

    @property
    def resume_count(self) -> int:
        return len(self.actions_of("resume"))

    async def _wait_until(
        self,
        condition: Callable[[], Any],
        timeout: float,  # noqa: ASYNC109
        describe: str | Callable[[], str],
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = condition()
            if result is not None and result is not False:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                what = describe() if callable(describe) else describe
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what}; recent actions: {self._summary()}"
                )
            waiter = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, remaining)

    def _summary(self, last: int = 12) -> str:
        parts = []
        for action in self.actions[-last:]:
            detail = action.data.get("content", action.data.get("emoji", ""))
            parts.append(f"#{action.index} {action.kind} {str(detail)[:60]!r}")
        return "; ".join(parts) or "(none)"

    def _record(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        message: FakeMessage | None = None,
        interaction: FakeInteraction | None = None,
    ) -> Action:
        action = Action(len(self.actions), kind, data, message, interaction)
        self.actions.append(action)
        log.debug("action #%d %s", action.index, kind)
        self._wake_waiters()
        return action

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
