"""Discord-sized answers: split long text at paragraph or code-fence boundaries, footer on the last chunk."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

DISCORD_LIMIT = 2000
CURSOR = " ▌"  # shown at the end of an answer while it is still streaming
_FENCE = re.compile(r"^\s*(```+|~~~+)(.*)$")
_ZWJ = "\u200d"
_JOINERS = frozenset("\u200d\ufe0e\ufe0f")  # zero-width joiner, text/emoji variation selectors
# Characters that show nothing: a message of only these (and whitespace) is as empty as a blank one.
_INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff")


def footer(version: str, *, note: str | None = None) -> str:
    """The small line under every answer: which adapter wrote it and how to vote."""
    parts = [f"smolcord {version}", "👍 / 👎 to vote", "🔁 for another answer"]
    if note:
        parts.append(note)
    return "-# " + " · ".join(parts)


def served_version(model: str) -> str:
    """`base`, or the adapter version, from a response's `model` (`<base>:<version>`)."""
    _, sep, version = model.rpartition(":")
    return version if sep and re.fullmatch(r"v[1-9][0-9]*", version) else "base"


def base_name(model: str) -> str:
    """The base model's name from a served model's (`<base>:<version>` or `<base>`)."""
    return model.rpartition(":")[0] if served_version(model) != "base" else model


def _blocks(text: str) -> list[str]:
    """Paragraphs, with each fenced code block kept whole as one block."""
    blocks: list[str] = []
    current: list[str] = []
    fence: str | None = None
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if fence is None and match:
            if current:
                blocks.append("\n".join(current))
            current, fence = [line], match.group(1)
            continue
        if fence is not None:
            current.append(line)
            if match and match.group(1).startswith(fence[:3]) and not match.group(2).strip():
                blocks.append("\n".join(current))
                current, fence = [], None
            continue
        if not line.strip():
            if current:
                blocks.append("\n".join(current))
                current = []
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def _pieces(block: str, limit: int) -> Iterator[str]:
    """A block as pieces of at most `limit` characters: itself, or a long block cut at line ends, spaces, anywhere."""
    if _blank(block):
        return
    if len(block) <= limit:
        yield block
        return
    code = _code_block(block, limit)
    if code is None:
        yield from _split_prose(block, limit)
        return
    opener, body, closer = code
    # a long code block: cut its lines, closing and reopening the fence around each piece
    for piece in _split_code(body, limit - len(opener) - len(closer) - 2):
        yield f"{opener}\n{piece}\n{closer}"


def _code_block(block: str, limit: int) -> tuple[str, str, str] | None:
    """(opening line, body, closing fence) of a fenced block, None for prose.

    A block left open (an answer cut at max_tokens) gets a closing fence. An opening line too long
    to repeat on every piece (the model wrote code on the fence line) makes the block prose:
    repeating it would leave no room, and cutting it would make the rest of the line a language name.
    """
    opener, _, body = block.partition("\n")
    match = _FENCE.match(opener)
    if match is None:
        return None
    marker = match.group(1)
    head, _, last = body.rpartition("\n")
    closing = _FENCE.match(last)
    if closing and closing.group(1).startswith(marker[:3]) and not closing.group(2).strip():
        body, closer = head, last.strip()
    else:
        closer = marker
    if len(opener) + len(closer) + 2 > limit // 2:
        return None
    return opener, body, closer


def _split_prose(text: str, limit: int) -> Iterator[str]:
    """Pieces of at most `limit` characters, cut at the last line end, else space, else anywhere; trimmed."""
    pos, end = 0, len(text)
    while end - pos > limit:
        stop = pos + limit  # the piece is text[pos:cut] with pos < cut <= stop: always progress
        cut = text.rfind("\n", pos + 1, stop + 1)
        if cut < 0:
            cut = text.rfind(" ", pos + 1, stop + 1)
        if cut < 0:
            cut = _cluster_start(text, pos, stop)
        piece = text[pos:cut].rstrip()
        if not _blank(piece):
            yield piece
        pos = cut
        while pos < end and text[pos].isspace():
            pos += 1
    if not _blank(text[pos:]):
        yield text[pos:]


def _split_code(body: str, room: int) -> Iterator[str]:
    """Pieces of at most `room` characters cut after whole lines (indentation kept), long lines anywhere."""
    pos, end = 0, len(body)
    while end - pos > room:
        stop = pos + room
        cut = body.rfind("\n", pos + 1, stop + 1)
        if cut < 0:
            cut = _cluster_start(body, pos, stop)
            yield body[pos:cut]
            pos = cut
        else:
            yield body[pos:cut]
            pos = cut + 1  # the line end itself: the closing fence takes its place
    if pos < end:
        yield body[pos:]


def _cluster_start(text: str, pos: int, stop: int) -> int:
    """The cut nearest before `stop` (and after `pos`) that does not separate a character from its marks."""
    cut = stop
    while cut > pos + 1 and _joins_previous(text[cut - 1], text[cut]):
        cut -= 1
    return stop if _joins_previous(text[cut - 1], text[cut]) else cut  # nothing but marks: cut anyway


def _joins_previous(before: str, char: str) -> bool:
    """Whether `char` belongs to the same visible character as `before` (combining mark, emoji joiner)."""
    return (
        before == _ZWJ
        or char in _JOINERS
        or 0x1F3FB <= ord(char) <= 0x1F3FF  # skin tone modifiers
        or unicodedata.combining(char) != 0
    )


def _blank(text: str) -> bool:
    """Whether Discord would see no content in `text` (it refuses such a message)."""
    return all(char.isspace() or char in _INVISIBLE for char in text)


def split_message(text: str, *, footer_line: str = "", limit: int = DISCORD_LIMIT) -> list[str]:
    """Chunks of at most `limit` characters, none blank; the footer is appended to the last one.

    Discord counts a message's length in code points, as `len` does. Linear in the text's length,
    and every cut makes progress, whatever the model wrote.
    """
    if _blank(text):
        text = "…"
    chunks: list[str] = []
    current: list[str] = []  # pieces of the chunk being filled, joined by blank lines
    size = 0
    for block in _blocks(text.strip()):
        for piece in _pieces(block, limit):
            if current and size + 2 + len(piece) <= limit:
                current.append(piece)
                size += 2 + len(piece)
            else:
                if current:
                    chunks.append("\n\n".join(current))
                current, size = [piece], len(piece)
    last = "\n\n".join(current)
    # the footer must fit beside the last chunk; if it does not, it starts a chunk of its own
    if footer_line and last and len(last) + 1 + len(footer_line) <= limit:
        chunks.append(f"{last}\n{footer_line}")
    else:
        chunks.append(last)
        chunks.extend(_split_prose(footer_line, limit))
    return [chunk for chunk in chunks if not _blank(chunk)]
