"""The model and the trainer: the base as the job loads it (device, precision, 4-bit, free GPU memory,
the LoRA targets) and trl's trainers around it (DPO, KTO, and SFT then DPO for sft+dpo).

On CUDA, models of 1B parameters and more load in 4-bit NF4 (QLoRA) with gradient checkpointing;
the vision tower, the connector and the LM head stay out of 4-bit (bitsandbytes wants their full
module paths, read here from the model itself). Everything else, and everything on the CPU, loads
in the worker's dtype (bf16 on CUDA, fp32 on CPU), so the whole loop runs on a laptop.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from feedback.training.config import TrainArguments
    from feedback.training.data import TrainingData

__all__ = [
    "LORA_MODULES",
    "ModelPlan",
    "NotEnoughGpuMemory",
    "build_trainer",
    "check_gpu_memory",
    "completion_only_logprobs",
    "load_for_training",
    "lora_config",
    "plan_model",
    "supervised_pass",
]

log = logging.getLogger(__name__)

# The Linear layers of every text decoder block that LoRA adapts (attention and MLP): all of the
# text model's; the connector's and the vision tower's Linears only when lora_targets asks for them.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = ("text", "text+connector", "all")

# Models this large are trained in 4-bit on CUDA (SmolVLM-2B: ~2.2B; SmolVLM-256M stays in bf16).
QUANTIZE_FROM_PARAMS = 1_000_000_000


class NotEnoughGpuMemory(RuntimeError):
    """Less free GPU memory than the run needs: loading would push the worker out of memory."""


@dataclass(frozen=True)
class ModelPlan:
    """How the base will be loaded, decided before any weight is read."""

    model_id: str
    device: torch.device
    dtype: torch.dtype
    quantize: bool
    gradient_checkpointing: bool
    params: int
    text_model: str  # module path of the language model, e.g. "model.text_model"
    skip_modules: tuple[str, ...]  # full module paths kept out of 4-bit
    need_bytes: int  # GPU memory the run is expected to need
    connector_linears: tuple[str, ...] = ()  # full paths of the connector's Linear layers
    vision_linears: tuple[str, ...] = ()  # full paths of the vision tower's Linear layers

    def describe(self) -> str:
        precision = "4-bit NF4" if self.quantize else str(self.dtype).removeprefix("torch.")
        return f"{self.model_id} ({self.params / 1e6:.0f}M params) on {self.device} in {precision}"


def plan_model(
    model_id: str,
    *,
    device: str,
    dtype: str,
    load_in_4bit: str,
    gradient_checkpointing: str,
    headroom_gib: float,
) -> ModelPlan:
    """Read the config, build the model on the meta device (no memory) and decide how to load it."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from model.devices import resolve_device, resolve_dtype

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    config = AutoConfig.from_pretrained(model_id)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    params = sum(p.numel() for p in skeleton.parameters())
    text_model = _text_model_path(skeleton)
    skip = _not_quantized(skeleton, text_model)
    quantize = _choice(load_in_4bit, target.type == "cuda" and params >= QUANTIZE_FROM_PARAMS)
    if quantize and target.type != "cuda":
        raise ValueError("4-bit loading needs CUDA (bitsandbytes)")
    checkpointing = _choice(gradient_checkpointing, quantize)
    # bytes of the weights as loaded: 4-bit Linear weights of the text model take ~0.56 byte a parameter
    # (NF4 plus double-quantized scales), the rest its dtype's size.
    element = torch.finfo(torch_dtype).bits // 8
    quantized = sum(
        p.numel()
        for name, p in skeleton.named_parameters()
        if quantize and name.startswith(text_model + ".") and name.endswith(".weight") and p.dim() == 2
        and not any(name.startswith(s + ".") for s in skip)
    )  # fmt: skip
    weights = quantized * 0.56 + (params - quantized) * element
    need = int(weights + headroom_gib * 2**30)
    connector, vision = _outside_linears(skeleton, skip)
    return ModelPlan(
        model_id,
        target,
        torch_dtype,
        quantize,
        checkpointing,
        params,
        text_model,
        skip,
        need,
        connector,
        vision,
    )


def check_gpu_memory(plan: ModelPlan) -> None:
    """On CUDA, raise NotEnoughGpuMemory unless the plan's bytes are free now (before loading anything)."""
    if plan.device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(plan.device)
    if free < plan.need_bytes:
        raise NotEnoughGpuMemory(
            f"training {plan.describe()} needs about {plan.need_bytes / 2**30:.1f} GiB of GPU memory, "
            f"but only {free / 2**30:.1f} of {total / 2**30:.1f} GiB are free (the worker holds the rest?). "
            "Nothing was loaded. Retry when the GPU is less busy, or lower gpu_headroom_gib if you know it fits."
        )


def load_for_training(plan: ModelPlan) -> Any:
    """The base model, loaded as planned (not yet wrapped by peft)."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": plan.dtype}
    if plan.quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(plan.skip_modules),
        )
        kwargs["device_map"] = {"": plan.device.index or 0}
    model = AutoModelForImageTextToText.from_pretrained(plan.model_id, **kwargs)
    if not plan.quantize:
        model = model.to(plan.device)  # type: ignore[arg-type]  # transformers' stubs of .to
    # The KV cache is useless in training and conflicts with gradient checkpointing.
    model.config.use_cache = False
    log.info("loaded %s", plan.describe())
    return model


def lora_config(plan: ModelPlan, *, r: int, alpha: int, targets: str = "text") -> Any:
    """A plain LoRA on the text model's attention and MLP Linears (and, with `targets`, the connector's
    or also the vision tower's Linears): what the worker can merge (no DoRA, no modules_to_save, no bias)."""
    from peft import LoraConfig

    if targets not in LORA_TARGETS:
        raise ValueError(f"lora_targets must be one of {', '.join(LORA_TARGETS)}, not {targets!r}")
    patterns = [rf"{re.escape(plan.text_model)}\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(LORA_MODULES)})"]
    exact = [*plan.connector_linears] if targets != "text" else []
    exact += [*plan.vision_linears] if targets == "all" else []
    patterns += [re.escape(name) for name in exact]
    pattern = "|".join(f"({p})" for p in patterns)  # peft full-matches a string pattern on module names
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=pattern)


@contextlib.contextmanager
def completion_only_logprobs(device: torch.device) -> Iterator[None]:
    """On the CPU, let trl's fused LM head score only the completion tokens, as it does on CUDA.

    trl (1.x) scores only the labelled positions where Triton runs and every position elsewhere, to keep
    the tile shapes of recompiling devices (Neuron) fixed. On a CPU that means projecting and
    normalising every prompt and image token for nothing: on this project's CPU benchmark a tiny-model
    DPO step went from 0.28 to 0.17 s with the same log-probabilities (tests/test_feedback/test_training/test_train.py
    checks they match). That module attribute decides only this (trl's kernels keep their own check);
    a trl without it changes nothing.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if device.type != "cpu" or original is None:
        yield
        return
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _text_model_path(model: Any) -> str:
    """The module path of the language model inside a vision-language model (transformers 5 layout)."""
    language = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in model.named_modules():
        if module is language:
            return name
    for name, _ in model.named_modules():
        if name.endswith("text_model") or name.endswith("language_model"):
            return name
    raise ValueError(f"cannot find the language model of {type(model).__name__}")


def _not_quantized(model: Any, text_model: str) -> tuple[str, ...]:
    """Full module paths of everything outside the text model's decoder (vision tower, connector, lm_head)."""
    parent, _, _ = text_model.rpartition(".")
    container = model.get_submodule(parent) if parent else model
    skip = [f"{parent}.{name}" if parent else name for name, _ in container.named_children()]
    skip = [s for s in skip if s != text_model]
    head = model.get_output_embeddings()
    skip += [name for name, module in model.named_modules() if module is head]
    return tuple(skip)


def _outside_linears(model: Any, skip: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(connector, vision tower) Linear layers by full path: the modules outside the text model that
    hold Linears, told apart by name ("vision" in it: the tower; any other: the connector)."""
    head = model.get_output_embeddings()
    connector: list[str] = []
    vision: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        owner = next((s for s in skip if name.startswith(s + ".")), None)
        if owner is not None:
            (vision if "vision" in owner.rpartition(".")[2] else connector).append(name)
    return tuple(connector), tuple(vision)


def _choice(value: str, auto: bool) -> bool:
    value = str(value).lower()
    if value == "auto":
        return auto
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected auto, true or false, not {value!r}")


# ------------------------------------------------------------------------------ the trainer


def build_trainer(
    method: str,
    model: Any,
    processor: Any,
    data: TrainingData,
    plan: ModelPlan,
    hp: TrainArguments,
    output_dir: Path,
    callbacks: Sequence[Any] = (),
) -> Any:
    """trl's DPOTrainer (or KTOTrainer) with a fresh LoRA; the reference is the base.

    sft+dpo: `model` is the PeftModel `supervised_pass` returned; DPO trains its LoRA further, and
    trl copies that adapter, as it is now, into a frozen "ref" adapter: the reference is the SFT'd model."""
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from feedback.store.export import to_dataset

    paired = method in ("dpo", "sft+dpo")
    dataset = to_dataset([e.row for e in data.train], kind="pairs" if paired else "unpaired", metadata=False)
    common = _common_arguments(data, plan, hp, output_dir)
    config: Any
    trainer_class: Any
    if paired:
        losses: dict[str, Any] = {}
        if hp.sft_weight:  # RPO: DPO's loss plus an NLL term on the chosen answers
            losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, hp.sft_weight]}
        config, trainer_class = DPOConfig(**common, **losses), DPOTrainer
    else:
        # KTO samples in order (its KL term pairs neighbours): shuffle once, seeded; weigh 👍 and 👎 alike.
        dataset = dataset.shuffle(seed=hp.seed)
        liked = sum(bool(e.row["label"]) for e in data.train)
        disliked = len(data.train) - liked
        weight = liked / disliked if liked and disliked else 1.0
        config, trainer_class = KTOConfig(**common, undesirable_weight=weight), KTOTrainer
    continued = method == "sft+dpo"  # the SFT pass's LoRA, trained further: no new one
    peft_config = (
        None if continued else lora_config(plan, r=hp.lora_r, alpha=hp.lora_alpha, targets=hp.lora_targets)
    )
    trainer = trainer_class(
        model=model, args=config, train_dataset=dataset, processing_class=processor,
        peft_config=peft_config, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    return trainer


def supervised_pass(
    model: Any,
    processor: Any,
    data: TrainingData,
    plan: ModelPlan,
    hp: TrainArguments,
    output_dir: Path,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, dict[str, Any]]:
    """sft+dpo's first half: trl's SFTTrainer trains a fresh LoRA on the liked answers (completion
    tokens only); returns the PeftModel, ready for DPO to continue, and what it did."""
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from feedback.store.export import to_dataset

    dataset = to_dataset([e.row for e in data.liked], kind="unpaired", metadata=False).remove_columns("label")
    config = SFTConfig(**_common_arguments(data, plan, hp, output_dir, sft=True))
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=processor,
        peft_config=lora_config(plan, r=hp.lora_r, alpha=hp.lora_alpha, targets=hp.lora_targets),
        callbacks=list(callbacks),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    done = {
        "examples": len(data.liked), "steps": trainer.state.global_step,
        "final_loss": round(float(losses[-1]), 6) if losses else None,
        "examples_per_s": round(result.metrics.get("train_samples_per_second", 0.0), 3),
    }  # fmt: skip
    peft_model = trainer.model
    del trainer  # its optimizer state goes with it; DPO starts its own
    return peft_model, done


def _common_arguments(
    data: TrainingData, plan: ModelPlan, hp: TrainArguments, output_dir: Path, *, sft: bool = False
) -> dict[str, Any]:
    """The trainer arguments every method shares (the SFT pass has no beta)."""
    common: dict[str, Any] = dict(
        output_dir=str(output_dir), learning_rate=hp.learning_rate, num_train_epochs=hp.num_train_epochs,
        max_steps=hp.max_steps, per_device_train_batch_size=hp.per_device_train_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps, seed=hp.seed,
        max_length=data.max_length,  # the longest kept example: trl's truncation never cuts anything
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        bf16=plan.device.type == "cuda", use_cpu=plan.device.type == "cpu", logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0,
    )  # fmt: skip
    if sft:
        common.update(completion_only_loss=True, dataset_num_proc=None)
    else:
        common["beta"] = hp.beta
    return common
