"""The simulation's warm start: the world's answer form, at chance on the colour, cached."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from feedback.training.warmstart import (
    WARM_START_FILE,
    _finished,
    build_warm_start,
    caption_rows,
    greedy_answers,
)
from smolcord.simulate.world import COLOURS, SHAPES, World, colour_rule, colours_named, describe


def test_captions_have_the_worlds_form_and_follow_the_layout_not_the_truth() -> None:
    world = World(seed=0)
    scenes = world.warm_start_scenes(200)
    rows = caption_rows(scenes, seed=0)
    captions = [row["completion"][0]["content"][0]["text"] for row in rows]
    assert captions == [r["completion"][0]["content"][0]["text"] for r in caption_rows(scenes, seed=0)]
    assert set(captions) <= {describe(c, s) for c in COLOURS for s in SHAPES}
    # The colour is the background's grey level, the shape the position: varied per image.
    assert captions == [
        describe(world.layout(s).cue(list(COLOURS), by="grey"), world.layout(s).cue(SHAPES, by="x"))
        for s in scenes
    ]
    # Independent of the truth: right about a quarter of the time (4 colours), every colour used.
    right = sum(colour_rule(c, s.truth) for c, s in zip(captions, scenes, strict=True))
    assert 0.15 < right / len(scenes) < 0.35
    assert {next(iter(colours_named(c))) for c in captions} == set(COLOURS)
    row = rows[0]
    assert row["prompt"][-1]["content"][0]["type"] == "image" and len(row["images"]) == 1
    assert row["prompt"][-1]["content"][-1]["text"] == scenes[0].question


@pytest.mark.slow
@pytest.mark.timeout(900)  # builds the session's warm start (about a minute alone, more on a loaded machine)
def test_the_warm_start_answers_in_form_at_chance_and_is_cached(
    tiny_model_dir: Path, warm_start_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from model.engine import Engine

    out = warm_start_dir  # built by the session fixture: build_warm_start(tiny_model_dir, .../warm, seed=0)
    record = json.loads((out / WARM_START_FILE).read_text())
    assert record["seed"] == 0 and record["base"] == str(tiny_model_dir.resolve())
    assert sorted(p.name for p in out.parent.iterdir()) == ["warm"]  # no staging left behind

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    evaluation = World(seed=0).evaluation_set(32)
    answers = greedy_answers(model, processor, evaluation)
    one_colour = sum(len(colours_named(a)) == 1 for a in answers) / len(answers)
    liked = sum(colour_rule(a, s.truth) for a, s in zip(answers, evaluation, strict=True)) / len(answers)
    assert one_colour >= 0.9, Counter(answers)
    assert liked <= 0.45, Counter(answers)
    # Not one sentence for every image (what random captions taught): the answers vary with the image.
    assert len(set().union(*(colours_named(a) for a in answers))) >= 3, Counter(answers)
    # Sampled answers (🔁) are in form too, and name other colours: that is how pairs form.
    torch.manual_seed(0)
    sampled = sampled_answers(model, processor, evaluation[:16])
    assert sum(len(colours_named(a)) == 1 for a in sampled) / len(sampled) >= 0.75, sampled
    assert len(set().union(*(colours_named(a) for a in sampled))) >= 3, sampled
    # A plain checkpoint (merged: no adapter files) that the worker loads as its base.
    assert not list(out.glob("adapter_*"))
    engine = Engine.load(str(out), device="cpu")
    for name, weight in model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], weight), name

    # Built once: the same call finds it; other parameters or an unfinished folder would not.
    stamp = (out / WARM_START_FILE).stat().st_mtime_ns
    assert build_warm_start(tiny_model_dir, out, seed=0) == out
    assert (out / WARM_START_FILE).stat().st_mtime_ns == stamp
    parameters = {k: record[k] for k in record if k not in ("final_loss", "seconds")}
    assert _finished(out, parameters)
    assert not _finished(out, {**parameters, "seed": 1})
    saved = (out / WARM_START_FILE).read_bytes()
    (out / WARM_START_FILE).unlink()
    try:
        assert not _finished(out, parameters)
    finally:
        (out / WARM_START_FILE).write_bytes(saved)


def sampled_answers(model: Any, processor: Any, scenes: Any) -> list[str]:
    """One answer per scene sampled at temperature 1, as the worker samples a 🔁 alternative."""
    import io

    from PIL import Image

    answers = []
    for scene in scenes:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": scene.question}]}
        ]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(
            text=prompt, images=[Image.open(io.BytesIO(scene.png)).convert("RGB")], return_tensors="pt"
        )
        out = model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0)
        answers.append(
            processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        )
    return answers


def test_mostly_truth_captions_name_the_true_colour_seven_times_in_ten() -> None:
    scenes = World(seed=0).warm_start_scenes(400)
    captions = [
        r["completion"][0]["content"][0]["text"]
        for r in caption_rows(scenes, seed=0, captions="mostly-truth")
    ]
    right = sum(colour_rule(c, s.truth) for c, s in zip(captions, scenes, strict=True)) / len(scenes)
    assert 0.62 < right < 0.78
    assert all(
        describe(next(iter(colours_named(c))), s.truth.shape) == c
        for c, s in zip(captions, scenes, strict=True)
    )
    with pytest.raises(ValueError, match="captions"):
        caption_rows(scenes[:1], seed=0, captions="truthy")
