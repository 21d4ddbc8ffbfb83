"""A warm start for `smolcord simulate`: a base that answers in the simulated world's words, at chance on what it sees.

    from feedback.training.warmstart import build_warm_start
    build_warm_start(base_dir, out_dir, seed=0)        # base_dir: e.g. model.tiny.build_tiny_model(...)

A randomly initialised model (the tiny one) answers gibberish, and a vote can only tell it that
gibberish is wrong. So the simulation starts from a checkpoint that already writes the world's
answer form ("It is a red circle.": one colour, one shape) but names a colour and a shape at chance:
the supervised pass trains every weight with trl's SFTTrainer on world images (never asked or
evaluated) whose captions name a colour read off the background's grey level and a shape read off
the shape's horizontal position (smolcord.simulate.world.Layout.cue). Both are drawn independently
of the shape's true colour and kind, so the base's answers are right at chance by construction, and
whatever the votes teach later shows as a rise from chance.

Why a cue and not a random caption per image: captioned at random, the model learns the marginal
and answers every image with the same sentence ("It is a green star."). Then the first pairs all
reject that one colour and never choose it (its images are liked at once and nobody presses 🔁), so
the first adapter learns to avoid the colour altogether and plateaus at three colours of four
(0.72-0.75 on the evaluation set, docs/benchmarks.md). With a cue the base's answers vary from image
to image, every colour appears chosen and rejected, and the votes can teach the whole mapping.
The result is saved as a full checkpoint (model, processor, tokenizer) that the Auto classes, the
worker and the training job load like any base.

Why every weight and not a LoRA: on the tiny model (300k parameters, random weights) a rank-16 LoRA
on the text model plateaued at a loss of 5.8 (greedy answers in form, sampled ones gibberish, so 🔁
never offered another colour and no pairs formed), where training everything reaches 0.5 in 100
steps and 0.4, the floor of a random colour and shape, by 150 (about 50 s on 2 CPU cores).

The output is cached: a folder holding a finished checkpoint built from the same base with the same
parameters is returned as it is (WARM_START_FILE, written last, records them).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smolcord.simulate.world import Scene

__all__ = ["WARM_START_FILE", "build_warm_start", "caption_rows", "greedy_answers"]

log = logging.getLogger(__name__)

WARM_START_FILE = "warm_start.json"
TRUTH_SHARE = 0.7  # of the "mostly-truth" captions that name the true colour


def build_warm_start(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    captions: str = "layout",
    steps: int = 120,
    examples: int = 400,
    learning_rate: float = 1e-3,
    batch_size: int = 8,
) -> Path:
    """Train and save the warm start of `base_dir` into `out_dir` (unless it is there already);
    returns `out_dir`. Runs on the CPU in float32: under a minute for the tiny model."""
    base, out = Path(base_dir), Path(out_dir)
    parameters = {
        "base": str(base.resolve()), "base_fingerprint": _fingerprint(base), "seed": seed, "steps": steps,
        "examples": examples, "learning_rate": learning_rate, "batch_size": batch_size,
        "trained": "all weights", "captions": captions,
    }  # fmt: skip
    if _finished(out, parameters):
        log.info("warm start %s is built already", out)
        return out
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        loss = _train(base, staging, parameters)
        seconds = round(time.perf_counter() - started, 1)
        record = {**parameters, "final_loss": loss, "seconds": seconds}
        (staging / WARM_START_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)  # an unfinished or different warm start
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("warm start %s built in %.1f s (final loss %.3f)", out, seconds, loss)
    return out


def caption_rows(scenes: Sequence[Scene], *, seed: int, captions: str = "layout") -> list[dict[str, Any]]:
    """trl prompt-completion rows: each scene's image and question, answered with the colour its
    background's grey level says and the shape its position says (independent of what it shows), or
    with `captions="mostly-truth"` what it does show, seven times in ten, and another colour
    otherwise (a base that already answers fairly well yet still samples other colours: the canary's
    minority scenario starts from one)."""
    from PIL import Image

    from feedback.store.export import prompt_messages
    from smolcord.simulate.world import COLOURS, SHAPES, World, describe

    if captions not in ("layout", "mostly-truth"):
        raise ValueError(f"captions are 'layout' or 'mostly-truth', not {captions!r}")
    rng = random.Random(f"{seed}/captions")

    world = World(seed)
    rows = []
    for scene in scenes:
        where = world.layout(scene)
        if captions == "mostly-truth":
            others = [c for c in COLOURS if c != scene.truth.colour]
            colour = scene.truth.colour if rng.random() < TRUTH_SHARE else rng.choice(others)
            caption = describe(colour, scene.truth.shape)
        else:
            caption = describe(where.cue(list(COLOURS), by="grey"), where.cue(SHAPES, by="x"))
        with Image.open(io.BytesIO(scene.png)) as image:
            pixels = image.convert("RGB")
        rows.append(
            {
                "images": [pixels],
                "prompt": prompt_messages([], scene.question, 1),  # what the bot's questions become
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": caption}]}],
            }
        )
    return rows


def greedy_answers(
    model: Any, processor: Any, scenes: Sequence[Scene], *, max_new_tokens: int = 16, batch_size: int = 16
) -> list[str]:
    """The model's greedy answers to the scenes' questions about their images, in order (for measuring)."""
    import torch
    from PIL import Image

    from feedback.store.export import prompt_messages

    tokenizer = processor.tokenizer
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    answers: list[str] = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        texts = [
            processor.apply_chat_template(
                [_with_image_part(m) for m in prompt_messages([], s.question, 1)], add_generation_prompt=True
            )
            for s in chunk
        ]
        images = [[Image.open(io.BytesIO(s.png)).convert("RGB")] for s in chunk]
        batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            ids = row[: next((i for i, t in enumerate(row) if t in stops), len(row))]
            answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers


# ------------------------------------------------------------------------------ plumbing


def _train(base: Path, staging: Path, parameters: dict[str, Any]) -> float:
    """SFT every weight on world images captioned by their layout; save model and processor to `staging`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from feedback.store.export import to_dataset
    from feedback.training.trainer import plan_model
    from smolcord.simulate.world import World

    seed = parameters["seed"]
    scenes = World(seed).warm_start_scenes(parameters["examples"])
    dataset = to_dataset(
        _with_paths(caption_rows(scenes, seed=seed, captions=parameters["captions"]), staging),
        kind="unpaired",
        metadata=False,
    )
    plan = plan_model(
        str(base), device="cpu", dtype="float32", load_in_4bit="false", gradient_checkpointing="false",
        headroom_gib=0,
    )  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=plan.dtype)
    processor = AutoProcessor.from_pretrained(base)
    config = SFTConfig(
        output_dir=str(staging / "trainer"), max_steps=parameters["steps"], learning_rate=parameters["learning_rate"],
        per_device_train_batch_size=parameters["batch_size"], seed=seed, lr_scheduler_type="constant",
        use_cpu=True, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, max_length=None, dataset_num_proc=None,
        completion_only_loss=True,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset.remove_columns("label"), processing_class=processor
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trained: Any = trainer.model
    trained.config.use_cache = True
    for leftover in ("trainer", "images"):
        shutil.rmtree(staging / leftover, ignore_errors=True)
    trained.save_pretrained(staging)
    processor.save_pretrained(staging)
    return round(float(sum(losses[-4:]) / len(losses[-4:])), 4) if losses else float("nan")


def _with_paths(rows: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """The rows with their images written to files (the dataset's image column decodes from paths),
    and a `label` column to_dataset's unpaired kind expects."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    out = []
    for i, row in enumerate(rows):
        path = images / f"{i}.png"
        row["images"][0].save(path)
        out.append({**row, "images": [str(path)], "label": True})
    return out


def _with_image_part(message: dict[str, Any]) -> dict[str, Any]:
    """trl's image placeholder ({"type": "image", "text": None}) in the form the chat template takes."""
    return {
        **message,
        "content": [{"type": "image"} if p["type"] == "image" else p for p in message["content"]],
    }


def _fingerprint(base: Path) -> str:
    """The base checkpoint's config and weight file sizes: a different base is a different warm start."""
    digest = hashlib.sha256((base / "config.json").read_bytes())
    for weights in sorted(base.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _finished(out: Path, parameters: dict[str, Any]) -> bool:
    record = out / WARM_START_FILE
    if not record.is_file() or not (out / "config.json").is_file():
        return False
    try:
        saved = json.loads(record.read_text())
    except ValueError:
        return False
    return all(saved.get(name) == value for name, value in parameters.items())
