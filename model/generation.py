"""Per-row control of one batched `generate` call: sampling, stopping and streaming for each request.

Stock `generate` applies one sampling config to the whole batch and its streamers refuse batches.
So a batch is generated greedily and every request is a `Row`, a state object that makes it behave
as if it ran alone, whatever batch (static today, continuous later) it is part of:

- `Row.choose` samples, when the request asked for temperature > 0, from its own temperature /
  top_p with its own `torch.Generator`, and leaves only the chosen token, so the greedy argmax
  picks exactly it;
- `Row.advance` takes each step's token: counts it, detokenises it incrementally, holds back text
  that could begin one of the request's `stop` strings, and ends the row on end of turn, a stop
  string, its own max_tokens, the context length, cancellation or its deadline;
- its events (text deltas, then one Completion, or Failed) wait on the row until delivered.

A failure inside one row's sampling or stopping ends that row only (Failed, a 500 for that request);
the rest of the batch goes on. Three thin hooks drive the rows from `generate`, which calls them in
this order every step: `RowSampler` (a LogitsProcessor), `RowStopper` (a StoppingCriteria, a
per-row bool tensor), `BatchStreamer` (a BaseStreamer: hands each request its events through a
`deliver` callback that the scheduler makes thread-safe).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

__all__ = [
    "BatchStreamer",
    "Completion",
    "Deliver",
    "Encoding",
    "Failed",
    "IncrementalDetokenizer",
    "Row",
    "RowSampler",
    "RowStopper",
    "SamplingParams",
    "TextDelta",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoding:
    """One request's prompt as the model takes it (one row, no padding)."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None  # (tiles, 3, H, W), every image's tiles in order
    pixel_attention_mask: torch.Tensor | None = None  # (tiles, H, W)

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class SamplingParams:
    """How one request wants its tokens chosen; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks, tests of exact lengths)
    stop: tuple[str, ...] = ()  # OpenAI's `stop`: the text ends before the first occurrence of any


class RowSource(Protocol):
    """What a row needs from the request it serves (the scheduler's `CompletionRequest`)."""

    id: str
    params: SamplingParams
    deadline: float  # time.monotonic() after which the request is abandoned
    cancelled: bool  # set from the event loop when the client goes away
    model: str  # set by the streamer: the served name (`<base>:<adapter>`) of the batch it is in


@dataclass(frozen=True)
class TextDelta:
    """New text of one request, safe to show (whole UTF-8 characters, no stop token)."""

    text: str


@dataclass(frozen=True)
class Completion:
    """A request's finished answer; `finish_reason` is stop, length, cancelled or timeout."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str


@dataclass(frozen=True)
class Failed:
    """Generation broke for this request (its row, or the whole batch); it gets a 500-class error."""

    message: str


Event = TextDelta | Completion | Failed
Deliver = Callable[[list[tuple[Any, Event]]], None]


class IncrementalDetokenizer:
    """Token ids in, text out as soon as it is whole: a multi-byte character split over tokens waits."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # Decode a short window, not the whole answer, each step: the text from prefix_offset to
        # read_offset has been emitted; re-decoding it gives byte-level BPE the context it needs.
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Take one token; return the text it completes ("" while a character is still partial)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text still held back (a trailing broken character becomes U+FFFD)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


@dataclass(eq=False)
class Row:
    """One request inside a batch: its sampling, stopping and text, step by step, and its undelivered events."""

    source: RowSource
    prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    generated: int = 0  # tokens chosen so far, the stop token included
    finish_reason: str | None = None  # set when the row ends: stop, length, cancelled, timeout, error
    closed: bool = False  # its last event (Completion or Failed) has been queued
    text: list[str] = field(default_factory=list)  # the deltas queued for the client, in order
    _generator: torch.Generator | None = None
    _held: str = ""  # decoded text not shown yet: it could be the start of a stop string
    _events: list[Event] = field(default_factory=list)

    def generator(self, device: torch.device) -> torch.Generator:
        """The request's own random stream, seeded from its seed when it gave one."""
        if self._generator is None:
            seed = self.source.params.seed
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return self._generator

    # ---------------------------------------------------------------- each step

    def choose(self, scores: torch.Tensor) -> None:
        """Sample this row's next token and pin it in its scores (in place); greedy and ended rows are left alone."""
        params = self.source.params
        # Ended rows are skipped so a request's random stream never depends on its neighbours.
        if params.temperature <= 0 or self.finish_reason is not None:
            return
        try:
            token = _sample(scores, params.temperature, params.top_p, self.generator(scores.device))
        except Exception as exc:
            self.fail("sampling", exc)
            return
        scores.fill_(-float("inf"))
        scores[token] = 0.0

    def advance(self, token: int, *, stop_ids: set[int], max_model_len: int, now: float) -> bool:
        """Take this step's token (counted, shown, checked for every way to end); True once the row has ended."""
        if self.finish_reason is None:
            try:
                self._advance(token, stop_ids, max_model_len, now)
            except Exception as exc:
                self.fail("stopping", exc)
        return self.finish_reason is not None

    def _advance(self, token: int, stop_ids: set[int], max_model_len: int, now: float) -> None:
        self.generated += 1
        params = self.source.params
        if token in stop_ids:
            if not params.ignore_eos:
                self.finish("stop")
                return
        elif self._show(self.detokenizer.add(token)):
            self.finish("stop", flush=False)  # a stop string: nothing after it is shown
            return
        if self.generated >= params.max_tokens or self.prompt_tokens + self.generated >= max_model_len:
            self.finish("length")
        elif self.source.cancelled:
            self.finish("cancelled")
        elif now >= self.source.deadline:
            self.finish("timeout")

    def _show(self, text: str) -> bool:
        """Queue text for the client, holding back what could begin a stop string; True when one occurred.

        Whatever could be the start of a stop string stays held, so an occurrence split over two
        tokens (two streamed deltas) is still found whole, and nothing of it was ever sent.
        """
        stops = self.source.params.stop
        pending = self._held + text
        if not stops:
            self._emit(pending)
            self._held = ""
            return False
        found = [i for i in (pending.find(stop) for stop in stops) if i >= 0]
        if found:
            self._emit(pending[: min(found)])
            self._held = ""
            return True
        keep = _stop_prefix_length(pending, stops)
        self._emit(pending[: len(pending) - keep])
        self._held = pending[len(pending) - keep :]
        return False

    def _emit(self, text: str) -> None:
        if text:
            self.text.append(text)
            self._events.append(TextDelta(text))

    # ---------------------------------------------------------------- ending

    def finish(self, reason: str, *, flush: bool = True) -> None:
        """End the row: queue the text still held (unless a stop string ended it) and its Completion."""
        if self.closed:
            return
        if flush:
            try:
                if self._show(self.detokenizer.flush()):
                    reason = "stop"  # the last, held-back characters completed a stop string
                else:
                    self._emit(self._held)
            except Exception as exc:
                self.fail("finishing", exc)
                return
        self._held = ""
        self.finish_reason = reason
        self.closed = True
        self._events.append(
            Completion(
                text="".join(self.text),  # exactly the deltas sent, so streamed and final text agree
                finish_reason=reason,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.generated,
                model=self.source.model,
            )
        )

    def fail(self, stage: str, exc: BaseException | str) -> None:
        """End this row alone with Failed (the batch goes on): a fault in its sampling or stopping."""
        if self.closed:
            return
        if isinstance(exc, BaseException):
            log.error(
                "%s: %s failed (%s); this row ends, the batch goes on",
                self.source.id,
                stage,
                type(exc).__name__,
                exc_info=exc,
            )
            message = f"generation failed: {type(exc).__name__}"
        else:
            message = exc
        self.finish_reason = "error"
        self.closed = True
        self._events.append(Failed(message))

    def take_events(self) -> list[Event]:
        """The events produced since the last call, oldest first."""
        events, self._events = self._events, []
        return events


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the beginning of a stop string (0: none)."""
    longest = max(len(stop) for stop in stops) - 1
    firsts = {stop[0] for stop in stops}
    for start in range(max(0, len(text) - longest), len(text)):
        if text[start] in firsts:  # cheap filter: most positions cannot begin any stop string
            tail = text[start:]
            if any(stop.startswith(tail) for stop in stops):
                return len(tail)
    return 0


class RowSampler(LogitsProcessor):
    """Samples the rows that asked for it and pins their choice, so greedy selection keeps it."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            row.choose(scores[i])
        return scores


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    logits = logits.float()
    # The largest logit becomes 0 before dividing: a small temperature then drives the others towards
    # -inf (a near-greedy draw) instead of overflowing every logit to inf and the softmax to NaN.
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    outside[0] = False  # a top_p below float32's smallest number compares as 0 and would drop it too
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])


class RowStopper(StoppingCriteria):
    """Advances every row by its token each step; a per-row bool tensor says which have ended."""

    def __init__(
        self,
        rows: Sequence[Row],
        *,
        stop_ids: set[int],
        max_model_len: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rows = rows
        self.stop_ids = stop_ids
        self.max_model_len = max_model_len
        self.clock = clock

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        now = self.clock()
        done = [
            row.advance(token, stop_ids=self.stop_ids, max_model_len=self.max_model_len, now=now)
            for row, token in zip(self.rows, last, strict=True)
        ]
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


class BatchStreamer(BaseStreamer):
    """Hands each request the events its row produced this step: text deltas, then its completion."""

    def __init__(self, rows: Sequence[Row], *, stop_ids: set[int], model_name: str, deliver: Deliver) -> None:
        self.rows = rows
        self.stop_ids = stop_ids
        self.model_name = model_name
        self.deliver = deliver
        self._prompt_seen = False
        for row in rows:  # before any event is delivered, so readers of the events see it set
            row.source.model = model_name

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands over the prompt ids first
            self._prompt_seen = True
            return
        self._flush()

    def end(self) -> None:
        """Rows generate left open (it stopped at its own max length) finish as `length`."""
        self.close_all("length")

    def close_all(self, reason: str) -> None:
        for row in self.rows:
            row.finish(reason)
        self._flush()

    def fail_all(self, message: str) -> None:
        for row in self.rows:
            row.fail("generate", message)
        self._flush()

    def _flush(self) -> None:
        events = [(row.source, event) for row in self.rows for event in row.take_events()]
        if events:
            self.deliver(events)
