"""Discord-sized answers: split long text at paragraph or code-fence boundaries, footer on the last chunk."""

from __future__ import annotations

import re

DISCORD_LIMIT = 2000
CURSOR = " ▌"  # shown at the end of an answer while it is still streaming
_FENCE = re.compile(r"^\s*(```+|~~~+)(.*)$")


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


def _hard_split(block: str, limit: int) -> list[str]:
    """A block longer than a message: at line ends, then at spaces, then anywhere."""
    match = _FENCE.match(block.split("\n", 1)[0])
    if match and block.rstrip().endswith(match.group(1)):
        # a long code block: split its lines, closing and reopening the fence around each piece
        opener, closer = block.split("\n", 1)[0], match.group(1)
        body = block.split("\n", 1)[1].rsplit("\n", 1)[0] if "\n" in block else ""
        room = limit - len(opener) - len(closer) - 2
        return [f"{opener}\n{piece}\n{closer}" for piece in _hard_split(body, room)]
    pieces: list[str] = []
    rest = block
    while len(rest) > limit:
        cut = rest.rfind("\n", 0, limit + 1)
        if cut <= 0:
            cut = rest.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip("\n ")
    if rest:
        pieces.append(rest)
    return pieces


def split_message(text: str, *, footer_line: str = "", limit: int = DISCORD_LIMIT) -> list[str]:
    """Chunks of at most `limit` characters; the footer is appended to the last one."""
    text = text.strip() or "…"
    reserve = len(footer_line) + 1 if footer_line else 0
    chunks: list[str] = []
    current = ""
    for block in _blocks(text):
        for piece in _hard_split(block, limit) if len(block) > limit else [block]:
            candidate = f"{current}\n\n{piece}" if current else piece
            if len(candidate) <= limit:
                current = candidate
            else:
                chunks.append(current)
                current = piece
    # the footer must fit beside the last chunk; if it does not, it starts a chunk of its own
    if footer_line:
        if len(current) + reserve <= limit:
            current = f"{current}\n{footer_line}"
        else:
            chunks.append(current)
            current = footer_line
    chunks.append(current)
    return [chunk for chunk in chunks if chunk]
