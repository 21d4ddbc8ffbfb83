"""`smolcord -v` logs no message content; only `-vv` lets discord.py and aiosqlite log theirs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from test_bot.test_chat import answer_to, ask, fast

from smolcord.cli import CONTENT_LOGGERS, build_parser, configure_logging

pytestmark = pytest.mark.timeout(60)


class Collected(logging.Handler):
    """Every record logged, formatted the way the CLI's handler formats it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def collected() -> Iterator[Collected]:
    names = ["", *CONTENT_LOGGERS]
    levels = {name: logging.getLogger(name).level for name in names}
    handler = Collected()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_v_counts() -> None:
    assert build_parser().parse_args(["-v", "bot"]).verbose == 1
    assert build_parser().parse_args(["-vv", "bot"]).verbose == 2
    assert build_parser().parse_args(["bot"]).verbose == 0


async def test_verbose_logs_carry_no_message_content(start_bot, collected) -> None:
    configure_logging(1)  # what `smolcord -v bot` sets up
    async with start_bot(max_tokens=8) as world:
        fast(world)
        marker = "zebra-crossing-7f3a91"
        await answer_to(world, await ask(world, f"is there a {marker} here?"))
        logged = "\n".join(collected.lines)
        assert len(collected.lines) > 10
        assert logging.getLogger().isEnabledFor(logging.DEBUG), "-v still logs smolcord's debug lines"
        assert marker not in logged

        # -vv is the documented way to see discord.py's payloads, content and all
        configure_logging(2)
        second = "giraffe-neck-55c2e0"
        await answer_to(world, await ask(world, f"or a {second}?"))
        assert second in "\n".join(collected.lines)
