"""Continuous batching: the worker's own decode loop, one step at a time; requests join and leave between steps.

The static scheduler (`Engine.run_batch`) hands a whole batch to `generate` and waits for its longest
row. Here every request owns a *slot* of a KV cache (one row of a per-layer (slots, kv heads,
positions, head dim) tensor) and its own positions in it, so rows of any length share a step:

- **join**: a request is prefilled into a free slot (vision tower, then the prompt's text in
  chunks); the prefill's last logits give its first token; it decodes from the next step on;
- **step**: one forward of every decoding row's last token at its own position (each writes its
  K/V at its own index: transformers' `StaticLayer` keeps one write position for the whole batch,
  which is why the cache layer here is our own, `_Window`), then each row samples, stops and
  streams itself through `model.generation.Row`, exactly as in a static batch;
- **leave**: a row that ended (stop, length, cancelled, timeout, error) frees its slot at once.

Slots between decoding rows (free, or holding a row still in prefill) are dummy rows: they feed a
pad token and write at the cache's last position, which no request ever reaches (a request is
admitted only when prompt + max_tokens fits, and the last token it chooses is never fed).

Prefill is chunked so that a long image prompt does not stall the running rows: each iteration
spends at most `prefill_budget` tokens of prefill work (vision tiles counted by the tokens they
become) before the decode step; with no row decoding, it runs whole.

Without the fast path the cache grows by doublings as rows need it and is dropped when idle, and a
step runs exactly the rows and positions in use. With it (SMOLCORD_FAST_PATH), the cache is the fast
path's own buffers, steps are padded to its (batch, cache length) buckets, and on CUDA the decode
step is compiled once per bucket at warm-up: rows joining and leaving within a bucket change tensor
values only, never shapes, so nothing recompiles.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from model.generation import (
    Deliver,
    Encoding,
    Event,
    IncrementalDetokenizer,
    Row,
    RowSampler,
    RowSource,
)

if TYPE_CHECKING:
    from model.engine import Engine

__all__ = ["ContinuousBatch"]

log = logging.getLogger(__name__)

# Prefill work per iteration while rows decode, in prompt tokens: a few decode steps' worth of compute
# on a GPU (one step of a batch of 16 reads every weight once; 512 prompt tokens are one matmul pass).
DEFAULT_PREFILL_BUDGET = 512
_MIN_CAPACITY = 256  # the plain cache's first length; it doubles from there as rows need


class SlotCache:
    """Per layer one K and one V tensor of (slots, kv heads, positions, head dim): one slot per row."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values

    @classmethod
    def allocate(
        cls, text_config: Any, *, slots: int, capacity: int, dtype: torch.dtype, device: Any
    ) -> SlotCache:
        heads, head_dim = _kv_heads(text_config)
        shape = (slots, heads, capacity, head_dim)
        layers = text_config.num_hidden_layers
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
        )

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        """Positions per slot; the last is the dummy rows' scratch position."""
        return self.keys[0].shape[2]

    def grown(self, *, slots: int, capacity: int) -> SlotCache:
        """A larger cache holding this one's contents (the plain path grows by doublings)."""
        if slots <= self.slots and capacity <= self.capacity:
            return self
        slots, capacity = max(slots, self.slots), max(capacity, self.capacity)
        bigger = []
        for tensors in (self.keys, self.values):
            new = []
            for old in tensors:
                tensor = old.new_zeros((slots, old.shape[1], capacity, old.shape[3]))
                tensor[: old.shape[0], :, : old.shape[2]] = old
                new.append(tensor)
            bigger.append(new)
        return SlotCache(bigger[0], bigger[1])


def _kv_heads(text_config: Any) -> tuple[int, int]:
    from model.fastpath import _kv_heads as kv_heads

    return kv_heads(text_config)


class _Window:
    """The cache as the attention layers of one forward see it (transformers' `Cache.update` protocol).

    Row b writes its new keys and values at `positions[b]` of slot `rows[b]`, and reads slots
    `first .. first + batch` up to `length` positions (the mask hides what is not its own).
    """

    def __init__(
        self, cache: SlotCache, rows: torch.Tensor, positions: torch.Tensor, first: int, length: int
    ) -> None:
        self.cache = cache
        self.rows = rows  # (batch, 1)
        self.positions = positions  # (batch, tokens)
        self.first = first
        self.length = length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        # (batch, heads, tokens, dim) -> (batch, tokens, heads, dim): the layout of keys[rows, :, positions]
        keys[self.rows, :, self.positions] = key_states.transpose(1, 2)
        values[self.rows, :, self.positions] = value_states.transpose(1, 2)
        last = self.first + key_states.shape[0]
        return keys[self.first : last, :, : self.length], values[self.first : last, :, : self.length]


# ------------------------------------------------------------------------------ rows


@dataclass(eq=False)
class _Slot:
    """A request in the batch: its row, its slot, and where it is in its prompt and answer."""

    row: Row
    encoding: Encoding
    index: int  # the slot
    admitted: float = field(default_factory=time.monotonic)
    filled: int = 0  # prompt positions written to the cache so far
    features: list[torch.Tensor] = field(default_factory=list)  # image features computed so far
    tiles_done: int = 0
    embeds: torch.Tensor | None = None  # the whole prompt's input embeddings, once the images are in
    last_token: int = 0  # the token to feed next (decoding rows)

    @property
    def decoding(self) -> bool:
        return self.filled == self.encoding.prompt_tokens

    @property
    def length(self) -> int:
        """Positions of the cache this row has written."""
        return self.filled + max(0, self.row.generated - 1)


# ------------------------------------------------------------------------------ the batch


class ContinuousBatch:
    """The running batch of the continuous scheduler: admit, step, and rows leave by themselves. Generation thread only."""

    def __init__(self, engine: Engine, *, prefill_budget: int = DEFAULT_PREFILL_BUDGET) -> None:
        self.engine = engine
        self.model = engine.model
        self.text = engine.model.model.text_model
        self.prefill_budget = prefill_budget
        config = engine.model.config
        vision = config.vision_config
        # What one vision tile becomes in the prompt: (image size / patch size)^2 patches, pixel-shuffled.
        self.tile_tokens = max(1, (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2)
        forward = inspect.signature(self.text.layers[0].forward).parameters
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        self._slots: list[_Slot | None] = []
        self._cache: SlotCache | None = None
        self._decode: Callable[..., torch.Tensor] = self._decode_forward
        self._compiled_for: object | None = None
        self.steps = 0  # decode steps run, for metrics and tests

    # -------------------------------------------------------------------------- what the scheduler uses

    def __len__(self) -> int:
        return sum(slot is not None for slot in self._slots)

    @property
    def idle(self) -> bool:
        return len(self) == 0

    def sources(self) -> list[RowSource]:
        return [slot.row.source for slot in self._slots if slot is not None]

    @property
    def max_rows(self) -> int | None:
        """Rows the cache can hold at once (the fast path's slots); None: as many as the scheduler admits."""
        fast = self.engine.fast_path
        return fast.plan.max_batch if fast is not None else None

    def fits(self, encoding: Encoding, max_tokens: int) -> bool:
        """Whether one slot can hold this request's prompt and answer (the fast path's cache length bounds it)."""
        fast = self.engine.fast_path
        needs = encoding.prompt_tokens + max_tokens
        return needs <= (fast.plan.max_length if fast is not None else self.engine.max_model_len)

    def admit(self, source: RowSource, encoding: Encoding) -> None:
        """Give the request a free slot; its prefill starts with the next `step`."""
        source.model = self.engine.served_name  # before any of its events is delivered
        row = Row(
            source=source,
            prompt_tokens=encoding.prompt_tokens,
            detokenizer=IncrementalDetokenizer(self.engine._decoder),
        )
        index = next((i for i, slot in enumerate(self._slots) if slot is None), len(self._slots))
        slot = _Slot(row=row, encoding=encoding, index=index)
        if index == len(self._slots):
            self._slots.append(slot)
        else:
            self._slots[index] = slot
        self._ensure_cache(slots=len(self._slots), needs=encoding.prompt_tokens + source.params.max_tokens)

    def step(self, deliver: Deliver) -> None:
        """One iteration: prefill work for joining rows, one decode step for the others; events go out after each."""
        try:
            self._drop_abandoned()
            self._prefill()
            self._release(deliver)  # first tokens (and rows that left while joining) go out before the step
            self._decode_step(deliver)
        except Exception as exc:
            log.exception("a decode step failed for a batch of %d", len(self))
            for slot in self._slots:
                if slot is not None:
                    slot.row.fail("decoding", f"generation failed: {type(exc).__name__}")
            self._release(deliver)

    # -------------------------------------------------------------------------- the cache

    def _ensure_cache(self, *, slots: int, needs: int) -> None:
        fast = self.engine.fast_path
        if fast is not None:
            if self._cache is None:
                self._cache = SlotCache(*fast.slot_buffers())
            if slots > self._cache.slots:
                raise ValueError(f"{slots} rows do not fit the fast path's {self._cache.slots} slots")
            return
        capacity = min(self.engine.max_model_len, max(_MIN_CAPACITY, 1 << max(0, needs - 1).bit_length()))
        slots = 1 << max(0, slots - 1).bit_length()
        if self._cache is None:
            self._cache = SlotCache.allocate(
                self.text.config,
                slots=slots,
                capacity=capacity,
                dtype=self.engine.dtype,
                device=self.engine.device,
            )
        else:
            self._cache = self._cache.grown(slots=slots, capacity=capacity)

    def reset(self) -> None:
        """Forget the cache (the fast path was turned on or off); only when no row is in the batch."""
        assert self.idle
        self._cache = None
        self._decode = self._decode_forward
        self._compiled_for = None

    # -------------------------------------------------------------------------- joining

    def _drop_abandoned(self) -> None:
        """Rows whose client left or whose deadline passed end before any more work is spent on them."""
        now = time.monotonic()
        for slot in self._slots:
            if slot is None or slot.row.closed:
                continue
            source = slot.row.source
            if source.cancelled:
                slot.row.finish("cancelled")
            elif now >= source.deadline:
                slot.row.finish("timeout")

    def _joining(self) -> Iterator[_Slot]:
        return (s for s in self._slots if s is not None and not s.decoding and not s.row.closed)

    def _prefill(self) -> None:
        """Prefill work, oldest request first, up to the budget (unbounded while no row decodes)."""
        decoding = any(s is not None and s.decoding and not s.row.closed for s in self._slots)
        budget = self.prefill_budget if decoding else math.inf
        spent = 0
        for slot in sorted(self._joining(), key=lambda s: s.admitted):
            while spent < budget and not slot.decoding:
                spent += self._prefill_piece(slot, budget - spent)
            if spent >= budget:
                break

    @torch.no_grad()
    def _prefill_piece(self, slot: _Slot, budget: float) -> int:
        """One piece of a row's prefill (a group of vision tiles, or a chunk of its prompt); returns its cost in tokens."""
        encoding = slot.encoding
        if slot.embeds is None:
            pixels = encoding.pixel_values
            tiles = pixels.shape[0] if pixels is not None else 0
            if slot.tiles_done < tiles:
                assert pixels is not None
                group = max(1, int(min(budget, 1 << 30)) // self.tile_tokens)
                end = min(tiles, slot.tiles_done + group)
                mask = encoding.pixel_attention_mask
                features = self.model.model.get_image_features(
                    pixels[None, slot.tiles_done : end].to(self.engine.device),
                    mask[None, slot.tiles_done : end].to(self.engine.device) if mask is not None else None,
                    return_dict=True,
                ).pooler_output
                slot.features.extend(features)
                cost = (end - slot.tiles_done) * self.tile_tokens
                slot.tiles_done = end
                return cost
            input_ids = torch.tensor([encoding.input_ids], device=self.engine.device)
            embeds = self.text.get_input_embeddings()(input_ids)
            if slot.features:
                embeds = self.model.model.inputs_merger(
                    input_ids=input_ids, inputs_embeds=embeds, image_hidden_states=torch.cat(slot.features)
                )
            slot.embeds, slot.features = embeds, []
        start = slot.filled
        end = min(encoding.prompt_tokens, start + max(1, int(min(budget, 1 << 30))))
        positions = torch.arange(start, end, device=self.engine.device)[None]
        mask = self._mask(positions[0][:, None], end)[None, None]  # (1, 1, tokens, end)
        rows = torch.tensor([[slot.index]], device=self.engine.device)
        hidden = self._layers(slot.embeds[:, start:end], positions, rows, mask, first=slot.index)
        slot.filled = end
        if slot.decoding:
            slot.embeds = None
            logits = self.model.lm_head(hidden[:, -1])
            self._advance([slot], logits)
        return end - start

    # -------------------------------------------------------------------------- decoding

    def _decode_step(self, deliver: Deliver) -> None:
        live = [s for s in self._slots if s is not None and s.decoding and not s.row.closed]
        if not live:
            return
        assert self._cache is not None
        batch = max(s.index for s in live) + 1
        length = max(s.length for s in live) + 1
        fast = self.engine.fast_path
        if fast is not None:
            shape = fast.plan.shape_for(batch, length)
            assert shape is not None  # admitted only when it fits the largest shape
            batch, length = shape
        scratch = self._cache.capacity - 1
        ids = [self.engine.pad_token_id] * batch
        positions = [scratch] * batch
        for slot in live:
            ids[slot.index] = slot.last_token
            positions[slot.index] = slot.length
        device = self.engine.device
        logits = self._run_decode(
            torch.tensor(ids, device=device)[:, None], torch.tensor(positions, device=device)[:, None], length
        )
        self.steps += 1
        # A copy (indexing gathers): a CUDA graph's output is overwritten by its next replay, and rows pin
        # their choice in place.
        self._advance(live, logits[[s.index for s in live]])
        self._release(deliver)

    def _run_decode(self, input_ids: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        fast = self.engine.fast_path
        if fast is not None:
            fast.steps[(input_ids.shape[0], length)] += 1
        if fast is not None and fast.compiled and self._compiled_for is not fast:
            # Once per fast path: the graphs belong to this step function and this cache's addresses.
            self._decode = torch.compile(self._decode_forward, **fast.compile_options())
            self._compiled_for = fast
        mask = self._mask(positions, length)[:, None, None]  # (batch, 1, 1, length)
        with torch.no_grad():
            out = self._decode(input_ids, positions, mask)
        return out.float()

    def _decode_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The step the fast path compiles: embed, the layers over the slot cache, the head; (batch, vocab) logits."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
        hidden = self._layers(self.text.get_input_embeddings()(input_ids), positions, rows, mask, first=0)
        return self.model.lm_head(hidden[:, -1])

    def _layers(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        mask: torch.Tensor,
        *,
        first: int,
    ) -> torch.Tensor:
        assert self._cache is not None
        window = _Window(self._cache, rows, positions, first, mask.shape[-1])
        hidden = embeds
        rotary = self.text.rotary_emb(hidden, position_ids=positions)
        for layer in self.text.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                position_embeddings=rotary,
                use_cache=True,
                **{self._cache_argument: window},
            )
        return self.text.norm(hidden)

    def _mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Additive attention mask: each query sees the positions up to its own, (…, length)."""
        visible = torch.arange(length, device=positions.device) <= positions
        zero = torch.zeros((), dtype=self.engine.dtype, device=positions.device)
        return torch.where(visible, zero, torch.finfo(self.engine.dtype).min)

    # -------------------------------------------------------------------------- per row

    def _advance(self, slots: list[_Slot], logits: torch.Tensor) -> None:
        """Each row samples (its own params and seed), takes its token and decides whether it ended."""
        logits = logits.float()
        rows = [slot.row for slot in slots]
        no_ids = cast(
            torch.LongTensor, torch.zeros((len(rows), 1), dtype=torch.long)
        )  # unused by the sampler
        RowSampler(rows)(no_ids, cast(torch.FloatTensor, logits))
        tokens = logits.argmax(-1).tolist()
        now = time.monotonic()
        for slot, token in zip(slots, tokens, strict=True):
            slot.last_token = token
            slot.row.advance(
                token, stop_ids=self.engine.stop_ids, max_model_len=self.engine.max_model_len, now=now
            )

    def _release(self, deliver: Deliver) -> None:
        """Deliver every row's new events; closed rows leave and their slots are free for the next request."""
        events: list[tuple[Any, Event]] = []
        for i, slot in enumerate(self._slots):
            if slot is None:
                continue
            events.extend((slot.row.source, event) for event in slot.row.take_events())
            if slot.row.closed:
                self._slots[i] = None
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        if events:
            deliver(events)
        if not self._slots and self.engine.fast_path is None:
            self._cache = None  # the plain cache is memory only a running batch needs

    # -------------------------------------------------------------------------- fast path warm-up

    def warm_up_step(self, shape: tuple[int, int]) -> None:
        """Run one decode step of this (batch, cache length) shape with dummy rows only (compiles it)."""
        assert self.idle
        batch, length = shape
        self._ensure_cache(slots=batch, needs=1)
        assert self._cache is not None
        device = self.engine.device
        ids = torch.full((batch, 1), self.engine.pad_token_id, device=device)
        positions = torch.full((batch, 1), self._cache.capacity - 1, device=device)
        self._run_decode(ids, positions, length)
