"""The engine's pieces on the tiny model: batch collation, per-row hooks, incremental detokenising."""

from __future__ import annotations

import time
from typing import Any

import torch
from PIL import Image

from model.engine import Engine
from model.generation import (
    BatchStreamer,
    Completion,
    IncrementalDetokenizer,
    Row,
    RowSampler,
    RowStopper,
    SamplingParams,
    TextDelta,
)


def _image(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def _turn(text: str, images: int = 0) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


class _Source:
    def __init__(self, params: SamplingParams, *, deadline: float = float("inf")) -> None:
        self.id = "test"
        self.params = params
        self.deadline = deadline
        self.cancelled = False
        self.model = ""


def test_collate_matches_the_processor_batch(engine: Engine) -> None:
    red, blue = _image((100, 60), (200, 10, 10)), _image((20, 20), (0, 10, 200))
    conversations = [
        (_turn("What is this?", 1), [red]),
        (_turn("Hello there, no image"), []),
        (_turn("Both?", 2), [blue, red]),
    ]
    rows = [engine.encode(conversation, images) for conversation, images in conversations]
    ours = engine.collate(rows)

    processor = engine.processor
    texts = [
        processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c, _ in conversations
    ]
    theirs = processor(
        text=texts,
        images=[images for _, images in conversations],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name].to(ours[name].dtype)), name


def test_typed_image_markers_do_not_break_the_image_count(engine: Engine) -> None:
    encoding = engine.encode(
        _turn("look: <image><fake_token_around_image>", 1), [_image((32, 32), (1, 2, 3))]
    )
    plain = engine.encode(_turn("look: ", 1), [_image((32, 32), (1, 2, 3))])
    assert encoding.input_ids == plain.input_ids


def test_stopper_decides_per_row(engine: Engine) -> None:
    rows = [
        Row(_Source(SamplingParams(max_tokens=2)), 5, IncrementalDetokenizer(engine.processor.tokenizer)),
        Row(_Source(SamplingParams(max_tokens=9)), 5, IncrementalDetokenizer(engine.processor.tokenizer)),
        Row(_Source(SamplingParams(max_tokens=9)), 5, IncrementalDetokenizer(engine.processor.tokenizer)),
        Row(
            _Source(SamplingParams(max_tokens=9), deadline=0),
            5,
            IncrementalDetokenizer(engine.processor.tokenizer),
        ),
    ]
    rows[2].source.cancelled = True
    stop = next(iter(engine.stop_ids))
    stopper = RowStopper(rows, stop_ids=engine.stop_ids, max_model_len=1000, clock=time.monotonic)
    first = stopper(torch.tensor([[7], [stop], [7], [7]]), torch.zeros(4, 10))
    assert first.tolist() == [False, True, True, True]
    assert [r.finish_reason for r in rows] == [None, "stop", "cancelled", "timeout"]
    second = stopper(torch.tensor([[7, 8], [stop, 2], [7, 2], [7, 2]]), torch.zeros(4, 10))
    assert second.tolist() == [True, True, True, True]
    assert rows[0].finish_reason == "length" and rows[0].generated == 2
    assert rows[1].generated == 1  # a finished row stops counting


def test_sampler_pins_each_rows_own_choice() -> None:
    scores = torch.randn(3, 50)
    scores[2] = scores[1]
    greedy = scores[0].clone()

    def row(temperature: float, seed: int) -> Row:
        return Row(_Source(SamplingParams(max_tokens=5, temperature=temperature, seed=seed)), 1, None)  # type: ignore[arg-type]

    rows = [row(0.0, 0), row(1.0, 1), row(1.0, 1)]
    out = RowSampler(rows)(torch.zeros(3, 1, dtype=torch.long), scores.clone())
    assert torch.equal(out[0], greedy)
    for i in (1, 2):
        assert torch.isfinite(out[i]).sum() == 1  # only the sampled token is left
    assert out[1].argmax() == out[2].argmax()  # same seed, same draw


def test_detokenizer_never_splits_a_character(engine: Engine) -> None:
    tokenizer = engine.processor.tokenizer
    text = "Café 😀 naïve – 日本 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the tiny vocabulary spells these out byte by byte
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_streamer_hands_each_request_only_its_tokens(engine: Engine) -> None:
    tokenizer = engine.processor.tokenizer
    stop = min(engine.stop_ids)
    sources = [_Source(SamplingParams(max_tokens=3)), _Source(SamplingParams(max_tokens=3))]
    rows = [Row(s, 4, IncrementalDetokenizer(tokenizer)) for s in sources]
    delivered: list[tuple[Any, Any]] = []
    streamer = BatchStreamer(rows, stop_ids=engine.stop_ids, model_name="m", deliver=delivered.extend)
    (the,), (cat,) = (tokenizer(word, add_special_tokens=False)["input_ids"] for word in ("The", " cat"))

    streamer.put(torch.zeros(2, 4, dtype=torch.long))  # the prompt: ignored
    rows[0].generated = rows[1].generated = 1
    streamer.put(torch.tensor([the, the]))
    rows[0].generated, rows[1].generated, rows[1].finish_reason = 2, 2, "stop"
    streamer.put(torch.tensor([cat, stop]))  # row 1 ends on the stop token: no text for it
    streamer.end()

    by_source = {id(s): [e for src, e in delivered if src is s] for s in sources}
    first, second = by_source[id(sources[0])], by_source[id(sources[1])]
    assert [e.text for e in first if isinstance(e, TextDelta)] == ["The", " cat"]
    assert [e.text for e in second if isinstance(e, TextDelta)] == ["The"]
    assert isinstance(first[-1], Completion) and first[-1].finish_reason == "length"
    assert first[-1].text == "The cat"
    assert isinstance(second[-1], Completion) and second[-1].finish_reason == "stop"
    assert second[-1].text == "The" and second[-1].completion_tokens == 2
