"""
One training run: the votes' preference pairs -> a LoRA candidate -> the gate -> promotion -> the worker.

    smolcord train [--method dpo|kto|sft+dpo] [--dry-run] [--force] [--progress json|bar|none]
    python -m feedback.training --method dpo --learning_rate 5e-5 --num_train_epochs 2 ...   (every field below)

Trains a LoRA adapter on the text model (also the connector or the vision tower with --lora_targets)
with trl's DPOTrainer (KTOTrainer with --method kto, on the rated answers), from the base model every
run, on the training split of the store's pairs; the reference is the base (the adapter disabled).

--method sft+dpo first trains the LoRA with trl's SFTTrainer on the liked (👍) answers outside the
held-out keys, then DPO continues that same LoRA on the pairs; trl copies the SFT'd adapter into a
frozen "ref" adapter, so DPO's reference is the SFT'd model, not the base. The result is still one
plain LoRA relative to the base, served and gated like any other. It differs from --sft_weight
(RPO), which adds an NLL term on the chosen answers inside DPO's loss, in one pass whose reference
stays the base: there the supervised signal and the preference pull at the same time, here the
policy first learns to write the liked answers and DPO then only moves it away from its own start.
With --progress json, the supervised pass's steps are reported first (step 1..n of its own total),
then DPO's.
On CUDA, bases of 1B parameters and more load in 4-bit with gradient checkpointing; on the CPU
everything runs in float32. The candidate is scored by feedback.training.gate in the form the worker
serves, written through smolcord.registry (peft format, metrics.json, report.png), promoted if
the gate says so (or --force), recorded in the store with the pairs it used, and the worker is
told to load it. One run at a time (smolcord.trainlock); a run killed at any point leaves no
half-written version, no moved `current` and no stale lock.

Under `accelerate launch --num_processes N -m smolcord train` (or torchrun) the run is data-parallel,
on the same path (nanoGPT's master_process): the main process alone locks, reads the store,
records, gates, publishes and prints; it shares the data it loaded, so every process trains on the
same examples on its own device (feedback.training.distributed). Other ranks exit with the main
process's early-exit code, or 0 after training, and print nothing on stdout.

Exit codes (also the final JSON line's "exit_code"):
    0  promoted (or, with SMOLCORD_CANARY=on, put in canary), or --dry-run printed what it would train on
    1  failed: an error (nothing promoted, no half-written version)
    2  bad usage or settings
    3  rejected: the candidate is kept as a rejected version with its metrics; current unchanged
    4  too few pairs: nothing trained
    5  already running: another run holds the lock
    6  not enough free GPU memory: nothing loaded

--progress json: stdout carries JSON lines only (logs go to stderr):
    {"step": 3, "total": 24, "loss": 0.6812}          after every optimizer step
    {"verdict": "promoted", "exit_code": 0, "message": "...", "version": "v4", "current": "v4", ...}
The last line always has "verdict": promoted | canary | rejected | skipped | dry-run | already-running |
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
from feedback.training.distributed import ProcessGroup, process_group, ranks_from_env
from feedback.training.progress import RunOutput, describe_data, progress_callback
from smolcord.trainlock import AlreadyRunning, training_lock

if TYPE_CHECKING:
    from feedback.training.publish import Outcome
    from feedback.training.store import JobStore
    from feedback.training.trainer import ModelPlan
    from smolcord.registry import AdapterRegistry
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
    """One training run, this process's part of it; returns its exit code (see the module docstring).

    `train` and `gate` left out come from the settings (SMOLCORD_TRAIN_ARGS) over the defaults."""
    if train is None or gate is None:
        from feedback.training.config import parse_arguments

        _, from_settings, gate_from_settings = parse_arguments(settings)
        train, gate = train or from_settings, gate or gate_from_settings
    ranks = ranks_from_env()
    if ranks.main:
        out = RunOutput(args.progress or ("bar" if sys.stderr.isatty() else "none"), stdout or sys.stdout)
    else:
        out = RunOutput("none", sys.stderr)  # only the main process reports
    # In JSON mode stdout is the bot's channel: anything a library prints goes to stderr instead.
    quiet_stdout = out.mode == "json" or not ranks.main
    redirect = contextlib.redirect_stdout(sys.stderr) if quiet_stdout else contextlib.nullcontext()
    with redirect, _sigterm_unwinds(), process_group(settings, ranks) as group:
        try:
            if not group.main:
                return _job(settings, args, train, gate, out, group, None)
            with training_lock(settings.locks_dir), _job_store(settings) as store:
                return _job(settings, args, train, gate, out, group, store)
        except AlreadyRunning as exc:
            code = out.finish(EXIT_ALREADY_RUNNING, "already-running", str(exc))
        except Exception as exc:
            log.exception("rank %d: training run failed", ranks.rank)
            if not group.main:
                return EXIT_FAILED
            code = out.finish(EXIT_FAILED, "failed", f"{type(exc).__name__}: {exc}")
        # Told to the other ranks only now that this process has reported: a launcher stops every
        # process as soon as one exits with an error.
        group.exit_others(code)
        return code


def _job(
    settings: Settings,
    args: RunArguments,
    hp: TrainArguments,
    gate: GateArguments,
    out: RunOutput,
    group: ProcessGroup,
    store: JobStore | None,
) -> int:
    """The run's one sequence, on every rank; what only the main process does is under `group.main`."""
    from transformers import AutoProcessor

    from feedback.training.trainer import plan_model

    _quiet_libraries()
    plan = plan_model(
        settings.model, device=group.device, dtype=settings.dtype, load_in_4bit=hp.load_in_4bit,
        gradient_checkpointing=hp.gradient_checkpointing, headroom_gib=hp.gpu_headroom_gib,
    )  # fmt: skip
    processor = AutoProcessor.from_pretrained(settings.model)

    ################
    # Data (the main process reads the store; every rank trains on what it read)
    ################
    decision: dict[str, Any] | None = None
    run_id = 0
    if store is not None:
        run_id, decision = _load_and_decide(settings, args, hp, out, group, store, plan, processor)
    decision = group.share(decision)
    if decision["exit"] is not None:
        return int(decision["exit"])
    data = decision["data"]

    try:
        ################
        # Model
        ################
        gpu_errors = [e for e in group.gather(_gpu_memory_error(plan, group)) if e]
        if gpu_errors:
            error = "; ".join(gpu_errors)
            code = EXIT_NO_GPU_MEMORY
            if store is not None:
                store.finish_run(run_id=run_id, status="failed", error=error)
                code = out.finish(EXIT_NO_GPU_MEMORY, "no-gpu-memory", error)
            group.barrier()  # recorded and printed: now the other ranks may exit
            return code
        processes = f" in each of {group.world_size} processes" if group.world_size > 1 else ""
        out.say(f"run {run_id}: {describe_data(data.summary())}; loading {plan.describe()}{processes}")
        peak_gpu_gib(plan, reset=True)

        ################
        # Training
        ################
        from feedback.training.trainer import (
            build_trainer,
            completion_only_logprobs,
            load_for_training,
            supervised_pass,
        )

        model = load_for_training(plan)  # trl wraps it in DDP when there are several processes
        with _scratch_dir(settings.runs_dir) as scratch:
            callbacks = [progress_callback(out)] if group.main else []
            started = time.perf_counter()
            supervised: dict[str, Any] = {}
            if args.method == "sft+dpo":
                model, supervised = supervised_pass(model, processor, data, plan, hp, scratch, callbacks)
            trainer = build_trainer(args.method, model, processor, data, plan, hp, scratch, callbacks)
            with completion_only_logprobs(plan.device):
                result = trainer.train()
        seconds = round(time.perf_counter() - started, 2)
        del model
        group.barrier()  # every rank has trained; the rest is the main process's alone
        if store is None:
            log.info("rank %d: trained; the main process gates and publishes", group.ranks.rank)
            return 0
        history = compact_history(trainer.state.log_history)
        trained = {
            "examples": len(data.train), "steps": len(history), "seconds": seconds,
            "examples_per_s": round(result.metrics.get("train_samples_per_second", 0.0), 3),
            "final_loss": history[-1].get("loss") if history else None, "peak_gpu_gib": peak_gpu_gib(plan),
            "processes": group.world_size, **({"sft": supervised} if supervised else {}),
        }  # fmt: skip
        held = {"model": trainer.model}  # unwrapped: the only reference left once the trainer is gone
        del trainer

        ################
        # Gate and publish
        ################
        from feedback.training.publish import publish_candidate
        from smolcord.registry import AdapterRegistry

        registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
        # Only the trained adapter: sft+dpo's model also holds trl's frozen "ref" copy.
        save = lambda path: held["model"].save_pretrained(path, selected_adapters=["default"])  # noqa: E731
        outcome = publish_candidate(
            settings, registry, store, save=save,
            processor=processor, data=data, method=args.method, hp=hp, gate=gate, force=args.force,
            history=history, trained=trained, run_id=run_id, release=lambda: _release(held, plan),
        )  # fmt: skip
    except BaseException as exc:
        if store is not None:
            store.finish_run(run_id=run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return conclude_run(settings, registry, store, out, outcome, run_id=run_id)


def _load_and_decide(
    settings: Settings,
    args: RunArguments,
    hp: TrainArguments,
    out: RunOutput,
    group: ProcessGroup,
    store: JobStore,
    plan: ModelPlan,
    processor: Any,
) -> tuple[int, dict[str, Any]]:
    """The main process: the store's examples, and whether the run stops here (dry run, too few)."""
    from feedback.store.db import upgrade_to_head
    from feedback.training.data import load_training_data

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.db_url)
    store.close_stale_runs()
    from smolcord.registry import AdapterRegistry

    # One candidate at a time: while live votes judge a canary, nothing new is trained, forced or not
    # (an admin who wants one now ends the canary first: /smolcord canary promote|abort).
    in_canary = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir).candidate()
    if in_canary is not None and not args.dry_run:
        message = f"{in_canary} is in canary: no new candidate until live votes decide (/smolcord canary)"
        return 0, {"exit": out.finish(EXIT_TOO_FEW, "skipped", message, canary=in_canary)}
    limit = hp.max_length or plan_limit(settings.model)
    data = load_training_data(store, settings, method=args.method, processor=processor, limit=limit)
    summary = data.summary()
    if args.dry_run:
        processes = {"processes": group.world_size} if group.world_size > 1 else {}
        code = out.finish(
            EXIT_PROMOTED, "dry-run", describe_data(summary), data=summary, model=plan.describe(), **processes
        )
        return 0, {"exit": code}
    # sft+dpo needs a liked answer for its supervised pass too.
    too_few_liked = args.method == "sft+dpo" and not data.liked
    if too_few_liked or len(data.train) < max(hp.min_train_pairs, 2 if args.method == "kto" else 1):
        run_id = store.start_run(method=args.method, heldout_fraction=settings.heldout_fraction)
        message = f"too few examples to train on: {describe_data(summary)}; need {hp.min_train_pairs}"
        store.finish_run(run_id=run_id, status="skipped", metrics=summary)
        return run_id, {"exit": out.finish(EXIT_TOO_FEW, "skipped", message, data=summary)}
    run_id = store.start_run(
        method=args.method, heldout_fraction=settings.heldout_fraction,
        examples=[e.source for e in data.train + data.liked + data.heldout],
    )  # fmt: skip
    for stale in settings.runs_dir.glob(".tmp-train-*"):  # killed runs' leftovers (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    return run_id, {"exit": None, "data": data}


def conclude_run(
    settings: Settings,
    registry: AdapterRegistry,
    store: JobStore,
    out: RunOutput,
    outcome: Outcome,
    *,
    run_id: int,
) -> int:
    """After publishing: record the run as succeeded, tell the worker, prune, print the verdict."""
    from feedback.training.publish import tell_worker

    store.finish_run(
        run_id=run_id, status="succeeded", metrics=outcome.metrics, adapter_version=outcome.version
    )
    if outcome.promoted:
        worker = tell_worker(settings, registry.current())
    elif outcome.canary:
        worker = tell_worker(settings, outcome.version, slot="candidate")
    else:
        worker = "not told: nothing new to serve"
    removed = registry.prune(settings.keep_versions)
    verdict = "promoted" if outcome.promoted else "canary" if outcome.canary else "rejected"
    return out.finish(
        EXIT_PROMOTED if outcome.promoted or outcome.canary else EXIT_REJECTED,
        verdict,
        outcome.message, version=outcome.version, current=registry.current(), report=str(outcome.report),
        heldout_accuracy=outcome.metrics.get("heldout_accuracy"), heldout_pairs=outcome.metrics.get("heldout_pairs"),
        current_accuracy=outcome.metrics["current"].get("heldout_accuracy"), worker=worker, pruned=removed,
        run_id=run_id,
    )  # fmt: skip


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
def _job_store(settings: Settings) -> Iterator[JobStore]:
    from feedback.training.store import JobStore

    with JobStore(settings) as store:
        yield store


def _gpu_memory_error(plan: ModelPlan, group: ProcessGroup) -> str | None:
    """This rank's refusal to load on a GPU without enough free memory (None off CUDA)."""
    from feedback.training.trainer import NotEnoughGpuMemory, check_gpu_memory

    try:
        check_gpu_memory(plan)
    except NotEnoughGpuMemory as exc:
        return f"rank {group.ranks.rank}: {exc}" if group.world_size > 1 else str(exc)
    return None


@contextlib.contextmanager
def _scratch_dir(runs_dir: Path) -> Iterator[Path]:
    """This rank's trainer output_dir: a temporary folder under runs/ (the main process removed
    killed runs' leftovers while holding the lock)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
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
    from feedback.training.config import parse_arguments
    from smolcord.settings import get_settings

    settings = get_settings()
    args, hp, gate = parse_arguments(settings, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(settings, args, hp, gate)
