"""The training job's three argument groups; every field documents itself (`python -m feedback.training --help`)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = ["GateArguments", "RunArguments", "TrainArguments", "argument_parser", "parse_arguments"]


@dataclass
class RunArguments:
    """What `smolcord train` asks for."""

    method: str = field(
        default="dpo",
        metadata={
            "help": "dpo: preference pairs; kto: rated answers (unpaired); sft+dpo: a supervised pass on the "
            "liked (👍) answers, then DPO on the pairs continuing the same LoRA, with the SFT'd model as DPO's "
            "reference (unlike sft_weight, an NLL term inside DPO's loss whose reference stays the base).",
            "choices": ["dpo", "kto", "sft+dpo"],
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Print what would be trained on (pairs, held-out, dropped, images, lengths); train nothing."
        },
    )
    force: bool = field(
        default=False,
        metadata={"help": "Promote even if the gate says no (never an adapter that cannot be served)."},
    )
    progress: str | None = field(
        default=None,
        metadata={
            "help": "json: JSON lines on stdout; bar: a progress bar on stderr; none. Default: bar on a terminal.",
            "choices": ["json", "bar", "none"],
        },
    )


@dataclass
class TrainArguments:
    """Hyperparameters of the candidate; the defaults suit a nightly run on a few hundred pairs."""

    learning_rate: float = field(
        default=5e-5,
        metadata={"help": "AdamW learning rate of the LoRA weights (LoRA wants ~10x full fine-tuning's)."},
    )
    num_train_epochs: float = field(
        default=2.0,
        metadata={
            "help": "Passes over the training pairs (sft+dpo: and as many over the liked answers first)."
        },
    )
    max_steps: int = field(
        default=-1,
        metadata={"help": "Stop after this many optimizer steps (-1: the epochs decide)."},
    )
    per_device_train_batch_size: int = field(
        default=4,
        metadata={"help": "Pairs per step (KTO: rated answers, at least 2: its KL term pairs neighbours)."},
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Batches per optimizer step."},
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "DPO/KTO beta: how far the policy may move from the base; also the gate's reward scale."
        },
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "DPO only: weight of an added NLL loss on the chosen answers (RPO: trl's 'sft' loss type). "
            "It keeps the policy writing whole answers where pure DPO drifts into loops; 0 disables it. "
            "Not --method sft+dpo, which trains on the liked answers before DPO starts."
        },
    )
    lora_targets: str = field(
        default="text",
        metadata={
            "help": "Where the LoRA goes: text (the text model's attention and MLP Linears); text+connector "
            "(also the connector's projection, which maps image features into the text model: it learns "
            "what the image shows much faster on small models); all (also the vision tower's Linears). "
            "The worker merges any Linear.",
            "choices": ["text", "text+connector", "all"],
        },
    )
    lora_r: int = field(
        default=16,
        metadata={"help": "LoRA rank."},
    )
    lora_alpha: int = field(
        default=32,
        metadata={"help": "LoRA alpha: the update is scaled by alpha / r."},
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Drop examples longer than this many tokens (default: the model's max positions). "
            "Nothing is ever truncated: a cut completion would train on nothing."
        },
    )
    min_train_pairs: int = field(
        default=4,
        metadata={"help": "With fewer training examples the run trains nothing and exits 4."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the LoRA initialisation and the data order."},
    )
    load_in_4bit: str = field(
        default="auto",
        metadata={"help": "auto: 4-bit NF4 on CUDA for bases of 1B parameters and more; true; false."},
    )
    gradient_checkpointing: str = field(
        default="auto",
        metadata={"help": "auto: on when loading in 4-bit (memory over speed); true; false."},
    )
    gpu_headroom_gib: float = field(
        default=4.0,
        metadata={
            "help": "GPU memory the run needs beyond the weights (activations, optimizer), checked first."
        },
    )


@dataclass
class GateArguments:
    """How the candidate is scored against current (feedback.training.gate)."""

    eval_batch_size: int = field(
        default=4,
        metadata={"help": "Held-out pairs per scoring forward pass."},
    )
    probes: int = field(
        default=4,
        metadata={
            "help": "Held-out questions both models answer greedily, to catch empty or looping answers."
        },
    )
    probe_max_new_tokens: int = field(
        default=32,
        metadata={"help": "Length of each probe answer, in tokens."},
    )
    tie_tolerance: float = field(
        default=1e-6,
        metadata={"help": "Reward gaps at most this large count as ties (half a win)."},
    )


def argument_parser(prog: str = "python -m feedback.training", description: str | None = None) -> Any:
    """transformers' HfArgumentParser over the three groups: every field is a flag."""
    import argparse

    from transformers import HfArgumentParser

    return HfArgumentParser(
        (RunArguments, TrainArguments, GateArguments),  # type: ignore[arg-type]
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_arguments(
    settings: Settings, argv: Sequence[str] | None = (), **parser_options: Any
) -> tuple[RunArguments, TrainArguments, GateArguments]:
    """The job's arguments: the defaults above, then the settings (SMOLCORD_TRAIN_METHOD and the flags
    in SMOLCORD_TRAIN_ARGS), then `argv` (None: the command line); a later flag wins."""
    import sys

    parser = argument_parser(**parser_options)
    parser.set_defaults(method=settings.train_method)
    own = list(sys.argv[1:] if argv is None else argv)
    try:
        run, train, gate = parser.parse_args_into_dataclasses(args=[*shlex.split(settings.train_args), *own])
    except ValueError as exc:  # unknown flags: a usage error (exit 2), naming where flags come from
        parser.error(
            f"{exc} (flags come from SMOLCORD_TRAIN_ARGS={settings.train_args!r} and the command line)"
        )
    return run, train, gate
