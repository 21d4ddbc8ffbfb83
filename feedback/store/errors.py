"""The errors the feedback store raises: each says what was wrong, and nothing was written."""

from __future__ import annotations

__all__ = [
    "AlreadyRecorded",
    "CanaryDecided",
    "FeedbackError",
    "ImageTooLarge",
    "InvalidHistory",
    "InvalidImage",
    "NotAVote",
    "UnknownCanary",
    "UnknownPrompt",
    "UnknownResponse",
    "UnknownRun",
]


class FeedbackError(Exception):
    """Base class: the store refused the call and rolled back; nothing of it was written."""


class UnknownResponse(FeedbackError, LookupError):
    """No stored response has that id or Discord message id (never recorded, deleted or forgotten)."""


class UnknownPrompt(FeedbackError, LookupError):
    """No stored prompt has that id or Discord message id (never recorded, deleted or forgotten)."""


class UnknownRun(FeedbackError, LookupError):
    """No training run has that id."""


class UnknownCanary(FeedbackError, LookupError):
    """No canary has that id."""


class CanaryDecided(FeedbackError):
    """The canary was decided already (promoted, rejected or aborted): a decision is recorded once."""


class NotAVote(FeedbackError, ValueError):
    """The emoji is not 👍 or 👎 (🔁 and 🗑️ are actions, not votes; they are never stored)."""

    def __init__(self, emoji: str) -> None:
        super().__init__(f"{emoji!r} is not a vote: only 👍 and 👎 are stored")
        self.emoji = emoji


class InvalidImage(FeedbackError, ValueError):
    """An image could not be stored: not an image, damaged, too many, or bytes that do not match their hash."""

    def __init__(self, message: str, *, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.code = code


class ImageTooLarge(InvalidImage):
    """An image is over SMOLCORD_MAX_IMAGE_BYTES, _PIXELS or _EDGE."""

    def __init__(self, message: str, *, code: str = "too_large") -> None:
        super().__init__(message, code=code)


class InvalidHistory(FeedbackError, ValueError):
    """A conversation history is not a list of user/assistant turns, or names an image the store lacks."""


class AlreadyRecorded(FeedbackError, ValueError):
    """A Discord message id is already stored (as a prompt's question or a response's chunk)."""

    def __init__(self, message_id: int, what: str) -> None:
        super().__init__(f"message {message_id} is already recorded as {what}")
        self.message_id = message_id
        self.what = what
