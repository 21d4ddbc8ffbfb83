"""One training run over several processes: `accelerate launch --num_processes N -m smolcord train` or torchrun.

The launcher sets RANK, LOCAL_RANK and WORLD_SIZE; feedback.training.job.run comes here when WORLD_SIZE > 1.
The main process (rank 0) alone takes the training lock, reads the store, records the run, gates,
publishes, prunes and tells the worker, exactly as a single-process run does; it sends the data
it loaded (same split, same order) to every other rank, so all train on the same examples even if
votes arrive meanwhile. Every rank trains on its own device (cuda:LOCAL_RANK, or the CPU with gloo)
through trl's DDP. An early exit decided on the main process (already running, too few pairs,
dry run, a failure before training) is broadcast, and every rank exits with its code; not enough
free GPU memory on any rank stops all of them. The other ranks wait at a barrier after training
and exit 0 without writing anything to stdout: the JSON lines come from the main process only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedback.training.config import GateArguments, RunArguments, TrainArguments
from feedback.training.progress import RunOutput, describe_data, progress_callback
from smolcord.trainlock import AlreadyRunning, training_lock

if TYPE_CHECKING:
    from smolcord.settings import Settings

__all__ = ["Ranks", "ranks_from_env", "run_distributed"]

log = logging.getLogger(__name__)

# The other ranks wait for the main process's decision (store, data, tokenizing) and, after
# training, at a barrier: long steps on real models must not time the collectives out.
COLLECTIVE_TIMEOUT_S = 4 * 3600


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch (torchrun and accelerate launch set the variables)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env(environ: Any = None) -> Ranks:
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    rank = int(env.get("RANK", "0") or 0)
    local = int(env.get("LOCAL_RANK", str(rank)) or 0)
    return Ranks(rank, local, world)


def run_distributed(
    settings: Settings,
    args: RunArguments,
    hp: TrainArguments,
    gate: GateArguments,
    out: RunOutput,
    ranks: Ranks,
) -> int:
    """This rank's part of the run; returns its exit code (the main process's is the run's)."""
    import torch.distributed as dist

    device = _device_of(settings, ranks)
    if not dist.is_initialized():
        import datetime

        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
    try:
        if ranks.main:
            return _main_rank(settings, args, hp, gate, out, device)
        with contextlib.redirect_stdout(sys.stderr):  # the other ranks never write to stdout
            try:
                return _other_rank(settings, args, hp, device, ranks)
            except Exception:
                log.exception("rank %d: training failed", ranks.rank)
                return 1
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _device_of(settings: Settings, ranks: Ranks) -> Any:
    """cuda:LOCAL_RANK where the settings' device is CUDA, else the CPU."""
    import torch

    from model.engine import resolve_device

    device = resolve_device(settings.device)
    return torch.device("cuda", ranks.local_rank) if device.type == "cuda" else torch.device("cpu")


def _broadcast(message: dict[str, Any] | None) -> dict[str, Any]:
    """The main process's message, on every rank."""
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    assert box[0] is not None
    return box[0]


# ------------------------------------------------------------------------------ rank 0


def _main_rank(
    settings: Settings,
    args: RunArguments,
    hp: TrainArguments,
    gate: GateArguments,
    out: RunOutput,
    device: Any,
) -> int:
    sent = False

    def send(message: dict[str, Any]) -> None:
        nonlocal sent
        _broadcast(message)
        sent = True

    try:
        with training_lock(settings.locks_dir):
            return _main_locked(settings, args, hp, gate, out, device, send)
    # An early exit is told to the other ranks only once this process is done (recorded and printed):
    # the launcher stops every process as soon as one exits with an error.
    except AlreadyRunning as exc:
        code = out.finish(5, "already-running", str(exc))
        send({"exit": code})
        return code
    except Exception as exc:
        log.exception("training run failed")
        code = out.finish(1, "failed", f"{type(exc).__name__}: {exc}")
        if not sent:
            with contextlib.suppress(Exception):
                send({"exit": code})
        return code
    finally:
        if not sent:  # SIGTERM or KeyboardInterrupt before the decision: the others must not wait forever
            with contextlib.suppress(Exception):
                _broadcast({"exit": 1})


def _main_locked(
    settings: Settings,
    args: RunArguments,
    hp: TrainArguments,
    gate: GateArguments,
    out: RunOutput,
    device: Any,
    send: Any,
) -> int:
    import torch.distributed as dist
    from transformers import AutoProcessor

    from feedback.store.db import upgrade_to_head
    from feedback.training.data import close_stale_runs, load_training_data, store_call
    from feedback.training.job import (
        EXIT_NO_GPU_MEMORY,
        EXIT_PROMOTED,
        EXIT_TOO_FEW,
        _quiet_libraries,
        _release,
        compact_history,
        peak_gpu_gib,
        plan_limit,
    )
    from feedback.training.publish import publish_candidate
    from smolcord.registry import AdapterRegistry

    _quiet_libraries()
    registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.db_url)
    close_stale_runs(settings)

    plan = _plan(settings, hp, device)
    processor = AutoProcessor.from_pretrained(settings.model)
    limit = hp.max_length or plan_limit(settings.model)
    data = load_training_data(settings, method=args.method, processor=processor, limit=limit)
    summary = data.summary()
    if args.dry_run:
        code = out.finish(
            EXIT_PROMOTED, "dry-run", describe_data(summary), data=summary, model=plan.describe(),
            processes=dist.get_world_size(),
        )  # fmt: skip
        send({"exit": code})
        return code
    if len(data.train) < max(hp.min_train_pairs, 2 if args.method == "kto" else 1):
        run_id = store_call(
            settings, "start_training_run", method=args.method, heldout_fraction=settings.heldout_fraction
        )
        message = f"too few examples to train on: {describe_data(summary)}; need {hp.min_train_pairs}"
        store_call(settings, "finish_training_run", run_id=run_id, status="skipped", metrics=summary)
        code = out.finish(EXIT_TOO_FEW, "skipped", message, data=summary)
        send({"exit": code})
        return code
    run_id = store_call(
        settings, "start_training_run", method=args.method, heldout_fraction=settings.heldout_fraction,
        examples=[e.source for e in data.train + data.heldout],
    )  # fmt: skip
    for stale in settings.runs_dir.glob(".tmp-train-*"):  # killed runs' leftovers (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        # Every rank gets exactly these examples (the held-out ones only matter to the gate, here).
        send({"exit": None, "data": data, "limit": limit})
        gpu_errors = _gpu_memory_errors(plan)
        if gpu_errors:
            error = "; ".join(gpu_errors)
            store_call(settings, "finish_training_run", run_id=run_id, status="failed", error=error)
            code = out.finish(EXIT_NO_GPU_MEMORY, "no-gpu-memory", error)
            dist.barrier()  # recorded and printed: now the other ranks may exit
            return code
        world = dist.get_world_size()
        out.say(
            f"run {run_id}: {describe_data(summary)}; loading {plan.describe()} in each of {world} processes"
        )
        peak_gpu_gib(plan, reset=True)
        trainer, result, seconds = _train(args, hp, plan, processor, data, settings, [progress_callback(out)])
        history = compact_history(trainer.state.log_history)
        trained = {
            "examples": len(data.train), "steps": len(history), "seconds": seconds,
            "examples_per_s": round(result.metrics.get("train_samples_per_second", 0.0), 3),
            "final_loss": history[-1].get("loss") if history else None, "peak_gpu_gib": peak_gpu_gib(plan),
            "processes": world,
        }  # fmt: skip
        held = {"model": trainer.model}  # unwrapped: the gate's forward passes need no other rank
        del trainer
        dist.barrier()  # the other ranks are done and exit; the rest is this process's alone
        outcome = publish_candidate(
            settings, registry, save=lambda path: held["model"].save_pretrained(path), processor=processor,
            data=data, method=args.method, hp=hp, gate=gate, force=args.force, history=history, trained=trained,
            run_id=run_id, release=lambda: _release(held, plan),
        )  # fmt: skip
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        store_call(settings, "finish_training_run", run_id=run_id, status="failed", error=error)
        raise
    from feedback.training.job import conclude_run

    return conclude_run(settings, registry, out, outcome, run_id=run_id)


# ------------------------------------------------------------------------------ the other ranks


def _other_rank(settings: Settings, args: RunArguments, hp: TrainArguments, device: Any, ranks: Ranks) -> int:
    import torch.distributed as dist
    from transformers import AutoProcessor

    from feedback.training.job import _quiet_libraries

    _quiet_libraries()
    decision = _broadcast(None)
    if decision["exit"] is not None:
        return int(decision["exit"])
    plan = _plan(settings, hp, device)
    if _gpu_memory_errors(plan):
        from feedback.training.job import EXIT_NO_GPU_MEMORY

        dist.barrier()  # until the main process has recorded the refusal
        return EXIT_NO_GPU_MEMORY
    processor = AutoProcessor.from_pretrained(settings.model)
    _train(args, hp, plan, processor, decision["data"], settings, [])
    dist.barrier()
    log.info("rank %d: trained; the main process gates and publishes", ranks.rank)
    return 0


# ------------------------------------------------------------------------------ shared


def _plan(settings: Settings, hp: TrainArguments, device: Any) -> Any:
    from feedback.training.trainer import plan_model

    return plan_model(
        settings.model, device=str(device), dtype=settings.dtype, load_in_4bit=hp.load_in_4bit,
        gradient_checkpointing=hp.gradient_checkpointing, headroom_gib=hp.gpu_headroom_gib,
    )  # fmt: skip


def _gpu_memory_errors(plan: Any) -> list[str]:
    """Every rank checks its own GPU; all of them get every rank's refusal (none off CUDA)."""
    import torch.distributed as dist

    from feedback.training.trainer import NotEnoughGpuMemory, check_gpu_memory

    error = None
    try:
        check_gpu_memory(plan)
    except NotEnoughGpuMemory as exc:
        error = f"rank {dist.get_rank()}: {exc}"
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [e for e in errors if e]


def _train(
    args: RunArguments,
    hp: TrainArguments,
    plan: Any,
    processor: Any,
    data: Any,
    settings: Settings,
    callbacks: list[Any],
) -> tuple[Any, Any, float]:
    """Load the base on this rank's device and train (trl wraps the model in DDP)."""
    from feedback.training.job import build_trainer
    from feedback.training.trainer import completion_only_logprobs, load_for_training

    model = load_for_training(plan)
    with _own_scratch_dir(settings.runs_dir) as scratch:
        trainer = build_trainer(args.method, model, processor, data, plan, hp, scratch, callbacks)
        started = time.perf_counter()
        with completion_only_logprobs(plan.device):
            result = trainer.train()
    del model
    return trainer, result, round(time.perf_counter() - started, 2)


@contextlib.contextmanager
def _own_scratch_dir(runs_dir: Path) -> Iterator[Path]:
    """This rank's trainer output_dir (the main process removed killed runs' leftovers before training)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".tmp-train-", dir=runs_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
