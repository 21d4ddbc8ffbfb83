"""Who is in the canary: a sticky share of users, drawn by a hash of user id and candidate version.

The draw is `sha256("<user id>:<candidate>")` read as a number in [0, 1): a user is in the canary
of a candidate when that number is below the share. So a user keeps their arm for every question
and 🔁 while one candidate runs, across restarts and in every process (bot, simulation) without
anything stored, and each new candidate draws its users afresh, so the same people are not the
test subjects of every canary. Torch-free, shared by the bot and `smolcord simulate`.
"""

from __future__ import annotations

import hashlib

__all__ = ["in_canary", "served_model"]


def in_canary(user_id: int, candidate: str, share: float) -> bool:
    """Whether this user gets the candidate's answers while `candidate` is in canary (sticky)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"canary share must be in [0, 1], got {share!r}")
    digest = hashlib.sha256(f"{user_id}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def served_model(base: str, version: str | None) -> str:
    """The OpenAI `model` naming a served version: `<base>:<version>`, or `base` for the base model."""
    return base if version is None else f"{base}:{version}"
