"""Opt-in fast decoding (SMOLCORD_FAST_PATH): bucketed static KV caches, compiled decode steps, a warm-up of every shape.

Stock `generate(cache_implementation="static")`, the compiled baseline in ../shared/gpu, is fast once
warm (320 tok/s at batch 1, 6,131 at 32 on an H200) but not servable as it is: it compiles on the
first call of each new shape (35-56 s, paid by a user), builds a new cache every call (new addresses,
so CUDA graphs are recorded again and again), and its cache length follows each call's prompt. Here:

- **One cache, sized once.** Per layer one flat K and one flat V buffer, allocated at load from
  SMOLCORD_KV_CACHE_GIB: max batch x max length, the length being what the budget holds at the largest
  batch bucket (capped at the model's context). A budget too small for a useful length fails at load.
- **Buckets.** Batches are padded to a batch bucket (1, 8, 32, capped by SMOLCORD_MAX_BATCH) and run
  with a cache length bucket (512, 1024, 2048, ... up to the max length): the smallest that holds
  the longest prompt plus the largest max_tokens. Every (batch, length) shape has its own
  `StaticCache` whose tensors are views of the front of the shared buffers: the shapes share memory (one
  batch runs at a time) and each keeps one address for ever, which CUDA graphs need. A batch that fits
  no bucket (too long) runs the plain way. Short buckets matter: every decode step attends to the
  whole cache length, and with a mask SDPA also copies K and V per query head (`repeat_kv`).
- **Dummy rows.** Padding rows are closed from the start (finish_reason "padding"), so the per-row hooks
  of model/generation.py never sample, stop or stream them: they reach no request, and their tokens are
  discarded with the batch.
- **Compiled decoding through `generate` itself** (`compile_config`), not a hand-written loop:
  transformers compiles only the decode step (the prefill, whose length varies, stays eager, so prompt
  lengths need no buckets) and keeps RowSampler / RowStopper / BatchStreamer working unchanged. The
  step is compiled with `dynamic=True`: dynamo then specialises only size-1 dimensions, so there are
  two graphs (one row; any larger batch), each for every cache length, whatever the number of buckets;
  CUDA graph trees (`mode="reduce-overhead"`) record one graph per concrete shape, which takes well
  under a second. `dynamic=False` would compile once per shape (~40 s each on an H200) and
  `dynamic=None` (automatic; the baseline's) two to four times, depending on the order in which shapes
  first arrive (the baseline compiled at batch 1 and again at 8; batch 32 then took 0.9 s).
- **Warm-up before ready.** `warm_up` runs every shape through the worker's own generation path, on the
  generation thread (CUDA graph trees are thread-local), before /v1/models stops answering 503.
- **Adapters.** Swaps write W0 + scale·BA into the weights in place (model/adapters.py): same addresses,
  shapes and dtypes, so they invalidate neither the compiled code nor the recorded CUDA graphs.

On a CPU the same static caches, buckets and padding run without compiling (tests), unless asked to.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import CompileConfig, StaticCache
from transformers.cache_utils import StaticLayer

from model.generation import Encoding, IncrementalDetokenizer, Row, SamplingParams

__all__ = [
    "DEFAULT_BATCH_BUCKETS",
    "MIN_LENGTH",
    "CachePlan",
    "FastPath",
    "FastPathError",
    "Launch",
    "kv_bytes_per_token",
    "plan_cache",
]

log = logging.getLogger(__name__)

DEFAULT_BATCH_BUCKETS = (1, 8, 32)  # each capped by SMOLCORD_MAX_BATCH, which is always a bucket itself
# The shortest cache length, and the least the budget must hold per row: a question with one photo
# (5 tiles: 374 tokens at SmolVLM-256M's dimensions) and a short answer. Longer buckets double it.
MIN_LENGTH = 512
_LENGTH_ALIGN = 64  # a max length that is not a doubling of MIN_LENGTH is rounded down to this
# Tokens per warm-up request: the prefill gives the first, then 4 compiled decode steps. CUDA graph
# trees run a new shape once without a graph, record it on the next call and replay it after that.
_WARM_UP_TOKENS = 5


class FastPathError(ValueError):
    """The fast path cannot run as configured (memory budget, buckets, model); the message says what to change."""


# ------------------------------------------------------------------------------ the memory plan


def _kv_heads(text_config: Any) -> tuple[int, int]:
    """(key/value heads, head dim) of a decoder config."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    return int(heads), int(head_dim)


def kv_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """What one position of one row costs in the KV cache: layers x kv heads x head dim x (K and V) x dtype bytes."""
    heads, head_dim = _kv_heads(text_config)
    element = torch.empty((), dtype=dtype).element_size()
    return int(text_config.num_hidden_layers * heads * head_dim * 2 * element)


@dataclass(frozen=True)
class CachePlan:
    """The fast path's shapes: batch buckets x cache length buckets, and the buffers they share."""

    bytes_per_token: int  # one row, one position, every layer, K and V
    batch_buckets: tuple[int, ...]  # ascending
    length_buckets: tuple[int, ...]  # ascending; the last is the max length

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    @property
    def max_length(self) -> int:
        return self.length_buckets[-1]

    @property
    def tokens(self) -> int:
        """Positions the shared buffers hold (the largest shape's)."""
        return self.max_batch * self.max_length

    @property
    def bytes(self) -> int:
        return self.tokens * self.bytes_per_token

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, cache length) the fast path runs, smallest first."""
        return [(batch, length) for batch in self.batch_buckets for length in self.length_buckets]

    def shape_for(self, rows: int, positions: int) -> tuple[int, int] | None:
        """The smallest shape for rows that need `positions` cache positions each; None when none holds them."""
        batch = next((b for b in self.batch_buckets if b >= rows), None)
        length = next((n for n in self.length_buckets if n >= positions), None)
        return None if batch is None or length is None else (batch, length)


def plan_cache(
    text_config: Any,
    *,
    dtype: torch.dtype,
    budget_gib: float,
    max_batch: int,
    max_model_len: int,
    batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
    length_buckets: Sequence[int] | None = None,
    min_length: int = MIN_LENGTH,
) -> CachePlan:
    """The buckets and cache size that SMOLCORD_KV_CACHE_GIB allows; FastPathError when it allows none worth having."""
    per_token = kv_bytes_per_token(text_config, dtype)
    batches = tuple(sorted({min(b, max_batch) for b in batch_buckets} | {max_batch}))
    if batches[0] < 1:
        raise FastPathError(f"batch buckets must be positive, not {batch_buckets}")
    budget_tokens = int(budget_gib * 2**30) // per_token
    fits = min(max_model_len, budget_tokens // batches[-1])
    if length_buckets is not None:
        lengths = tuple(sorted(set(length_buckets)))
        if lengths[-1] > fits:
            raise FastPathError(
                f"a cache length bucket of {lengths[-1]} at batch {batches[-1]} needs "
                f"{_gib(batches[-1] * lengths[-1] * per_token)} of KV cache; SMOLCORD_KV_CACHE_GIB={budget_gib:g} "
                f"holds {fits} positions a row (context {max_model_len})"
            )
        return CachePlan(per_token, batches, lengths)
    if fits < min_length:
        raise FastPathError(
            f"SMOLCORD_KV_CACHE_GIB={budget_gib:g} holds {budget_tokens} cache positions of this model "
            f"({per_token / 1024:.1f} KiB each): {fits} a row at SMOLCORD_MAX_BATCH={max_batch}, fewer than the "
            f"{min_length} a request with one image needs. Raise SMOLCORD_KV_CACHE_GIB to at least "
            f"{_gib(max_batch * min_length * per_token)}, lower SMOLCORD_MAX_BATCH, or turn SMOLCORD_FAST_PATH off."
        )
    ladder = [min_length]
    while ladder[-1] * 2 <= fits:
        ladder.append(ladder[-1] * 2)
    top = fits if fits == max_model_len else fits // _LENGTH_ALIGN * _LENGTH_ALIGN
    if top > ladder[-1]:
        ladder.append(top)  # whatever the budget holds beyond the last doubling is not wasted
    return CachePlan(per_token, batches, tuple(ladder))


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


# ------------------------------------------------------------------------------ padding rows


@dataclass(eq=False)
class _PaddingSource:
    """The request behind a dummy row: nobody; the row is closed before the first step."""

    id: str = "padding"
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=1))
    deadline: float = math.inf
    cancelled: bool = False
    model: str = ""


def _padding_row() -> Row:
    # Closed with a finish reason: RowSampler skips it, RowStopper counts it done from the first step,
    # BatchStreamer never delivers for it (so its detokenizer is never used).
    return Row(
        source=_PaddingSource(),
        prompt_tokens=1,
        detokenizer=IncrementalDetokenizer(None),
        finish_reason="padding",
        closed=True,
    )


@dataclass(frozen=True)
class Launch:
    """One fast-path generate: the rows padded to the shape, and what `generate` needs on top of the plain call."""

    shape: tuple[int, int]
    rows: list[Row]
    encodings: list[Encoding]
    config: dict[str, Any]  # GenerationConfig fields: compile_config, or disable_compile
    kwargs: dict[str, Any]  # generate kwargs: the shape's cache


# ------------------------------------------------------------------------------ the fast path


class FastPath:
    """Static caches for every shape of a CachePlan, the compile settings, and the warm-up; used by the Engine."""

    def __init__(
        self,
        model: Any,
        plan: CachePlan,
        *,
        pad_token_id: int,
        compile: bool | None = None,
        backend: str = "inductor",
        mode: str | None = None,
    ) -> None:
        self.model = model
        self.plan = plan
        self.pad_token_id = pad_token_id
        device: torch.device = model.device
        # Compiling pays off where launches dominate (CUDA); elsewhere it is off unless asked for (tests).
        self.compiled = device.type == "cuda" if compile is None else compile
        if self.compiled:
            if mode is None:
                mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else "default"
            compile_config = CompileConfig(fullgraph=False, dynamic=True, backend=backend, mode=mode)
            # generate compiles on CUDA only, unless this flag says otherwise (tests on a CPU).
            compile_config._compile_all_devices = device.type != "cuda"  # type: ignore[assignment]
            self._config: dict[str, Any] = {"compile_config": compile_config}
            self._compile_options: dict[str, Any] = {
                "fullgraph": False,
                "dynamic": True,
                "backend": backend,
                "mode": mode,
            }
        else:
            self._config = {"disable_compile": True}
            self._compile_options = {}
        # transformers 5.2x names generate's cache argument `cache`; earlier 5.x `past_key_values`.
        forward = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in forward else "past_key_values"
        # Batches run per shape (the warm-up's included), and batches too long for every shape.
        self.launches: collections.Counter[tuple[int, int]] = collections.Counter()
        # Decode steps of the continuous scheduler per shape (the warm-up's included).
        self.steps: collections.Counter[tuple[int, int]] = collections.Counter()
        self.fallbacks = 0
        self.warmed = False
        self.warm_up_s: float | None = None
        self.graphs_at_warm_up: int | None = None  # graphs dynamo compiled during warm-up
        self._graphs_after_warm_up = 0
        try:
            self._caches, self._slots = self._allocate(model, plan)
        except torch.OutOfMemoryError:
            raise FastPathError(
                f"the KV cache ({_gib(plan.bytes)}) does not fit beside the model on {device}: "
                "lower SMOLCORD_KV_CACHE_GIB"
            ) from None

    @classmethod
    def for_model(
        cls,
        model: Any,
        *,
        pad_token_id: int,
        budget_gib: float,
        max_batch: int,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        length_buckets: Sequence[int] | None = None,
        min_length: int = MIN_LENGTH,
        **options: Any,
    ) -> FastPath:
        """Plan the cache from the budget and allocate it (blocking); FastPathError when the budget is too small."""
        text_config = model.config.get_text_config()
        plan = plan_cache(
            text_config,
            dtype=model.dtype,
            budget_gib=budget_gib,
            max_batch=max_batch,
            max_model_len=int(text_config.max_position_embeddings),
            batch_buckets=batch_buckets,
            length_buckets=length_buckets,
            min_length=min_length,
        )
        fast_path = cls(model, plan, pad_token_id=pad_token_id, **options)
        log.info(
            "fast path: KV cache %s (%d rows x %d positions), batch buckets %s, length buckets %s, %s",
            _gib(plan.bytes),
            plan.max_batch,
            plan.max_length,
            plan.batch_buckets,
            plan.length_buckets,
            "compiled decoding" if fast_path.compiled else "not compiled",
        )
        return fast_path

    @staticmethod
    def _allocate(
        model: Any, plan: CachePlan
    ) -> tuple[dict[tuple[int, int], StaticCache], tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """One StaticCache per shape, every one a view of the front of the same per-layer buffers; and those
        buffers as the continuous scheduler's slots, (max batch, kv heads, max length, head dim) per layer."""
        text_config = model.config.get_text_config()
        heads, head_dim = _kv_heads(text_config)
        device, dtype = model.device, model.dtype
        size = plan.tokens * heads * head_dim
        layers = text_config.num_hidden_layers
        keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(layers)]
        values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(layers)]
        caches = {}
        for batch, length in plan.shapes:
            cache = StaticCache(config=model.config, max_cache_len=length)
            static_layers = [layer for layer in cache.layers if type(layer) is StaticLayer]
            if len(static_layers) != layers:
                raise FastPathError("the fast path serves full-attention models only (no sliding windows)")
            shape = (batch, heads, length, head_dim)
            used = batch * heads * length * head_dim
            stub = torch.zeros((batch, heads, 1, head_dim), dtype=dtype, device=device)
            for layer, k, v in zip(static_layers, keys, values, strict=True):
                # The layer's own lazy initialisation sets its device, sizes and counters (it allocates a
                # full-size tensor, one layer at a time, dropped at once); then its storage becomes ours.
                try:
                    layer.lazy_initialization(stub, stub)
                except TypeError:  # transformers before 5.x took the key states only
                    layer.lazy_initialization(stub)  # type: ignore[call-arg]
                layer.keys = k[:used].view(shape)
                layer.values = v[:used].view(shape)
                # Addresses that never change: CUDA graphs keep them instead of copying the cache in.
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)
            caches[(batch, length)] = cache
        slot_shape = (plan.max_batch, heads, plan.max_length, head_dim)
        slots: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for flat, views in ((keys, slots[0]), (values, slots[1])):
            for buffer in flat:
                view = buffer.view(slot_shape)
                torch._dynamo.mark_static_address(view)
                views.append(view)
        return caches, slots

    # -------------------------------------------------------------------------- per batch

    def launch(
        self, rows: list[Row], encodings: list[Encoding], *, shape: tuple[int, int] | None = None
    ) -> Launch | None:
        """Pad a batch to its shape (`shape` forces one: warm-up) and ready that shape's cache; None: run it plain."""
        if shape is None:
            prompt = max(encoding.prompt_tokens for encoding in encodings)
            positions = prompt + max(row.source.params.max_tokens for row in rows)
            shape = self.plan.shape_for(len(rows), positions)
            if shape is None:
                self.fallbacks += 1
                log.info(
                    "a batch of %d needing %d positions fits no fast-path shape: plain generate",
                    len(rows),
                    positions,
                )
                return None
        batch = shape[0]
        if len(rows) > batch:
            raise ValueError(f"{len(rows)} rows do not fit shape {shape}")
        padding = batch - len(rows)
        cache = self._caches[shape]
        cache.reset()  # zeroes the shape's part of the buffers in place and rewinds its positions
        self.launches[shape] += 1
        return Launch(
            shape=shape,
            rows=[*rows, *(_padding_row() for _ in range(padding))],
            encodings=[*encodings, *[self._padding_encoding()] * padding],
            config=dict(self._config),
            kwargs={self._cache_argument: cache},
        )

    def slot_buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The cache as the continuous scheduler's slots (model/continuous.py): per layer K and V of
        (max batch, kv heads, max length, head dim), the same memory as the static shapes' caches."""
        return self._slots

    def compile_options(self) -> dict[str, Any]:
        """`torch.compile` options of the continuous decode step: those of the static path's compile_config."""
        return dict(self._compile_options)

    def _padding_encoding(self) -> Encoding:
        return Encoding(input_ids=[self.pad_token_id])  # one token, no image: the cheapest row there is

    # -------------------------------------------------------------------------- warm-up

    @contextlib.contextmanager
    def warming(self) -> Iterator[None]:
        """Around the engine's warm-up loop (`Engine.warm_up`): counts the graphs it compiled, then
        marks the fast path warm (it serves only from then on)."""
        started = time.perf_counter()
        graphs_before = _graphs_compiled()
        yield
        self.graphs_at_warm_up = _graphs_compiled() - graphs_before
        self._graphs_after_warm_up = _graphs_compiled()
        self.warm_up_s = time.perf_counter() - started
        self.warmed = True
        log.info(
            "fast path: %d shapes warm in %.1f s (%d graphs compiled)",
            len(self.plan.shapes),
            self.warm_up_s,
            self.graphs_at_warm_up,
        )

    def graphs_since_warm_up(self) -> int:
        """Graphs dynamo compiled after the warm-up (a request paid a compile when this is not 0)."""
        return _graphs_compiled() - self._graphs_after_warm_up if self.warmed else 0

    def warm_up_prompt(
        self, encode: Callable[[list[dict[str, Any]], list[Image.Image]], Encoding]
    ) -> Encoding:
        """A question with a small photo (the prefill runs the vision tower too), or text alone when that is
        too long; `encode` is the engine's."""
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
        ]
        image = Image.new("RGB", (64, 48), (180, 90, 30))
        encoding = encode(conversation, [image])
        if encoding.prompt_tokens + _WARM_UP_TOKENS > self.plan.length_buckets[0]:
            encoding = encode([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], [])
        if encoding.prompt_tokens + _WARM_UP_TOKENS > self.plan.length_buckets[0]:
            raise FastPathError(
                f"the shortest cache length bucket ({self.plan.length_buckets[0]}) holds no prompt"
            )
        return encoding


@dataclass(eq=False)
class WarmUpRequest:
    """A request of the warm-up: greedy, exactly `_WARM_UP_TOKENS` tokens, delivered nowhere."""

    id: str = "warm-up"
    params: SamplingParams = field(
        default_factory=lambda: SamplingParams(max_tokens=_WARM_UP_TOKENS, ignore_eos=True)
    )
    deadline: float = math.inf
    cancelled: bool = False
    model: str = ""


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
