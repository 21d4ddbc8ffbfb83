"""Splitting answers for Discord, and the bot's rate limits."""

import asyncio
import time

from bot.limits import ChannelPacer, Cooldown, HourlyQuota, InflightLimit
from bot.text import footer, served_version, split_message


def test_short_answer_is_one_chunk_with_footer():
    chunks = split_message("A red square.", footer_line=footer("v3"))
    assert len(chunks) == 1
    assert chunks[0].startswith("A red square.\n-# smolcord v3")


def test_long_answer_splits_at_paragraphs_under_the_limit():
    paragraphs = [f"Paragraph {i} " + "word " * 80 for i in range(20)]
    text = "\n\n".join(paragraphs)
    assert len(text) > 5000
    foot = footer("base")
    chunks = split_message(text, footer_line=foot)
    assert len(chunks) >= 3
    assert all(len(c) <= 2000 for c in chunks)
    assert chunks[-1].endswith(foot)
    # nothing lost, and no paragraph cut in half
    body = "\n\n".join(chunks).replace("\n" + foot, "")
    assert [p.strip() for p in body.split("\n\n")] == [p.strip() for p in paragraphs]


def test_code_block_kept_whole_when_it_fits():
    code = "```python\n" + "\n".join(f"x{i} = {i}" for i in range(100)) + "\n```"
    text = "intro " * 250 + "\n\n" + code + "\n\nafter"
    chunks = split_message(text)
    assert any(code in c for c in chunks)  # the block sits whole in one chunk
    assert all(c.count("```") % 2 == 0 for c in chunks)


def test_huge_code_block_reopens_its_fence():
    code = "```js\n" + "\n".join(f"let v{i} = {i};" for i in range(400)) + "\n```"
    chunks = split_message(code)
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(chunk) <= 2000
        assert chunk.startswith("```js") and chunk.endswith("```")


def test_unbroken_text_is_hard_split():
    chunks = split_message("x" * 4500, footer_line="-# f")
    assert [len(c) for c in chunks[:2]] == [2000, 2000]
    assert all(len(c) <= 2000 for c in chunks)
    assert "".join(chunks).replace("\n-# f", "") == "x" * 4500


def test_footer_that_does_not_fit_gets_its_own_chunk():
    chunks = split_message("y" * 1995, footer_line="-# smolcord v1")
    assert chunks == ["y" * 1995, "-# smolcord v1"]


def test_served_version():
    assert served_version("HuggingFaceTB/SmolVLM-256M-Instruct:v12") == "v12"
    assert served_version("HuggingFaceTB/SmolVLM-256M-Instruct") == "base"
    assert served_version("/models/tiny") == "base"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_cooldown():
    clock = FakeClock()
    cd = Cooldown(10, clock=clock)
    assert cd.retry_after(1) == 0
    assert cd.retry_after(1) == 10
    assert cd.retry_after(2) == 0  # per user
    clock.now += 10
    assert cd.retry_after(1) == 0
    cd.reset(1)
    assert cd.retry_after(1) == 0


def test_hourly_quota():
    clock = FakeClock()
    quota = HourlyQuota(2, clock=clock)
    assert quota.take(1) and quota.take(1)
    assert not quota.take(1)
    clock.now += 3600
    assert quota.take(1)


def test_inflight_limit():
    limit = InflightLimit(2)
    assert limit.try_acquire(5) and limit.try_acquire(5)
    assert not limit.try_acquire(5)
    assert limit.try_acquire(6)
    limit.release(5)
    assert limit.try_acquire(5)


async def test_channel_pacer_spaces_edits_per_channel():
    pacer = ChannelPacer(0.2)
    stamps: list[tuple[int, float]] = []

    async def edit(channel):
        await pacer.turn(channel)
        stamps.append((channel, time.monotonic()))

    await asyncio.gather(*(edit(1) for _ in range(3)), edit(2))
    ones = sorted(t for c, t in stamps if c == 1)
    assert ones[1] - ones[0] >= 0.19 and ones[2] - ones[1] >= 0.19
    two = next(t for c, t in stamps if c == 2)
    assert two - ones[0] < 0.15  # another channel does not wait for this one
