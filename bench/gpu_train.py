"""Training benchmark on a CUDA GPU at SmolVLM-256M's and SmolVLM-2B's dimensions: `smolcord train` against a
hand-written DPO step.

    python -m bench.gpu_train [--arch smolvlm-256m,smolvlm-2b] [--prompts 48] [--batch 4] [--out DIR]

Run it in the same lease as /work/shared/gpu/gpu_anchor.py and gpu_qlora_ckpt.py, so that every
ratio compares figures from one machine. For each architecture it builds
`build_tiny_model(arch=...)` (random weights, the real processor's tiling) and a store of voted
colour prompts shaped like the anchor's inputs (a 1536x384 image: 5 tiles, 320 image tokens at
256M and 405 at 2B; answers of about 128 tokens), then measures on the same data:

- hand-written: the anchor's step (policy forward/backward on chosen+rejected, reference with the
  adapter disabled, -logsigmoid(beta * margin), AdamW) on the model loaded exactly as the job
  loads it (256M: bf16; 2B: 4-bit NF4, vision tower/connector/head kept out, gradient
  checkpointing) with the same LoRA;
- smolcord train: `feedback.training.job.run` end to end (store, trl's DPOTrainer, gate, registry); step
  times from the arrival of its JSON progress lines, peak training memory from its metrics.json.

Both report the median step time after two warm-up steps, as pairs/s. Goals (issue 6): 256M,
smolcord train at least 0.8x the hand-written pairs/s; 2B in 4-bit, a peak under 10 GiB at 2.5
pairs/s or more. Writes $OUT/gpu_train.json (or --out) after every section, so a failure keeps the
figures before it. Without CUDA it stops at once with exit status 2; `--device cpu --arch tiny`
runs the same code on a CPU as a dry run (figures meaningless).

Beyond the GPU machine's torch, transformers, peft and accelerate, it needs the wheels the shared
README lists for trl (trl, datasets, dill, multiprocess, bitsandbytes) and this project's own:
pydantic, pydantic-core, pydantic-settings, python-dotenv, annotated-types, typing-inspection,
sqlalchemy, greenlet, aiosqlite, alembic, mako, matplotlib (if absent) and aiohttp; put the
repository on PYTHONPATH (or `pip install --no-deps -e .`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

BETA = 0.1
LEARNING_RATE = 5e-5
GOAL_RATIO_256M = 0.8
GOAL_2B_GIB = 10.0
GOAL_2B_PAIRS_PER_S = 2.5
IMAGE_SIZE = (1536, 384)  # 4x1 tiles + the global one, as in the anchor
FILLER_WORDS = 68  # answers of ~128 tokens with the tiny-model tokenizer, as the anchor's NEW = 128
WARMUP_STEPS = 2


class StampedLines(io.StringIO):
    """Keeps each JSON progress line with the time it arrived: step times as the bot would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[float, dict[str, Any]]] = []

    def write(self, text: str) -> int:
        now = time.perf_counter()
        for line in text.splitlines():
            if line.strip():
                self.stamps.append((now, json.loads(line)))
        return super().write(text)


def steady_pairs_per_s(step_ends: Sequence[float], started: float, batch: int) -> dict[str, Any]:
    """Median step time after the warm-up steps, as pairs/s."""
    times = [b - a for a, b in zip([started, *step_ends[:-1]], step_ends, strict=True)]
    steady = times[WARMUP_STEPS:] or times
    median = statistics.median(steady)
    return {"steps": len(times), "first_step_s": round(times[0], 3), "step_s": round(median, 4),
            "pairs_per_s": round(batch / median, 2)}  # fmt: skip


def build_store(work: Path, model_dir: Path, prompts: int, device: str) -> tuple[Path, Any]:
    from feedback.store.db import upgrade_to_head
    from feedback.store.synthetic import record_colour_votes

    data_dir = work / "store"
    settings = _settings(data_dir, model_dir, device)
    upgrade_to_head(settings.db_url)
    record_colour_votes(settings, prompts=prompts, size=IMAGE_SIZE, filler_words=FILLER_WORDS)
    return data_dir, settings


def hand_written(settings: Any, *, batch: int, steps: int) -> dict[str, Any]:
    """The anchor's DPO step on the job's model setup and data (trl's collator: same tokens, same tiles)."""
    from peft import get_peft_model
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from feedback.training.data import load_training_data, with_images
    from feedback.training.store import JobStore
    from feedback.training.trainer import load_for_training, lora_config, plan_model

    plan = plan_model(
        settings.model, device=settings.device, dtype=settings.dtype, load_in_4bit="auto",
        gradient_checkpointing="auto", headroom_gib=0,
    )  # fmt: skip
    processor = AutoProcessor.from_pretrained(settings.model)
    with JobStore(settings) as store:
        data = load_training_data(
            store, settings, method="dpo", processor=processor, limit=plan_limit(settings.model)
        )
    _sync(plan.device)
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(plan.device)
    model = get_peft_model(load_for_training(plan), lora_config(plan, r=16, alpha=32))
    if plan.gradient_checkpointing:  # as trl sets it up for a peft model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if plan.quantize:  # trl keeps QLoRA adapters in bf16
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    model.train()
    collate = DataCollatorForVisionPreference(processor=processor, max_length=None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)

    def logps(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
        logits = model(**kwargs, use_cache=False).logits[:, :-1].float()
        tokens = inputs["input_ids"][:, 1:]
        per_token = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return (per_token * inputs["completion_mask"][:, 1:]).sum(-1)

    rows = [e.row for e in data.train]
    ends = []
    started = time.perf_counter()
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        inputs = {k: v.to(plan.device) for k, v in collate([with_images(r) for r in chunk]).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(plan.dtype)
        with torch.no_grad(), model.disable_adapter():
            reference = logps(model, inputs)
        policy = logps(model, inputs)
        n = policy.shape[0] // 2
        margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
        (-torch.nn.functional.logsigmoid(BETA * margin).mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(plan.device)
        ends.append(time.perf_counter())
    result = steady_pairs_per_s(ends, started, batch)
    result["seq_len"] = int(inputs["input_ids"].shape[1])
    result["image_tiles_per_row"] = int(inputs["pixel_values"].shape[1]) if "pixel_values" in inputs else 0
    result["precision"] = plan.describe()
    if plan.device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(plan.device) / 2**30, 2)
    del model, optimizer
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def smolcord_train(template: Path, work: Path, model_dir: Path, device: str, *, batch: int) -> dict[str, Any]:
    """One `smolcord train` run on a copy of the store; step times from its JSON lines."""
    from feedback.training.config import RunArguments, TrainArguments
    from feedback.training.job import run
    from smolcord.registry import AdapterRegistry

    data_dir = work / "real"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(template, data_dir)
    settings = _settings(data_dir, model_dir, device)
    out = StampedLines()
    hp = TrainArguments(learning_rate=LEARNING_RATE, num_train_epochs=1, per_device_train_batch_size=batch)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    started = time.perf_counter()
    code = run(settings, RunArguments(progress="json"), hp, stdout=out)
    wall = time.perf_counter() - started
    steps = [(t, line) for t, line in out.stamps if "step" in line]
    final = out.stamps[-1][1]
    # the first step's clock starts when training does: the moment the trainer is built is not
    # visible from outside, so the steady median (warm-up excluded) is the figure to compare
    result = steady_pairs_per_s([t for t, _ in steps], steps[0][0] - 1e-9, batch) if steps else {}
    registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    metrics = registry.metrics(final["version"]) if final.get("version") else {}
    result.update(
        exit_code=code, verdict=final.get("verdict"), run_wall_s=round(wall, 2),
        train_s=metrics.get("train", {}).get("seconds"), peak_mem_gib=metrics.get("train", {}).get("peak_gpu_gib"),
        heldout_accuracy=final.get("heldout_accuracy"),
    )  # fmt: skip
    if code not in (0, 3):
        result["message"] = final.get("message")
    return result


def plan_limit(model_id: str) -> int:
    from feedback.training.job import plan_limit as limit

    return limit(model_id)


def _settings(data_dir: Path, model_dir: Path, device: str) -> Any:
    from smolcord.settings import Settings

    return Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=data_dir, model=str(model_dir), device=device, heldout_fraction=0.2,
        gate_min_heldout=1, worker_url="http://127.0.0.1:9",
    )  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from model.tiny import build_tiny_model

    record: dict[str, Any] = {}
    started = time.perf_counter()
    model_dir = build_tiny_model(work / arch / "model", arch=arch)
    record["build_s"] = round(time.perf_counter() - started, 1)
    template, settings = build_store(work / arch, model_dir, args.prompts, args.device)
    record["hand_written"] = hand_written(settings, batch=args.batch, steps=args.steps)
    print(arch, "hand-written", record["hand_written"], flush=True)
    record["smolcord_train"] = smolcord_train(template, work / arch, model_dir, args.device, batch=args.batch)
    print(arch, "smolcord train", record["smolcord_train"], flush=True)
    real, hand = record["smolcord_train"].get("pairs_per_s"), record["hand_written"]["pairs_per_s"]
    if real:
        record["ratio"] = round(real / hand, 3)
    shutil.rmtree(work / arch, ignore_errors=True)
    return record


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals against the figures measured."""
    goals: dict[str, Any] = {}
    if "ratio" in results.get("smolvlm-256m", {}):
        goals["256m_ratio_at_least_0.8"] = results["smolvlm-256m"]["ratio"] >= GOAL_RATIO_256M
    real_2b = results.get("smolvlm-2b", {}).get("smolcord_train", {})
    if real_2b.get("pairs_per_s") and real_2b.get("peak_mem_gib"):
        goals["2b_under_10_gib"] = real_2b["peak_mem_gib"] < GOAL_2B_GIB
        goals["2b_at_least_2.5_pairs_per_s"] = real_2b["pairs_per_s"] >= GOAL_2B_PAIRS_PER_S
    return goals


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_train", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", default="smolvlm-256m,smolvlm-2b", help="comma-separated; tiny for a dry run"
    )
    parser.add_argument("--prompts", type=int, default=48, help="voted prompts (80%% train, 20%% held out)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step, as the anchor's")
    parser.add_argument("--steps", type=int, default=8, help="hand-written steps (2 of them warm-up)")
    parser.add_argument("--device", default="cuda", help="cpu for a dry run (figures meaningless)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench.gpu_train: needs a CUDA GPU and torch sees none; run it on the GPU machine beside "
            "/work/shared/gpu/gpu_anchor.py (or pass --device cpu --arch tiny for a dry run)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    import logging

    logging.disable(logging.INFO)
    results: dict[str, Any] = {"env": _env(args.device)}
    out = args.out / "gpu_train.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def dump() -> None:
        out.write_text(json.dumps(results, indent=1) + "\n")

    dump()
    with tempfile.TemporaryDirectory(prefix="gpu-train-") as tmp:
        for arch in args.arch.split(","):
            try:
                results[arch] = measure(arch, args, Path(tmp))
            except Exception:  # keep the other architecture's figures
                results[arch] = {"error": traceback.format_exc()[-3000:]}
                print(results[arch]["error"], file=sys.stderr, flush=True)
            dump()
    results["goals"] = verdicts(results)
    dump()
    print(json.dumps(results))
    return results


def _env(device: str) -> dict[str, Any]:
    import peft
    import transformers
    import trl

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "trl": trl.__version__, "device": device}  # fmt: skip
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


if __name__ == "__main__":
    main()
