"""Two versions at once (the canary): what the candidate's model copy costs, against one version in the same run.

    python -m bench.bench_two_versions [--arch tiny|smolvlm-256m] [--rows 8] [--tokens 16] [--reps 3]

Builds the arch with random weights, serves LoRA A (r=16 on the text layers) as current and B as the
candidate (`Engine.load_candidate`: a second copy of the model), and prints: the copy's size and
build + merge time; decode throughput of `rows` rows on one version against rows/2 + rows/2 on the
two copies (two continuous batches stepped in turn, as the scheduler does), and against rows on a
copy carrying B as an unmerged LoRA (peft layers), the alternative design. Best of `reps` runs each.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model

from model.continuous import ContinuousBatch
from model.engine import Engine
from model.generation import SamplingParams
from model.tiny import build_tiny_model

TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class _Source:
    def __init__(self, tokens: int) -> None:
        self.params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        self.cancelled = False
        self.deadline = float("inf")
        self.model = ""


def _lora(engine: Engine, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        copy.deepcopy(engine.model), LoraConfig(target_modules=TARGETS, r=16, lora_alpha=32)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    peft_model.save_pretrained(out)
    return out


def _decode(batches: list[tuple[ContinuousBatch, int]], encoding: Any, tokens: int) -> float:
    for batch, rows in batches:
        for _ in range(rows):
            batch.admit(_Source(tokens), encoding)
    started = time.perf_counter()
    while any(not batch.idle for batch, _ in batches):
        for batch, _ in batches:
            if not batch.idle:
                batch.step(lambda events: None)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.load(str(build_tiny_model(Path(tmp) / "model", arch=args.arch)), device="cpu")
        engine.load_adapter(_lora(engine, Path(tmp) / "a", 1), version="v1")
        lora_b = _lora(engine, Path(tmp) / "b", 2)
        started = time.perf_counter()
        engine.load_candidate(lora_b, version="v2")
        built = time.perf_counter() - started
        candidate = engine.candidate
        assert candidate is not None
        size = sum(p.numel() * p.element_size() for p in candidate.model.parameters())
        unmerged = engine._base_copy()
        inject_adapter_in_model(LoraConfig(target_modules=TARGETS, r=16, lora_alpha=32), unmerged)
        lora_engine = Engine(unmerged, engine.processor, name=engine.name)

    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Describe the picture in detail."}]}
    ]
    encoding = engine.encode(conversation, [])
    rows, half = args.rows, args.rows // 2
    setups = {
        "one version": lambda: [(engine.continuous, rows)],
        "two copies": lambda: [(engine.continuous, half), (candidate.continuous, rows - half)],
        "unmerged LoRA": lambda: [(lora_engine.continuous, rows)],
    }
    for make in setups.values():  # warm: first allocations, lazy inits
        _decode(make(), encoding, args.tokens)
    seconds = {
        name: min(_decode(make(), encoding, args.tokens) for _ in range(args.reps))
        for name, make in setups.items()
    }
    print(
        f"{args.arch}: candidate copy {size / 2**20:.0f} MB ({engine.dtype}), built and merged in {built:.2f} s"
    )
    for name, value in seconds.items():
        ratio = value / seconds["one version"]
        print(f"  {name:14s} {rows * args.tokens / value:8.1f} tok/s  ({ratio:.2f}x the time of one version)")


if __name__ == "__main__":
    main()
