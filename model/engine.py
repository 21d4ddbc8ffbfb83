"""The served model: loading, prompt encoding, one batched generate, and adapter swaps.

`encode` may run on any threads (the app gives it a small pool); `run_batch` and `load_adapter`
run only on the scheduler's generation thread, so an adapter swap never meets a forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from model.adapters import MergedAdapters
from model.devices import resolve_device, resolve_dtype
from model.generation import (
    BatchStreamer,
    Deliver,
    Encoding,
    Failed,
    IncrementalDetokenizer,
    Row,
    RowSampler,
    RowSource,
    RowStopper,
)

if TYPE_CHECKING:
    from model.continuous import ContinuousBatch
    from model.fastpath import FastPath
    from smolcord.registry import AdapterRegistry

__all__ = ["Engine"]

log = logging.getLogger(__name__)


class Engine:
    """A vision-language model and its processor, ready to encode prompts and generate batches."""

    def __init__(self, model: Any, processor: Any, *, name: str) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.created = int(time.time())  # what /v1/models reports as the model's `created`
        self.device: torch.device = model.device
        self.dtype: torch.dtype = model.dtype
        text_config = model.config.get_text_config()
        self.max_model_len: int = int(text_config.max_position_embeddings)
        tokenizer = processor.tokenizer
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stop_ids: set[int] = _stop_ids(model, tokenizer)
        # The Rust tokenizer is not safe to share between threads: the generation thread decodes with
        # its own copy, and each thread that encodes gets its own processor (see _thread_processor).
        self._decoder = copy.deepcopy(tokenizer)
        self._local = threading.local()
        # Strings the processor expands into image tokens: typed by a user, they would break the image count.
        self._image_markers = tuple(
            marker
            for marker in (
                getattr(processor, "image_token", None),
                getattr(processor, "fake_image_token", None),
                getattr(processor, "global_image_tag", None),
            )
            if marker
        )
        self._adapters = MergedAdapters(self.model, base_model_id=name)
        # The canary candidate: a second engine around its own copy of the model (see `load_candidate`).
        self.candidate: Engine | None = None
        # Opt-in (SMOLCORD_FAST_PATH): static caches, buckets and compiled decoding, see model/fastpath.py.
        self.fast_path: FastPath | None = None
        self._continuous: ContinuousBatch | None = None

    @classmethod
    def load(cls, model_id: str, *, device: str = "auto", dtype: str = "auto") -> Engine:
        """Load a hub id or a local folder with the Auto classes (blocking: seconds to minutes)."""
        started = time.perf_counter()
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        processor = AutoProcessor.from_pretrained(model_id)
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch_dtype)
        model.to(target)  # type: ignore[arg-type]  # transformers' stub of .to() wants no arguments
        engine = cls(model, processor, name=model_id)
        log.info(
            "loaded %s on %s as %s in %.1f s (max_model_len %d)",
            model_id,
            target,
            str(torch_dtype).removeprefix("torch."),
            time.perf_counter() - started,
            engine.max_model_len,
        )
        return engine

    # ------------------------------------------------------------------ fast path (model/fastpath.py)

    def enable_fast_path(self, *, kv_cache_gib: float, max_batch: int, **options: Any) -> None:
        """Allocate the fast path's KV cache (blocking); FastPathError when the budget cannot hold it.

        It serves only once `warm_up` has run: until then `ready` is False. Options go to `FastPath.for_model`.
        """
        from model.fastpath import FastPath

        self.fast_path = FastPath.for_model(
            self.model,
            pad_token_id=self.pad_token_id,
            budget_gib=kv_cache_gib,
            max_batch=max_batch,
            **options,
        )
        self._continuous = None  # its cache and compiled step belonged to the plain path

    def disable_fast_path(self) -> None:
        """Serve with plain `generate` again (dropping the fast path's cache). Generation thread only."""
        self.fast_path = None
        self._continuous = None

    @property
    def continuous(self) -> ContinuousBatch:
        """The continuous scheduler's running batch (model/continuous.py), one per engine. Generation thread only."""
        if self._continuous is None:
            from model.continuous import ContinuousBatch

            self._continuous = ContinuousBatch(self)
        return self._continuous

    @property
    def ready(self) -> bool:
        """False while the fast path has shapes still to warm up: /v1/models answers 503 until then."""
        return self.fast_path is None or self.fast_path.warmed

    def warm_up(self, *, continuous: bool = False) -> None:
        """Run every fast-path shape once, so no request pays a compile: through `run_batch` (the static
        scheduler), or as one decode step of the continuous batch (`continuous`).

        Generation thread only: CUDA graphs belong to a thread. The fast path supplies the shapes and
        the prompt and keeps the count of what was compiled; the loop that drives the engine is here.
        """
        from model.fastpath import FastPathError, WarmUpRequest

        fast = self.fast_path
        if fast is None or fast.warmed:
            return
        if continuous:
            with fast.warming():
                for shape in fast.plan.shapes:
                    started = time.perf_counter()
                    self.continuous.warm_up_step(shape)
                    log.info("fast path: step %s warm in %.1f s", shape, time.perf_counter() - started)
            return
        prompt = fast.warm_up_prompt(self.encode)
        with fast.warming():
            for shape in fast.plan.shapes:
                started = time.perf_counter()
                failures: list[str] = []

                def deliver(events: list[tuple[Any, Any]], failures: list[str] = failures) -> None:
                    failures.extend(event.message for _, event in events if isinstance(event, Failed))

                rows = [(WarmUpRequest(), prompt) for _ in range(shape[0])]
                self.run_batch(rows, deliver, shape=shape)
                if failures:
                    raise FastPathError(f"warming up shape {shape} failed: {failures[0]}")
                log.info("fast path: shape %s warm in %.1f s", shape, time.perf_counter() - started)

    # ------------------------------------------------------------------ served name and adapters

    @property
    def adapter_version(self) -> str | None:
        return self._adapters.version

    @property
    def served_name(self) -> str:
        """`<base>:<adapter version>`, or `<base>` when no adapter is served."""
        version = self.adapter_version
        return f"{self.name}:{version}" if version else self.name

    def load_adapter(self, path: Path | None, *, version: str | None) -> None:
        """Serve this adapter merged (None: the base). Generation thread only; AdapterError leaves weights as they were."""
        if version is not None and version == self.adapter_version:
            return  # registry versions never change once written: two admin calls racing swap once
        self._adapters.load(path, version=version)

    def serve_registry_current(self, registry: AdapterRegistry) -> tuple[str | None, str | None]:
        """Serve what the registry's `current` names now (None: the base); returns (before, after). Generation thread only.

        `current` is read here, inside the exclusive job, not by the caller: two calls racing with
        a rollback then end on what `current` names when the last of them runs, never on a version
        one of them read earlier. RegistryError and AdapterError (weights unchanged) propagate.
        """
        before = self.adapter_version
        version = registry.current()
        if version != before:
            self.load_adapter(registry.path(version) if version else None, version=version)
        return before, version

    # ------------------------------------------------------------------ the canary candidate

    @property
    def candidate_version(self) -> str | None:
        """The version the candidate copy serves (None: no candidate)."""
        return self.candidate.adapter_version if self.candidate is not None else None

    def engines(self) -> list[Engine]:
        """The engines serving now: this one (current) first, then the candidate's."""
        return [self] if self.candidate is None else [self, self.candidate]

    def engine_for(self, version: str | None) -> Engine:
        """The engine serving `version`: the candidate's when it serves it (and current does not), else this one.

        Resolved when a request starts, not when it arrives: a request for a candidate dropped or
        promoted meanwhile is answered by current, and its response's `model` says so.
        """
        candidate = self.candidate
        if (
            candidate is not None
            and version is not None
            and version == candidate.adapter_version
            and version != self.adapter_version
        ):
            return candidate
        return self

    def load_candidate(self, path: Path | None, *, version: str | None) -> None:
        """Serve this adapter as the candidate, beside current (None: drop it). Generation thread only.

        The candidate is a second engine around a full copy of the model, made from this one's
        weights with their pristine base written back (nothing is read from the hub or the checkpoint
        again); its adapter is merged into the copy like current's. Replacing it re-merges into the
        same copy; dropping it frees the copy. AdapterError leaves the candidate as it was.
        """
        if path is None:
            if self.candidate is not None:
                log.info("candidate %s dropped", self.candidate.adapter_version)
            self.candidate = None
            return
        if self.candidate is not None:
            self.candidate.load_adapter(path, version=version)
            return
        if self.fast_path is not None:
            # Its own fast path would need its own compiled graphs and warm-up (an exclusive job that
            # stalls every request for as long as it compiles) and its own share of the KV budget,
            # all for a minority of the traffic: see docs/architecture.md, "Two versions at once".
            log.info(
                "fast path: candidate %s runs the plain path (eager, own growing cache), not compiled",
                version,
            )
        started = time.perf_counter()
        candidate = Engine(self._base_copy(), self.processor, name=self.name)
        candidate.created = self.created
        candidate.load_adapter(path, version=version)  # AdapterError: the copy is dropped with it
        self.candidate = candidate
        log.info(
            "candidate %s served beside %s (copy of %.0f MB, %.1f s)",
            version,
            self.adapter_version or "base",
            _parameter_bytes(candidate.model) / 2**20,
            time.perf_counter() - started,
        )

    def _base_copy(self) -> Any:
        """A copy of the model holding the base weights: built from the config, then every tensor copied.

        Not `copy.deepcopy`: whatever generate or the fast path attached to the model (compiled
        callables, caches) would be copied too, or refuse to be.
        """
        model = self.model
        with torch.device("meta"):
            clone = type(model)._from_config(copy.deepcopy(model.config), dtype=model.dtype)
        clone.to_empty(device=self.device)
        with torch.no_grad():
            own = dict(clone.named_parameters(remove_duplicate=False))
            for name, param in model.named_parameters(remove_duplicate=False):
                own[name].copy_(param)
            buffers = dict(clone.named_buffers(remove_duplicate=False))
            for name, buffer in model.named_buffers(remove_duplicate=False):
                buffers[name].copy_(buffer)
        self._adapters.base_weights(clone)
        clone.generation_config = copy.deepcopy(model.generation_config)
        return clone.eval()

    def serve_registry_candidate(self, registry: AdapterRegistry) -> tuple[str | None, str | None]:
        """Serve what the registry's `candidate` names now (None: no candidate); returns (before, after).

        Generation thread only; read inside the exclusive job, as `serve_registry_current` reads `current`.
        RegistryError and AdapterError (candidate unchanged) propagate.
        """
        before = self.candidate_version
        version = registry.candidate()
        if version != before:
            self.load_candidate(registry.path(version) if version else None, version=version)
        return before, version

    # ------------------------------------------------------------------ prompts

    def encode(self, conversation: list[dict[str, Any]], images: Sequence[Image.Image]) -> Encoding:
        """Apply the chat template and the processor to one conversation and its images, in order.

        `conversation` is in the processor's format: content lists of {"type": "text", "text"} and
        {"type": "image"} parts, one image part per entry of `images`.
        """
        cleaned = [
            {**message, "content": [self._clean_part(part) for part in message["content"]]}
            for message in conversation
        ]
        processor = self._thread_processor()
        prompt = processor.apply_chat_template(cleaned, add_generation_prompt=True, tokenize=False)
        batch = processor(text=[prompt], images=[list(images)] if images else None, return_tensors="pt")
        pixel_values = batch.get("pixel_values")
        mask = batch.get("pixel_attention_mask")
        return Encoding(
            input_ids=batch["input_ids"][0].tolist(),
            # Kept in the model's precision: a queued 5-tile request is 8 MB in bfloat16, 16 in float32.
            pixel_values=pixel_values[0].to(self.dtype) if pixel_values is not None else None,
            pixel_attention_mask=mask[0] if mask is not None else None,
        )

    def _thread_processor(self) -> Any:
        """This thread's own copy of the processor, so several threads can encode at once."""
        processor = getattr(self._local, "processor", None)
        if processor is None:
            processor = self._local.processor = copy.deepcopy(self.processor)
        return processor

    def _clean_part(self, part: dict[str, Any]) -> dict[str, Any]:
        if part.get("type") != "text":
            return part
        text = part["text"]
        for marker in self._image_markers:
            text = text.replace(marker, "")
        return {"type": "text", "text": text}

    def collate(self, encodings: Sequence[Encoding]) -> dict[str, torch.Tensor]:
        """Left-pad rows into one batch, as the processor pads several prompts; rows without images get blank tiles.

        Idefics3 drops all-zero tiles before the vision encoder, so a blank tile costs nothing and a
        text-only row can share a batch with image rows.
        """
        width = max(e.prompt_tokens for e in encodings)
        input_ids = torch.full((len(encodings), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encodings), width), dtype=torch.long)
        for i, encoding in enumerate(encodings):
            n = encoding.prompt_tokens
            input_ids[i, width - n :] = torch.tensor(encoding.input_ids, dtype=torch.long)
            attention_mask[i, width - n :] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}

        shapes = [e.pixel_values.shape for e in encodings if e.pixel_values is not None]
        if shapes:
            tiles, channels = max(s[0] for s in shapes), shapes[0][1]
            height, width_px = max(s[2] for s in shapes), max(s[3] for s in shapes)
            pixel_values = torch.zeros((len(encodings), tiles, channels, height, width_px), dtype=self.dtype)
            pixel_mask = torch.zeros((len(encodings), tiles, height, width_px), dtype=torch.bool)
            for i, encoding in enumerate(encodings):
                if encoding.pixel_values is None:
                    continue
                n, _, h, w = encoding.pixel_values.shape
                pixel_values[i, :n, :, :h, :w] = encoding.pixel_values
                if encoding.pixel_attention_mask is not None:
                    pixel_mask[i, :n, :h, :w] = encoding.pixel_attention_mask.bool()
                else:
                    pixel_mask[i, :n, :h, :w] = True
            batch["pixel_values"] = pixel_values
            batch["pixel_attention_mask"] = pixel_mask
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    # ------------------------------------------------------------------ generation

    def run_batch(
        self,
        requests: Sequence[tuple[RowSource, Encoding]],
        deliver: Deliver,
        *,
        shape: tuple[int, int] | None = None,
    ) -> None:
        """Generate for every request in one call; each gets its own deltas and completion through deliver.

        `shape` (fast path only, for its warm-up) forces a (batch, cache length) bucket.
        """
        rows = [
            Row(
                source=source,
                prompt_tokens=encoding.prompt_tokens,
                detokenizer=IncrementalDetokenizer(self._decoder),
            )
            for source, encoding in requests
        ]
        encodings = [encoding for _, encoding in requests]
        max_new_tokens = max(source.params.max_tokens for source, _ in requests)
        # Fast path: rows padded with closed dummy rows to a warmed-up shape, that shape's static cache and
        # the compile settings. None (no fast path, or a batch too long for every shape): plain generate.
        try:
            launch = (
                self.fast_path.launch(rows, encodings, shape=shape) if self.fast_path is not None else None
            )
        except Exception as exc:
            log.exception("the fast path could not take a batch of %d", len(rows))
            streamer = BatchStreamer(
                rows, stop_ids=self.stop_ids, model_name=self.served_name, deliver=deliver
            )
            streamer.fail_all(f"generation failed: {type(exc).__name__}")
            return
        if launch is not None:
            rows, encodings = launch.rows, launch.encodings
        streamer = BatchStreamer(rows, stop_ids=self.stop_ids, model_name=self.served_name, deliver=deliver)
        try:
            inputs = self.collate(encodings)
            config = GenerationConfig(
                max_new_tokens=max_new_tokens,
                do_sample=False,  # RowSampler does each row's sampling; greedy then keeps its choice
                # No eos for generate's own criterion (an empty list, so the model's default does not
                # fill it in): RowStopper alone ends rows, and honours each request's ignore_eos.
                eos_token_id=[],
                pad_token_id=self.pad_token_id,
                use_cache=True,
                **(launch.config if launch is not None else {}),
            )
            # The fast path runs under generate's own no_grad, as the measured compiled baseline did:
            # its caches are ordinary tensors, updated in place by the compiled step.
            with torch.inference_mode() if launch is None else contextlib.nullcontext():
                self.model.generate(
                    **inputs,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([RowSampler(rows)]),
                    stopping_criteria=StoppingCriteriaList(
                        [RowStopper(rows, stop_ids=self.stop_ids, max_model_len=self.max_model_len)]
                    ),
                    streamer=streamer,
                    **(launch.kwargs if launch is not None else {}),
                )
        except Exception as exc:
            log.exception("generate failed for a batch of %d", len(rows))
            streamer.fail_all(f"generation failed: {type(exc).__name__}")
        else:
            streamer.close_all("length")


def _parameter_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-turn ids: the generation config's eos ids, the tokenizer's eos and <end_of_utterance>."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is not None:
        ids.update(eos if isinstance(eos, list | tuple) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    end_of_utterance = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    if isinstance(end_of_utterance, int) and end_of_utterance != tokenizer.unk_token_id:
        ids.add(end_of_utterance)
    return ids
