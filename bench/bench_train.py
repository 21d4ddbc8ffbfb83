"""Training job benchmark on the CPU with the tiny model: pairs/s of `smolcord train` against a hand-written DPO step.

    python -m bench.bench_train [--prompts 64] [--epochs 2] [--batch 4] [--repeats 2]

Both sides start from the same tiny checkpoint with the same fresh LoRA (feedback.training.trainer's
config: rank, alpha, targets), train on the same pairs (colour votes recorded through the store's
service functions, read back with feedback.training.data) with the same batch size, epochs and
learning rate, and collate on the fly with trl's vision collator (what a real run does: images
are decoded and tiled per batch, never held in memory).

- real path: `feedback.training.job.run` end to end (store, trainer, gate, registry); its training
  phase (`trainer.train()`, as recorded in metrics.json) gives the pairs/s, the whole run's wall
  time is printed beside it.
- hand-written: a plain loop; per batch: collate, policy forward on chosen+rejected, reference
  forward with the adapter disabled, -logsigmoid(beta * margin), backward, AdamW step.

Goal: the real path at least 0.8x the hand-written pairs/s. Each side runs --repeats times,
alternating, and its best run counts (the CPU is shared; the best run is the least disturbed).
Both run on --threads torch threads (default 1): on a small shared machine two OpenMP threads
spin-wait on each other whenever another process holds a core, and steps then take 10-20x longer
at random. Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

GOAL_RATIO = 0.8
BETA = 0.1
LEARNING_RATE = 5e-5


def record_store(data_dir: Path, model_dir: Path, prompts: int) -> None:
    """A migrated store with `prompts` voted colour prompts."""
    from feedback.store.db import upgrade_to_head
    from feedback.store.synthetic import record_colour_votes

    settings = _settings(data_dir, model_dir)
    upgrade_to_head(settings.db_url)
    record_colour_votes(settings, prompts=prompts)


def real_path(template: Path, model_dir: Path, work: Path, *, epochs: float, batch: int) -> dict[str, Any]:
    """One `smolcord train` run on a copy of the store; the training phase's pairs/s from its metrics."""
    import io

    from feedback.training.config import RunArguments, TrainArguments
    from feedback.training.job import run
    from smolcord.registry import AdapterRegistry

    data_dir = work / f"real-{time.monotonic_ns()}"
    shutil.copytree(template, data_dir)
    settings = _settings(data_dir, model_dir)
    hp = TrainArguments(
        learning_rate=LEARNING_RATE, num_train_epochs=epochs, per_device_train_batch_size=batch
    )
    started = time.perf_counter()
    code = run(settings, RunArguments(progress="json"), hp, stdout=io.StringIO())
    wall = time.perf_counter() - started
    registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    trained = registry.metrics(registry.versions()[-1])["train"]
    pairs = trained["examples"] * epochs
    return {
        "exit_code": code,
        "pairs": pairs,
        "steps": trained["steps"],
        "train_s": trained["seconds"],
        "pairs_per_s": round(pairs / trained["seconds"], 2),
        "run_wall_s": round(wall, 2),
    }


def hand_written(template: Path, model_dir: Path, *, epochs: float, batch: int) -> dict[str, Any]:
    """The same training as a bare loop: collate, two forwards, DPO loss, backward, AdamW."""
    from peft import get_peft_model
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from feedback.training.data import load_training_data, with_images
    from feedback.training.store import JobStore
    from feedback.training.trainer import load_for_training, lora_config, plan_model

    settings = _settings(template, model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    with JobStore(settings) as store:
        data = load_training_data(store, settings, method="dpo", processor=processor, limit=2048)
    rows = [e.row for e in data.train]
    plan = plan_model(
        str(model_dir), device="cpu", dtype="auto", load_in_4bit="auto", gradient_checkpointing="auto",
        headroom_gib=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(load_for_training(plan), lora_config(plan, r=16, alpha=32))
    model.train()
    collate = DataCollatorForVisionPreference(processor=processor, max_length=None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)

    def logps(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        tokens = batch["input_ids"][:, 1:]
        per_token = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return (per_token * batch["completion_mask"][:, 1:]).sum(-1)

    steps = 0
    started = time.perf_counter()
    for _ in range(int(epochs)):
        for start in range(0, len(rows), batch):
            inputs = collate([with_images(r) for r in rows[start : start + batch]])
            with torch.no_grad(), model.disable_adapter():
                reference = logps(inputs)
            policy = logps(inputs)
            n = policy.shape[0] // 2
            margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
            loss = -torch.nn.functional.logsigmoid(BETA * margin).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    seconds = time.perf_counter() - started
    pairs = len(rows) * int(epochs)
    return {
        "pairs": pairs,
        "steps": steps,
        "train_s": round(seconds, 2),
        "pairs_per_s": round(pairs / seconds, 2),
    }


def _settings(data_dir: Path, model_dir: Path) -> Any:
    from smolcord.settings import Settings

    return Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=data_dir, model=str(model_dir), heldout_fraction=0.2, gate_min_heldout=1,
        worker_url="http://127.0.0.1:9",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--prompts", type=int, default=64, help="voted colour prompts (80%% train, 20%% held out)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)  # the job logs every run; the table is what matters here
    torch.set_num_threads(args.threads)

    from model.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "model")
        template = work / "store"
        record_store(template, model_dir, args.prompts)
        real, hand = [], []
        for _ in range(args.repeats):
            hand.append(hand_written(template, model_dir, epochs=args.epochs, batch=args.batch))
            real.append(real_path(template, model_dir, work, epochs=args.epochs, batch=args.batch))
    best_real = max(real, key=lambda r: r["pairs_per_s"])
    best_hand = max(hand, key=lambda r: r["pairs_per_s"])
    ratio = best_real["pairs_per_s"] / best_hand["pairs_per_s"]
    print(f"{'side':<14}{'pairs':>7}{'steps':>7}{'train s':>9}{'pairs/s':>9}")
    for name, row in (("hand-written", best_hand), ("smolcord train", best_real)):
        print(f"{name:<14}{row['pairs']:>7}{row['steps']:>7}{row['train_s']:>9.2f}{row['pairs_per_s']:>9.2f}")
    print(f"whole `smolcord train` run (store, train, gate, registry): {best_real['run_wall_s']:.1f} s")
    verdict = "meets" if ratio >= GOAL_RATIO else "misses"
    print(f"ratio smolcord train / hand-written: {ratio:.2f}x ({verdict} the {GOAL_RATIO}x goal)")
    result = {
        "bench": "train",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "prompts": args.prompts,
        "epochs": args.epochs,
        "batch": args.batch,
        "hand_written": hand,
        "smolcord_train": real,
        "ratio": round(ratio, 3),
        "goal": GOAL_RATIO,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
