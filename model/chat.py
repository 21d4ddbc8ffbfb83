"""Chat-completion requests: checking an OpenAI-style body and turning it into the model's prompt."""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from model.engine import Engine
from model.errors import APIError
from model.generation import Encoding, SamplingParams
from smolcord.images import ImageError, decode_data_url, normalize_for
from smolcord.settings import Settings

__all__ = ["ChatRequest", "EncodedChat", "encode_chat", "parse_chat_request"]

log = logging.getLogger(__name__)

_ROLES = {"system", "user", "assistant", "developer"}
# OpenAI's limit on `stop` strings; and a bound on each: the text that could begin one is held back and
# re-scanned every token (an adversarial 256-character stop costs ~0.1 ms a token per row, 1024 ~0.4 ms).
_MAX_STOPS = 4
_MAX_STOP_CHARS = 256
# A seed becomes a torch.Generator seed: the range of a 64-bit signed integer (vLLM's, too).
_SEED_RANGE = (-(2**63), 2**63 - 1)
# Below this a temperature is greedy (vLLM's rule): dividing logits by less only overflows.
_GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class ChatRequest:
    """A checked request: the conversation in the processor's format and its image URLs in order."""

    conversation: list[dict[str, Any]]
    image_urls: list[str]
    max_tokens: int | None  # None: as many as the cap and the context allow (already clamped to the cap)
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    # Indices (into image_urls) of the images not in the last user message, oldest first: the ones
    # dropped, with their text kept, when there are too many or the context cannot hold them.
    history_images: tuple[int, ...] = ()
    dropped_images: int = 0  # history images already dropped for SMOLCORD_MAX_IMAGES

    def params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop=self.stop,
        )

    def without_images(self, drop: set[int]) -> ChatRequest:
        """The same request with these images (indices into image_urls) taken out; their messages' text stays."""
        if not drop:
            return self
        index = 0
        conversation = []
        for message in self.conversation:
            parts = []
            for part in message["content"]:
                if part.get("type") == "image":
                    index += 1
                    if index - 1 in drop:
                        continue
                parts.append(part)
            conversation.append({**message, "content": parts or [{"type": "text", "text": ""}]})
        kept = [i for i in range(len(self.image_urls)) if i not in drop]
        renumber = {old: new for new, old in enumerate(kept)}
        return replace(
            self,
            conversation=conversation,
            image_urls=[self.image_urls[i] for i in kept],
            history_images=tuple(renumber[i] for i in self.history_images if i in renumber),
            dropped_images=self.dropped_images + len(drop),
        )


def _bad(message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code)


def parse_chat_request(body: Any, *, max_tokens_cap: int, max_images: int) -> ChatRequest:
    """Check a /v1/chat/completions body; unknown fields are ignored. Raises APIError (400)."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", "invalid_request")

    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad("Only n=1 is supported.", "unsupported_value")

    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        if not _is_int(max_tokens) or max_tokens < 1:
            raise _bad("max_tokens must be a positive integer.")
        # Above the worker's cap: clamped, so a client configured for a larger cap still gets
        # answers (cut at the cap with finish_reason "length").
        max_tokens = min(max_tokens, max_tokens_cap)

    # OpenAI's defaults: temperature 1 samples. Callers that want the greedy answer send 0.
    temperature = _number(body, "temperature", default=1.0, low=0.0, high=2.0)
    if temperature < _GREEDY_BELOW:
        temperature = 0.0
    top_p = _number(body, "top_p", default=1.0, low=0.0, high=1.0)
    if top_p <= 0:
        raise _bad("top_p must be greater than 0.")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]):
        raise _bad("seed must be an integer between -2**63 and 2**63-1.")
    stop = _stop(body.get("stop"))

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false.")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object.")
    include_usage = bool(options.get("include_usage", False))
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension, for benchmarks and exact lengths
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos must be true or false.")

    conversation, image_urls, last_user_images = _messages(body.get("messages"))
    if len(last_user_images) > max_images:
        raise _bad(
            f"The last user message has {len(last_user_images)} images; this worker takes at most "
            f"{max_images}.",
            "too_many_images",
        )
    chat = ChatRequest(
        conversation=conversation,
        image_urls=image_urls,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stream=stream,
        include_usage=include_usage,
        ignore_eos=ignore_eos,
        stop=stop,
        history_images=tuple(i for i in range(len(image_urls)) if i not in last_user_images),
    )
    # Clients that re-send a conversation (llmcord) re-send its images too: the oldest beyond the
    # cap are dropped, their text kept, rather than refusing the whole question.
    excess = len(image_urls) - max_images
    return chat.without_images(set(chat.history_images[:excess])) if excess > 0 else chat


def _stop(value: Any) -> tuple[str, ...]:
    """OpenAI's `stop`: null, a string, or a list of up to four strings."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise _bad("stop must be a string or a list of strings.")
    if len(stops) > _MAX_STOPS:
        raise _bad(f"stop takes at most {_MAX_STOPS} strings.")
    if any(not stop or len(stop) > _MAX_STOP_CHARS for stop in stops):
        raise _bad(f"Each stop string must have 1 to {_MAX_STOP_CHARS} characters.")
    return tuple(dict.fromkeys(stops))


def _messages(messages: Any) -> tuple[list[dict[str, Any]], list[str], set[int]]:
    """The conversation, every image URL in order, and the indices of those in the last user message."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list.", "invalid_messages")
    conversation: list[dict[str, Any]] = []
    image_urls: list[str] = []
    last_user_images: set[int] = set()
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object.", "invalid_messages")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:  # a list would not even hash
            raise _bad(f"{where}.role must be system, user or assistant.", "invalid_messages")
        content = message.get("content")
        parts: list[dict[str, Any]] = []
        first_image = len(image_urls)
        if content is None or isinstance(content, str):
            parts.append({"type": "text", "text": content or ""})
        elif isinstance(content, list):
            for p, part in enumerate(content):
                parts.append(_part(part, f"{where}.content[{p}]", image_urls))
        else:
            raise _bad(f"{where}.content must be a string or a list of parts.", "invalid_messages")
        if not parts:
            parts.append({"type": "text", "text": ""})  # the chat template looks at the first part
        # SmolVLM's template knows system/user/assistant; OpenAI's newer "developer" is a system turn.
        conversation.append({"role": "system" if role == "developer" else role, "content": parts})
        if role == "user":
            last_user_images = set(range(first_image, len(image_urls)))
    return conversation, image_urls, last_user_images


def _part(part: Any, where: str, image_urls: list[str]) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise _bad(f"{where} must be an object.", "invalid_messages")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.text must be a string.", "invalid_messages")
        return {"type": "text", "text": text}
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str):
            raise _bad(f"{where}.image_url.url must be a string.", "invalid_messages")
        image_urls.append(url)
        return {"type": "image"}
    raise _bad(f"{where}.type must be text or image_url.", "invalid_messages")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str, *, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"{name} must be a number.")
    if not low <= value <= high:
        raise _bad(f"{name} must be between {low:g} and {high:g}.")
    return float(value)


@dataclass(frozen=True)
class EncodedChat:
    """A request's prompt as the model takes it, and the request as encoded (history images may be gone)."""

    chat: ChatRequest
    encoding: Encoding


def encode_chat(engine: Engine, settings: Settings, chat: ChatRequest) -> EncodedChat:
    """Decode and normalise the images (smolcord.images), then encode the prompt. Blocking: run it off the loop.

    When the prompt leaves no room for an answer, history images are dropped, oldest first (their
    text stays), until it does or none is left; the caller then refuses what still does not fit.
    """
    images = []
    for url in chat.image_urls:
        try:
            normalized = normalize_for(settings, decode_data_url(url, max_bytes=settings.max_image_bytes))
        except ImageError as exc:
            raise APIError(exc.status, exc.message, code=exc.code) from None
        with Image.open(io.BytesIO(normalized.data)) as image:
            images.append(image.convert("RGB"))
    while True:
        try:
            encoding = engine.encode(chat.conversation, images)
        except ValueError as exc:  # the processor's own refusals (an image it cannot tile, ...)
            raise APIError(400, f"The prompt could not be processed: {exc}", code="invalid_prompt") from None
        if encoding.prompt_tokens < engine.max_model_len or not chat.history_images:
            return EncodedChat(chat, encoding)
        oldest = chat.history_images[0]
        del images[oldest]
        chat = chat.without_images({oldest})
