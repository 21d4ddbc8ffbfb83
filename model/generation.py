"""Per-row control of one batched `generate` call: sampling, stopping and streaming for each request.

Stock `generate` applies one sampling config to the whole batch and its streamers refuse batches.
So a batch is generated greedily and these three hooks make every row behave as if it ran alone:

- `RowSampler` (a LogitsProcessor) samples, for each row with temperature > 0, from that row's own
  temperature / top_p with that row's own `torch.Generator`, and leaves only the chosen token, so
  the greedy argmax picks exactly it;
- `RowStopper` (a StoppingCriteria) returns a per-row bool tensor: end of turn, the row's own
  max_tokens, the context length, its request cancelled or past its deadline;
- `BatchStreamer` (a BaseStreamer) hands each request only its own new tokens, detokenised
  incrementally, through a `deliver` callback that the scheduler makes thread-safe.

`generate` calls them in this order every step: sampler, then stopper, then streamer.
"""

from __future__ import annotations

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
    "Failed",
    "IncrementalDetokenizer",
    "Row",
    "RowSampler",
    "RowStopper",
    "SamplingParams",
    "TextDelta",
]


@dataclass(frozen=True)
class SamplingParams:
    """How one request wants its tokens chosen; temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks, tests of exact lengths)


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
    """Generation broke for the whole batch; the request gets a 500-class error."""

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
    """One request inside a batch, and what the hooks learn about it step by step."""

    source: RowSource
    prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    generated: int = 0  # tokens chosen so far, the stop token included
    finish_reason: str | None = None
    closed: bool = False  # its Completion has been delivered
    text: list[str] = field(default_factory=list)
    _generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The request's own random stream, seeded from its seed when it gave one."""
        if self._generator is None:
            seed = self.source.params.seed
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return self._generator


class RowSampler(LogitsProcessor):
    """Samples the rows that asked for it and pins their choice, so greedy selection keeps it."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            params = row.source.params
            # Finished rows are skipped so a request's random stream never depends on its neighbours.
            if params.temperature <= 0 or row.finish_reason is not None:
                continue
            token = _sample(scores[i], params.temperature, params.top_p, row.generator(scores.device))
            scores[i].fill_(-float("inf"))
            scores[i, token] = 0.0
        return scores


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])


class RowStopper(StoppingCriteria):
    """Decides, per row and per step, whether that row is done and why."""

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
        done = []
        for row, token in zip(self.rows, last, strict=True):
            if row.finish_reason is None:
                row.generated += 1
                source = row.source
                if token in self.stop_ids and not source.params.ignore_eos:
                    row.finish_reason = "stop"
                elif row.generated >= source.params.max_tokens:
                    row.finish_reason = "length"
                elif row.prompt_tokens + row.generated >= self.max_model_len:
                    row.finish_reason = "length"
                elif source.cancelled:
                    row.finish_reason = "cancelled"
                elif now >= source.deadline:
                    row.finish_reason = "timeout"
            done.append(row.finish_reason is not None)
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


class BatchStreamer(BaseStreamer):
    """Turns each step's batch of tokens into per-request text deltas and final completions."""

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
        events: list[tuple[Any, Event]] = []
        for row, token in zip(self.rows, value.reshape(-1).tolist(), strict=True):
            if row.closed:
                continue
            if token not in self.stop_ids:
                delta = row.detokenizer.add(token)
                if delta:
                    row.text.append(delta)
                    events.append((row.source, TextDelta(delta)))
            if row.finish_reason is not None:
                events.extend(self._close(row, row.finish_reason))
        if events:
            self.deliver(events)

    def end(self) -> None:
        """Rows generate left open (it stopped at its own max length) finish as `length`."""
        self.close_all("length")

    def close_all(self, reason: str) -> None:
        events = [event for row in self.rows if not row.closed for event in self._close(row, reason)]
        if events:
            self.deliver(events)

    def fail_all(self, message: str) -> None:
        events: list[tuple[Any, Event]] = []
        for row in self.rows:
            if not row.closed:
                row.closed = True
                events.append((row.source, Failed(message)))
        if events:
            self.deliver(events)

    def _close(self, row: Row, reason: str) -> list[tuple[Any, Event]]:
        row.closed = True
        row.finish_reason = row.finish_reason or reason
        events: list[tuple[Any, Event]] = []
        tail = row.detokenizer.flush()
        if tail:
            row.text.append(tail)
            events.append((row.source, TextDelta(tail)))
        completion = Completion(
            text="".join(row.text),  # exactly the deltas sent, so streamed and final text agree
            finish_reason=row.finish_reason,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.generated,
            model=self.model_name,
        )
        events.append((row.source, completion))
        return events
