"""
One training run: the votes' preference pairs -> a LoRA candidate -> the gate -> promotion -> the worker.

    smolcord train [--method dpo|kto] [--dry-run] [--force] [--progress json|bar|none]
    python -m feedback.training --method dpo --learning_rate 5e-5 --num_train_epochs 2 ...   (every field below)

Trains a LoRA adapter on the text model only (never the vision tower or the connector) with trl's
DPOTrainer (KTOTrainer with --method kto, on the rated answers), from the base model every run,
on the training split of the store's pairs; the reference is the base (the adapter disabled).
On CUDA, bases of 1B parameters and more load in 4-bit with gradient checkpointing; on the CPU
everything runs in float32. The candidate is scored by feedback.training.gate in the form the worker
serves, written through smolcord.registry (peft format, metrics.json, report.png), promoted if
the gate says so (or --force), recorded in the store with the pairs it used, and the worker is
told to load it. One run at a time (smolcord.trainlock); a run killed at any point leaves no
half-written version, no moved `current` and no stale lock.

Under `accelerate launch --num_processes N -m smolcord train` (or torchrun) the run is data-parallel:
the main process alone locks, records, gates and publishes; every process trains on its own device
(feedback.training.distributed has the details). Other ranks exit with the main process's early-exit
code, or 0 after training, and print nothing on stdout.

Exit codes (also the final JSON line's "exit_code"):
    0  promoted, or --dry-run printed what it would train on
    1  failed: an error (nothing promoted, no half-written version)
    2  bad usage or settings
    3  rejected: the candidate is kept as a rejected version with its metrics; current unchanged
    4  too few pairs: nothing trained
    5  already running: another run holds the lock
    6  not enough free GPU memory: nothing loaded

--progress json: stdout carries JSON lines only (logs go to stderr):
    {"step": 3, "total": 24, "loss": 0.6812}          after every optimizer step
    {"verdict": "promoted", "exit_code": 0, "message": "...", "version": "v4", "current": "v4", ...}
The last line always has "verdict": promoted | rejected | skipped | dry-run | already-running |
no-gpu-memory | failed, with "exit_code" and "message"; after training also "report" (the PNG),
"heldout_accuracy", "current_accuracy", "heldout_pairs" and "worker".
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from feedback.training.config import GateArguments, RunArguments, TrainArguments
from feedback.training.distributed import ranks_from_env
from feedback.training.progress import RunOutput, describe_data, progress_callback
from smolcord.trainlock import AlreadyRunning, training_lock

if TYPE_CHECKING:
    from feedback.training.data import TrainingData
    from feedback.training.trainer import ModelPlan
    from smolcord.settings import Settings

log = logging.getLogger(__name__)

EXIT_PROMOTED = 0  # and --dry-run
EXIT_FAILED = 1
EXIT_REJECTED = 3
EXIT_TOO_FEW = 4
EXIT_ALREADY_RUNNING = 5
EXIT_NO_GPU_MEMORY = 6


def run(
    settings: Settings,
    args: RunArguments,
    train: TrainArguments | None = None,
    gate: GateArguments | None = None,
    *,
    stdout: TextIO | None = None,
) -> int:
    """One training run; returns its exit code (see the module docstring)."""
    out = RunOutput(args.progress or ("bar" if sys.stderr.isatty() else "none"), stdout or sys.stdout)
    # In JSON mode stdout is the bot's channel: anything a library prints goes to stderr instead.
    redirect = contextlib.redirect_stdout(sys.stderr) if out.mode == "json" else contextlib.nullcontext()
    ranks = ranks_from_env()
    if ranks.distributed:  # accelerate launch / torchrun: see feedback.training.distributed
        from feedback.training.distributed import run_distributed

        with redirect, _sigterm_unwinds():
            return run_distributed(
                settings, args, train or TrainArguments(), gate or GateArguments(), out, ranks
            )
    with redirect, _sigterm_unwinds():
        try:
            with training_lock(settings.locks_dir):
                return _run_locked(settings, args, train or TrainArguments(), gate or GateArguments(), out)
        except AlreadyRunning as exc:
            return out.finish(EXIT_ALREADY_RUNNING, "already-running", str(exc))
        except Exception as exc:
            log.exception("training run failed")
            return out.finish(EXIT_FAILED, "failed", f"{type(exc).__name__}: {exc}")


def _run_locked(
    settings: Settings, args: RunArguments, hp: TrainArguments, gate: GateArguments, out: RunOutput
) -> int:
    from transformers import AutoProcessor

    from feedback.store.db import upgrade_to_head
    from feedback.training.data import close_stale_runs, load_training_data, store_call
    from feedback.training.publish import publish_candidate
    from feedback.training.trainer import (
        NotEnoughGpuMemory,
        check_gpu_memory,
        completion_only_logprobs,
        load_for_training,
        plan_model,
    )
    from smolcord.registry import AdapterRegistry

    _quiet_libraries()
    registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.db_url)
    close_stale_runs(settings)

    ################
    # Data
    ################
    plan = plan_model(
        settings.model, device=settings.device, dtype=settings.dtype, load_in_4bit=hp.load_in_4bit,
        gradient_checkpointing=hp.gradient_checkpointing, headroom_gib=hp.gpu_headroom_gib,
    )  # fmt: skip
    processor = AutoProcessor.from_pretrained(settings.model)
    limit = hp.max_length or plan_limit(settings.model)
    data = load_training_data(settings, method=args.method, processor=processor, limit=limit)
    summary = data.summary()
    if args.dry_run:
        return out.finish(
            EXIT_PROMOTED, "dry-run", describe_data(summary), data=summary, model=plan.describe()
        )
    if len(data.train) < max(hp.min_train_pairs, 2 if args.method == "kto" else 1):
        run_id = store_call(
            settings, "start_training_run", method=args.method, heldout_fraction=settings.heldout_fraction
        )
        message = f"too few examples to train on: {describe_data(summary)}; need {hp.min_train_pairs}"
        store_call(settings, "finish_training_run", run_id=run_id, status="skipped", metrics=summary)
        return out.finish(EXIT_TOO_FEW, "skipped", message, data=summary)
    run_id = store_call(
        settings, "start_training_run", method=args.method, heldout_fraction=settings.heldout_fraction,
        examples=[e.source for e in data.train + data.heldout],
    )  # fmt: skip
    try:
        ################
        # Model
        ################
        try:
            check_gpu_memory(plan)
        except NotEnoughGpuMemory as exc:
            store_call(settings, "finish_training_run", run_id=run_id, status="failed", error=str(exc))
            return out.finish(EXIT_NO_GPU_MEMORY, "no-gpu-memory", str(exc))
        out.say(f"run {run_id}: {describe_data(summary)}; loading {plan.describe()}")
        peak_gpu_gib(plan, reset=True)
        model = load_for_training(plan)

        ################
        # Training
        ################
        with _scratch_dir(settings.runs_dir) as scratch:
            trainer = build_trainer(
                args.method, model, processor, data, plan, hp, scratch, [progress_callback(out)]
            )
            started = time.perf_counter()
            with completion_only_logprobs(plan.device):
                result = trainer.train()
        history = compact_history(trainer.state.log_history)
        trained = {
            "examples": len(data.train), "steps": len(history), "seconds": round(time.perf_counter() - started, 2),
            "examples_per_s": round(result.metrics.get("train_samples_per_second", 0.0), 3),
            "final_loss": history[-1].get("loss") if history else None, "peak_gpu_gib": peak_gpu_gib(plan),
        }  # fmt: skip
        held = {"model": trainer.model}  # the only reference left once the trainer is gone
        del trainer, model

        ################
        # Gate and publish
        ################
        outcome = publish_candidate(
            settings, registry, save=lambda path: held["model"].save_pretrained(path), processor=processor,
            data=data, method=args.method, hp=hp, gate=gate, force=args.force, history=history, trained=trained,
            run_id=run_id, release=lambda: _release(held, plan),
        )  # fmt: skip
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        store_call(settings, "finish_training_run", run_id=run_id, status="failed", error=error)
        raise
    return conclude_run(settings, registry, out, outcome, run_id=run_id)


def conclude_run(settings: Settings, registry: Any, out: RunOutput, outcome: Any, *, run_id: int) -> int:
    """After publishing: record the run as succeeded, tell the worker, prune, print the verdict."""
    from feedback.training.data import store_call
    from feedback.training.publish import tell_worker

    store_call(settings, "finish_training_run", run_id=run_id, status="succeeded",
               metrics=outcome.metrics, adapter_version=outcome.version)  # fmt: skip
    worker = (
        tell_worker(settings, registry.current()) if outcome.promoted else "not told: nothing new to serve"
    )
    removed = registry.prune(settings.keep_versions)
    return out.finish(
        EXIT_PROMOTED if outcome.promoted else EXIT_REJECTED,
        "promoted" if outcome.promoted else "rejected",
        outcome.message, version=outcome.version, current=registry.current(), report=str(outcome.report),
        heldout_accuracy=outcome.metrics.get("heldout_accuracy"), heldout_pairs=outcome.metrics.get("heldout_pairs"),
        current_accuracy=outcome.metrics["current"].get("heldout_accuracy"), worker=worker, pruned=removed,
        run_id=run_id,
    )  # fmt: skip


# ------------------------------------------------------------------------------ training


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
    """trl's DPOTrainer (or KTOTrainer) with a fresh LoRA on the text model; the reference is the base."""
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from feedback.store.export import to_dataset
    from feedback.training.trainer import lora_config

    dataset = to_dataset(
        [e.row for e in data.train], kind="pairs" if method == "dpo" else "unpaired", metadata=False
    )
    common: dict[str, Any] = dict(
        output_dir=str(output_dir), learning_rate=hp.learning_rate, num_train_epochs=hp.num_train_epochs,
        max_steps=hp.max_steps, per_device_train_batch_size=hp.per_device_train_batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps, beta=hp.beta, seed=hp.seed,
        max_length=data.max_length,  # the longest kept example: trl's truncation never cuts anything
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        bf16=plan.device.type == "cuda", use_cpu=plan.device.type == "cpu", logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0,
    )  # fmt: skip
    config: Any
    trainer_class: Any
    if method == "dpo":
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
    trainer = trainer_class(
        model=model, args=config, train_dataset=dataset, processing_class=processor,
        peft_config=lora_config(plan, r=hp.lora_r, alpha=hp.lora_alpha), callbacks=list(callbacks),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    return trainer


def compact_history(log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-step loss, reward accuracy and margin from the trainer's log (what the report draws)."""
    keys = ("loss", "rewards/accuracies", "rewards/margins", "kl")
    return [
        {"step": h["step"], **{k: round(float(h[k]), 6) for k in keys if k in h}}
        for h in log_history
        if "loss" in h and "step" in h
    ]


# ------------------------------------------------------------------------------ plumbing


def plan_limit(model_id: str) -> int:
    """The longest sequence the model takes: its text model's position limit."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_id).get_text_config().max_position_embeddings)


def peak_gpu_gib(plan: ModelPlan, *, reset: bool = False) -> float | None:
    """The most GPU memory allocated since the last reset (None off CUDA)."""
    import torch

    if plan.device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(plan.device)
    return round(torch.cuda.max_memory_allocated(plan.device) / 2**30, 2)


def _release(held: dict[str, Any], plan: ModelPlan) -> None:
    """Free the training model's memory (the trainer and its optimizer are gone already)."""
    import gc

    import torch

    held.clear()
    gc.collect()
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _scratch_dir(runs_dir: Path) -> Iterator[Path]:
    """The trainer's output_dir: a temporary folder under runs/ (leftovers of killed runs removed first;
    we hold the training lock, so none is in use)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    for stale in runs_dir.glob(".tmp-train-*"):
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=".tmp-train-", dir=runs_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (systemd, the bot stopping a run) unwinds like an exception, so a staged version is
    removed at once rather than by the next writer (SIGKILL is covered by the registry's flocks)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_libraries() -> None:
    """No download or map progress bars from datasets and transformers: ours is the only one."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m feedback.training`: every field of the three dataclasses is a flag."""
    import argparse

    from transformers import HfArgumentParser

    from smolcord.settings import get_settings

    parser = HfArgumentParser(
        (RunArguments, TrainArguments, GateArguments),  # type: ignore[arg-type]
        prog="python -m feedback.training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    args, hp, gate = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(get_settings(), args, hp, gate)
