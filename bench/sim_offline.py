"""Tune the simulation's training flags offline: train on a copy of a finished simulation's store, then score.

    python -m bench.sim_offline SIM_OUT "--lora_targets all --num_train_epochs 30 ..." [--method dpo] [--seed 0]

SIM_OUT is a `smolcord simulate --out` folder (its data/ and models/warm-start-seed0/). The
store is copied without its adapters, one run of the real training job trains on it (the gate
forced open: what is measured here is the adapter, not the decision), and the base with the new
adapter merged answers the simulation's evaluation set greedily; prints one JSON line with the
colour rule's share, the number of distinct answers and the seconds. The baseline is the base's
own share, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def colour_share(model: Any, processor: Any, seed: int, questions: int) -> tuple[float, int]:
    from feedback.training.warmstart import greedy_answers
    from smolcord.simulate.world import World, colour_rule

    scenes = World(seed).evaluation_set(questions)
    answers = greedy_answers(model, processor, scenes)
    liked = sum(colour_rule(a, s.truth) for a, s in zip(answers, scenes, strict=True))
    return liked / len(scenes), len(set(answers))


def sampled_in_form(model: Any, processor: Any, seed: int, questions: int) -> float:
    """The share of answers sampled as 🔁 samples them (temperature 1, top_p 0.9) that name exactly one
    colour: an adapter whose alternatives are word salad makes no new pairs, whatever its greedy share."""
    import io

    import torch
    from PIL import Image

    from feedback.store.export import prompt_messages
    from feedback.training.warmstart import _with_image_part
    from smolcord.simulate.world import World, colours_named

    scenes = World(seed).evaluation_set(questions)
    texts = [
        processor.apply_chat_template(
            [_with_image_part(m) for m in prompt_messages([], s.question, 1)], add_generation_prompt=True
        )
        for s in scenes
    ]
    images = [[Image.open(io.BytesIO(s.png)).convert("RGB")] for s in scenes]
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.9)
    answers = processor.tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return sum(len(colours_named(a)) == 1 for a in answers) / len(answers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sim_out", type=Path)
    parser.add_argument("flags", help="flags of python -m feedback.training (SMOLCORD_TRAIN_ARGS)")
    parser.add_argument("--method", default="dpo", choices=["dpo", "kto", "sft+dpo"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions", type=int, default=64)
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from feedback.training.config import RunArguments, parse_arguments
    from feedback.training.job import run
    from smolcord.settings import Settings

    warm = args.sim_out / "models" / "warm-start-seed0"  # one base for every seed
    processor = AutoProcessor.from_pretrained(warm)
    base_share, base_distinct = colour_share(
        AutoModelForImageTextToText.from_pretrained(warm).eval(), processor, args.seed, args.questions
    )
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        shutil.copytree(args.sim_out / "data", data, ignore=shutil.ignore_patterns("adapters"))
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, data_dir=str(data), model=str(warm), device="cpu", heldout_fraction=0.25,
            gate_min_heldout=1, gate_margin=-1.0, gate_confidence=0.0, train_method=args.method,
            train_args=args.flags, worker_url="http://127.0.0.1:9",
        )  # fmt: skip
        started = time.perf_counter()
        _, hp, gate = parse_arguments(settings)
        code = run(settings, RunArguments(method=args.method, progress="none", force=True), hp, gate)
        seconds = time.perf_counter() - started
        base = AutoModelForImageTextToText.from_pretrained(warm)
        model = PeftModel.from_pretrained(base, str(data / "adapters" / "v1")).merge_and_unload().eval()
        share, distinct = colour_share(model, processor, args.seed, args.questions)
        in_form = sampled_in_form(model, processor, args.seed, args.questions)
    record = {
        "flags": args.flags, "method": args.method, "exit_code": code, "train_seconds": round(seconds, 1),
        "base_colour_share": round(base_share, 4), "base_distinct": base_distinct,
        "colour_share": round(share, 4), "distinct_answers": distinct, "sampled_in_form": round(in_form, 4),
        "ratio_to_base": round(share / base_share, 2) if base_share else None,
    }  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
