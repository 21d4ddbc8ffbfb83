"""Which reactions are votes: 👍 and 👎 (any skin tone) are stored; 🔁 and 🗑️ are actions, never stored.

A user's vote on a response is (a 👍 present) − (a 👎 present): +1, 0 or −1. 🔁 asks the bot for
another answer to the same prompt and 🗑️ deletes an answer; the bot acts on them and the store
keeps only what they produce (a new response, or a deletion).
"""

from __future__ import annotations

from typing import Literal

from feedback.store.errors import NotAVote

__all__ = [
    "DELETE",
    "REGENERATE",
    "THUMBS_DOWN",
    "THUMBS_DOWN_VARIANTS",
    "THUMBS_UP",
    "THUMBS_UP_VARIANTS",
    "action_of",
    "canonical_vote_emoji",
    "vote_value",
]

THUMBS_UP = "👍"
THUMBS_DOWN = "👎"
REGENERATE = "🔁"
DELETE = "🗑"  # Discord sends it as "🗑️" (with U+FE0F); compare through `action_of`

_VARIATION_SELECTOR = "\ufe0f"
_SKIN_TONES = [chr(c) for c in range(0x1F3FB, 0x1F400)]
# Stored as sent: Discord shows 👍 and 👍🏽 as two reactions, so removing one must not clear the other.
THUMBS_UP_VARIANTS = (THUMBS_UP, *(THUMBS_UP + tone for tone in _SKIN_TONES))
THUMBS_DOWN_VARIANTS = (THUMBS_DOWN, *(THUMBS_DOWN + tone for tone in _SKIN_TONES))
_VALUES = {**dict.fromkeys(THUMBS_UP_VARIANTS, 1), **dict.fromkeys(THUMBS_DOWN_VARIANTS, -1)}


def _strip(emoji: str) -> str:
    return emoji.replace(_VARIATION_SELECTOR, "").strip()


def vote_value(emoji: str) -> int | None:
    """+1 for a 👍, −1 for a 👎 (any skin tone), None for anything else."""
    return _VALUES.get(_strip(emoji))


def canonical_vote_emoji(emoji: str) -> str:
    """The emoji as stored (without the variation selector); NotAVote if it is not 👍 or 👎."""
    stripped = _strip(emoji)
    if stripped not in _VALUES:
        raise NotAVote(emoji)
    return stripped


def action_of(emoji: str) -> Literal["regenerate", "delete"] | None:
    """The action an emoji asks for: 🔁 "regenerate", 🗑️ "delete", None otherwise."""
    stripped = _strip(emoji)
    if stripped == REGENERATE:
        return "regenerate"
    if stripped == DELETE:
        return "delete"
    return None
