"""The engine's pieces on the tiny model: batch collation, per-row hooks, incremental detokenising."""

from __future__ import annotations

import math
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
    stopper = RowStopper(rows, stop_ids=engine.stop_ids, max_model_len=1000)
    streamer = BatchStreamer(rows, stop_ids=engine.stop_ids, model_name="m", deliver=delivered.extend)
    (the,), (cat,) = (tokenizer(word, add_special_tokens=False)["input_ids"] for word in ("The", " cat"))

    streamer.put(torch.zeros(2, 4, dtype=torch.long))  # the prompt: ignored
    for step in ([the, the], [cat, stop]):  # generate's order: the stopper, then the streamer
        stopper(torch.tensor([[t] for t in step]), torch.zeros(2, 10))
        streamer.put(torch.tensor(step))
    streamer.end()

    by_source = {id(s): [e for src, e in delivered if src is s] for s in sources}
    first, second = by_source[id(sources[0])], by_source[id(sources[1])]
    assert [e.text for e in first if isinstance(e, TextDelta)] == ["The", " cat"]
    assert [e.text for e in second if isinstance(e, TextDelta)] == ["The"]  # no text for the stop token
    assert isinstance(first[-1], Completion) and first[-1].finish_reason == "length"
    assert first[-1].text == "The cat" and first[-1].model == "m"
    assert isinstance(second[-1], Completion) and second[-1].finish_reason == "stop"
    assert second[-1].text == "The" and second[-1].completion_tokens == 2


def _run_row(
    engine: Engine, text: str, stop: tuple[str, ...], max_tokens: int = 100
) -> tuple[list[str], Any]:
    """Feed text's tokens to one row with these stop strings; (the deltas it sent, its last event)."""
    ids = engine.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    row = Row(
        _Source(SamplingParams(max_tokens=max_tokens, stop=stop)), 4, IncrementalDetokenizer(engine._decoder)
    )
    events: list[Any] = []
    for token in ids:
        row.advance(token, stop_ids=engine.stop_ids, max_model_len=10_000, now=0.0)
        events += row.take_events()
        if row.closed:
            break
    row.finish("length")
    events += row.take_events()
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    return deltas, events[-1]


def test_stop_strings_end_the_text_before_the_first_occurrence(engine: Engine) -> None:
    text = "The cat sat on the mat. END of story, the end."
    for stop, expected in [
        (("END",), "The cat sat on the mat. "),
        (("mat", "cat"), "The "),  # the first occurrence of any of them
        ((" on the m",), "The cat sat"),  # spans many tokens
        (("zebra",), text),  # never occurs: everything, finish "length"
        (("end.",), "The cat sat on the mat. END of story, the "),  # completed by the very last token
    ]:
        deltas, completion = _run_row(engine, text, stop)
        assert isinstance(completion, Completion)
        assert "".join(deltas) == completion.text == expected, stop
        assert completion.finish_reason == ("length" if stop == ("zebra",) else "stop"), stop


def test_text_that_could_begin_a_stop_string_is_held_back(engine: Engine) -> None:
    tokenizer = engine._decoder
    row = Row(_Source(SamplingParams(max_tokens=100, stop=("ab",))), 4, IncrementalDetokenizer(tokenizer))
    sent: list[str] = []
    for piece in ("x", "a", " ", "a"):  # byte-level: one token each
        (token,) = tokenizer(piece, add_special_tokens=False)["input_ids"]
        row.advance(token, stop_ids=engine.stop_ids, max_model_len=10_000, now=0.0)
        sent += [e.text for e in row.take_events() if isinstance(e, TextDelta)]
    assert "".join(sent) == "xa "  # the last "a" could begin "ab": held back
    (c,) = tokenizer("c", add_special_tokens=False)["input_ids"]
    row.advance(c, stop_ids=engine.stop_ids, max_model_len=10_000, now=0.0)
    sent += [e.text for e in row.take_events() if isinstance(e, TextDelta)]
    assert "".join(sent) == "xa ac"  # it did not: sent after all
    # An occurrence split over two tokens (two deltas) is found whole, and nothing of it was sent.
    deltas, completion = _run_row(engine, "xa ab", ("ab",))
    assert "".join(deltas) == completion.text == "xa " and completion.finish_reason == "stop"


def test_a_failure_in_one_rows_sampling_or_stopping_ends_that_row_only(engine: Engine) -> None:
    class Broken(IncrementalDetokenizer):
        def add(self, token_id: int) -> str:
            raise RuntimeError("boom")

    tokenizer = engine._decoder
    rows = [
        # torch refuses this seed when it makes the row's generator: the draw fails.
        Row(
            _Source(SamplingParams(max_tokens=3, temperature=1.0, seed=2**64)),
            4,
            IncrementalDetokenizer(tokenizer),
        ),
        Row(_Source(SamplingParams(max_tokens=3)), 4, Broken(tokenizer)),
        Row(
            _Source(SamplingParams(max_tokens=3, temperature=1.0, seed=1)),
            4,
            IncrementalDetokenizer(tokenizer),
        ),
    ]
    delivered: list[tuple[Any, Any]] = []
    sampler, stopper = RowSampler(rows), RowStopper(rows, stop_ids=engine.stop_ids, max_model_len=1000)
    streamer = BatchStreamer(rows, stop_ids=engine.stop_ids, model_name="m", deliver=delivered.extend)
    streamer.put(torch.zeros(3, 4, dtype=torch.long))
    noise = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = torch.randn(3, 50, generator=noise)
        logits[:, [i for i in engine.stop_ids if i < 50]] = -math.inf  # the healthy row must run to length
        scores = sampler(torch.zeros(3, 1, dtype=torch.long), logits)
        done = stopper(scores.argmax(-1, keepdim=True), scores)
        streamer.put(scores.argmax(-1))
    assert done.tolist() == [True, True, True]
    last = {id(source): event for source, event in delivered}
    assert [type(last[id(row.source)]).__name__ for row in rows] == ["Failed", "Failed", "Completion"]
    assert [row.finish_reason for row in rows] == ["error", "error", "length"]
    assert rows[2].generated == 3
