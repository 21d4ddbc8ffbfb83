"""Splitting answers for Discord, and the bot's rate limits."""

import asyncio
import operator
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.timeout(10)
@pytest.mark.parametrize("opener_length", [1995, 1996, 1998, 2000, 2001, 2600, 5000])
def test_fence_line_too_long_to_repeat_does_not_hang(opener_length):
    # the model wrote code on the fence line: repeating it around every piece would leave no room
    opener = "```" + "x" * (opener_length - 3)
    text = opener + "\n" + "\n".join(f"line {i}" for i in range(300)) + "\n```"
    chunks = split_message(text, footer_line="-# f")
    assert all(0 < len(c) <= 2000 for c in chunks)
    assert _visible(text) in _visible("".join(chunks))  # nothing lost (only whitespace moved)


def test_long_unclosed_code_block_is_closed_and_reopened():
    # an answer cut at max_tokens in the middle of a code block
    code = "```js\n" + "\n".join(f"  let v{i} = {i};" for i in range(400))
    chunks = split_message(code)
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(chunk) <= 2000
        assert chunk.startswith("```js\n") and chunk.endswith("\n```")
    assert "\n  let v1 = 1;" in chunks[0]  # indentation kept inside code


def test_no_chunk_is_blank():
    assert split_message("\n" * 5000) == ["…"]
    assert split_message("\u200b\n\n\ufeff   \n") == ["…"]
    assert split_message("a\n\n" + "\u200b" * 2500) == ["a"]  # 2,000 zero-width spaces would be refused
    assert split_message("a" + " " * 3000 + "b") == ["a\n\nb"]


def test_combining_marks_and_emoji_stay_with_their_character():
    text = "x" * 1999 + "e\u0301" + "y" * 10
    assert split_message(text)[1].startswith("e\u0301")
    family = "\U0001f469\u200d\U0001f469\u200d\U0001f467"  # one emoji, five code points
    chunks = split_message(family * 1000)
    assert all(len(c) <= 2000 for c in chunks)
    assert all(c.startswith("\U0001f469") and c.endswith("\U0001f467") for c in chunks)


# --------------------------------------------------------------------- properties of splitting

_MARKS = re.compile(r"[\s\u200b\u200c\u200d\u2060\ufeff]+")
_FENCE_LINE = re.compile(r"^\s*(```+|~~~+)", re.MULTILINE)
_SNIPPETS = [
    "```", "```python", "~~~", "````", "\n", "\n\n", " ", "\t", "`", "> quote", "-# small", "# title",
    "<@123456789012345678>", "<@&42>", "<#7>", "@everyone", "@here", "e\u0301", "\u0915\u094d\u0937",
    "\U0001f44d\U0001f3fd", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "\u200b", "\ufeff", "中文", "word",
]  # fmt: skip
_REPEATABLE = ["x", "ab ", "\n", " ", "é", "\U0001f44d", "\u0301", "```", "```\n", "中", "\u200d"]
_segments = st.one_of(
    st.sampled_from(_SNIPPETS),
    st.text(max_size=40),
    st.builds(operator.mul, st.sampled_from(_REPEATABLE), st.integers(0, 4100)),
    st.builds(  # a fence line of about the message limit, code after it
        lambda n, body: "```" + "x" * n + "\n" + body + "\n```", st.integers(1960, 2100), st.text(max_size=60)
    ),
)
_answers = st.lists(_segments, max_size=25).map("".join)


# A splitter that loops forever must fail the run, not hang it: hypothesis would catch the signal
# method's exception and keep trying examples, so these use the thread method (it ends the process).
_NO_HANG = pytest.mark.timeout(120, method="thread")


def _visible(text: str) -> str:
    return _MARKS.sub("", text)


def _is_subsequence(needle: str, haystack: str) -> bool:
    letters = iter(haystack)
    return all(letter in letters for letter in needle)


@_NO_HANG
def test_any_answer_becomes_messages_discord_accepts():
    tried = 0

    @settings(max_examples=300)
    @given(text=_answers, foot=st.sampled_from(["", footer("v3"), footer("base", note="a note")]))
    def check(text: str, foot: str) -> None:
        nonlocal tried
        tried += 1
        chunks = split_message(text, footer_line=foot)
        assert chunks
        assert all(0 < len(c) <= 2000 for c in chunks)
        assert all(_visible(c) for c in chunks)  # none blank: Discord refuses an empty message
        assert chunks[-1].endswith(foot)
        body = "\n".join(chunks)
        body = body[: len(body) - len(foot)]
        # nothing lost, nothing reordered: only whitespace moves and fences are repeated
        assert _is_subsequence(_visible(text), _visible(body))

    check()
    print(f"split_message: {tried} generated answers")
    assert tried >= 300


_words = st.text(st.characters(codec="utf-8", exclude_categories=["Z", "C"]), min_size=1, max_size=60)


@_NO_HANG
def test_prose_is_cut_between_words():
    tried = 0

    @settings(max_examples=150)
    @given(st.lists(st.tuples(_words, st.sampled_from([" ", " ", "\n", "\n\n"])), min_size=1, max_size=1500))
    def check(words: list[tuple[str, str]]) -> None:
        nonlocal tried
        tried += 1
        text = "".join(word + gap for word, gap in words)
        chunks = split_message(text)
        assert all(len(c) <= 2000 for c in chunks)
        assert [w for c in chunks for w in c.split()] == text.split()  # no word cut in two

    check()
    print(f"split_message between words: {tried} generated answers")
    assert tried >= 150


@_NO_HANG
def test_code_blocks_are_closed_and_reopened_in_every_message():
    tried = 0
    line = st.text(st.characters(codec="utf-8", exclude_characters="`~\n\r"), max_size=300)
    block = st.builds(
        lambda lang, lines: f"```{lang}\n" + "\n".join(lines) + "\n```",
        st.sampled_from(["", "python", "js"]),
        st.lists(line, max_size=60),
    )
    prose = st.lists(line.filter(str.strip), min_size=1, max_size=8).map("\n".join)

    @settings(max_examples=150)
    @given(st.lists(st.one_of(block, prose), min_size=1, max_size=12).map("\n\n".join))
    def check(text: str) -> None:
        nonlocal tried
        tried += 1
        for chunk in split_message(text):
            assert len(chunk) <= 2000
            assert len(_FENCE_LINE.findall(chunk)) % 2 == 0, chunk  # every fence opened is closed

    check()
    print(f"split_message code blocks: {tried} generated answers")
    assert tried >= 150


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
