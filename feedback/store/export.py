"""Preference data in trl's column format: JSONL with image file paths, or a `datasets.Dataset`.

Pairs (DPO), in trl's conversational vision format::

    {"images": ["/data/images/ab/ab…png", ...],
     "prompt":   [{"role": "user", "content": [{"type": "image", "text": null}, ..., {"type": "text", "text": "…"}]}],
     "chosen":   [{"role": "assistant", "content": [{"type": "text", "text": "…"}]}],
     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "…"}]}],
     "prompt_key": "…", "prompt_id": 1, "guild_id": 2, "chosen_response_id": 3, "rejected_response_id": 4}

Rated answers (KTO, unpaired): `images`, `prompt`, `completion` (the assistant message) and
`label` (True for 👍). The prompt holds the history's turns before the question, and `images`
lists every image in the order of the `{"type": "image"}` parts. The last columns are metadata
(`METADATA_COLUMNS`): the trainer splits train/held-out by `prompt_key`, then may drop them.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from feedback.store.pairs import (
    PreferencePair,
    RatedAnswer,
    build_pairs,
    build_rated_answers,
    is_heldout,
    left_out,
)

if TYPE_CHECKING:
    import datasets

    from smolcord.settings import Settings

__all__ = [
    "METADATA_COLUMNS",
    "ExportReport",
    "export",
    "pair_row",
    "prompt_messages",
    "rated_row",
    "to_dataset",
    "write_jsonl",
]

Kind = Literal["pairs", "unpaired"]
METADATA_COLUMNS: dict[str, tuple[str, ...]] = {
    "pairs": ("prompt_key", "prompt_id", "guild_id", "chosen_response_id", "rejected_response_id"),
    "unpaired": ("prompt_key", "prompt_id", "guild_id", "response_id"),
}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _answer(text: str) -> dict[str, Any]:
    # The model's raw text begins with the space it generated after "Assistant:", and the chat template
    # puts one there itself: kept, every trained answer would begin with a second space the model never
    # produces when it answers (SmolVLM's template renders "Assistant: " + content).
    return _text(text.strip())


def _image() -> dict[str, Any]:
    return {"type": "image", "text": None}  # "text" on every part keeps one Arrow struct type


def prompt_messages(
    history: Sequence[dict[str, Any]], question: str, own_images: int
) -> list[dict[str, Any]]:
    """The conversation up to the question, as trl conversational messages with image placeholders."""
    messages = []
    for turn in history:
        if turn["role"] == "user":
            parts = [_image() for _ in turn.get("images", [])] + [_text(turn["content"])]
            messages.append({"role": "user", "content": parts})
        else:
            messages.append({"role": "assistant", "content": [_answer(turn["content"])]})
    messages.append({"role": "user", "content": [_image() for _ in range(own_images)] + [_text(question)]})
    return messages


def _prompt_columns(example: PreferencePair | RatedAnswer) -> dict[str, Any]:
    history_images = sum(len(turn.get("images", [])) for turn in example.history if turn["role"] == "user")
    return {
        "images": [str(path) for path in example.images],
        "prompt": prompt_messages(example.history, example.question, len(example.images) - history_images),
    }


def pair_row(pair: PreferencePair) -> dict[str, Any]:
    """One DPO row: images, prompt, chosen, rejected, then the metadata columns."""
    return {
        **_prompt_columns(pair),
        "chosen": [{"role": "assistant", "content": [_answer(pair.chosen_text)]}],
        "rejected": [{"role": "assistant", "content": [_answer(pair.rejected_text)]}],
        "prompt_key": pair.prompt_key,
        "prompt_id": pair.prompt_id,
        "guild_id": pair.guild_id,
        "chosen_response_id": pair.chosen_response_id,
        "rejected_response_id": pair.rejected_response_id,
    }


def rated_row(answer: RatedAnswer) -> dict[str, Any]:
    """One KTO row: images, prompt, completion, label, then the metadata columns."""
    return {
        **_prompt_columns(answer),
        "completion": [{"role": "assistant", "content": [_answer(answer.text)]}],
        "label": answer.label,
        "prompt_key": answer.prompt_key,
        "prompt_id": answer.prompt_id,
        "guild_id": answer.guild_id,
        "response_id": answer.response_id,
    }


def write_jsonl(rows: Iterable[dict[str, Any]], out: Path) -> int:
    """Write rows as JSON lines, atomically (temp + rename); returns how many."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _features(kind: Kind, *, metadata: bool, decode_images: bool) -> datasets.Features:
    from datasets import Features, Image, List, Value

    part = {"type": Value("string"), "text": Value("string")}
    messages = List({"role": Value("string"), "content": List(part)})
    columns: dict[str, Any] = {
        "images": List(Image() if decode_images else Value("string")),
        "prompt": messages,
    }
    if kind == "pairs":
        columns.update(chosen=messages, rejected=messages)
    else:
        columns.update(completion=messages, label=Value("bool"))
    if metadata:
        for name in METADATA_COLUMNS[kind]:
            columns[name] = Value("string") if name == "prompt_key" else Value("int64")
    return Features(columns)


def to_dataset(
    rows: Sequence[dict[str, Any]], *, kind: Kind = "pairs", metadata: bool = True, decode_images: bool = True
) -> datasets.Dataset:
    """The rows as a `datasets.Dataset` with trl's columns; images decode from their paths on access."""
    import datasets  # heavy: only those who ask for a Dataset pay for it

    features = _features(kind, metadata=metadata, decode_images=decode_images)
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


@dataclass(frozen=True)
class ExportReport:
    """What `export` wrote."""

    kind: str
    path: Path
    rows: int
    heldout: int  # rows whose prompt key falls in the held-out split
    prompts: int  # distinct prompt keys
    skipped: int  # rows left out because an image file is missing
    # rows the votes would give that consent rules leave out (feedback.store.pairs.left_out)
    left_out_consent: int = 0
    left_out_voter_share: int = 0  # rows the voter-share cap dropped

    def left_out_line(self) -> str | None:
        """Why rows were left out, naming what an operator could change; None when nothing was."""
        if not (self.left_out_consent or self.left_out_voter_share or self.skipped):
            return None
        return (
            f"left out: {self.left_out_consent} by consent (learning off in their server, DMs, opted-out or "
            f"forgotten users, quoted turns of such, /learning voter-role), {self.left_out_voter_share} by "
            f"the voter-share cap (SMOLCORD_MAX_VOTER_SHARE), {self.skipped} whose image files are missing"
        )


async def export(
    session: AsyncSession, *, settings: Settings, out: Path, kind: Kind = "pairs"
) -> ExportReport:
    """Build the current pairs (or rated answers) and write them to `out` as JSONL in trl's columns."""
    examples: Sequence[PreferencePair | RatedAnswer]
    if kind == "pairs":
        examples = await build_pairs(session, settings=settings)
    elif kind == "unpaired":
        examples = await build_rated_answers(session, settings=settings)
    else:
        raise ValueError(f"kind must be 'pairs' or 'unpaired', not {kind!r}")
    reasons = await left_out(session, settings=settings, kind=kind)
    present = [example for example in examples if all(path.is_file() for path in example.images)]
    rows = [pair_row(e) if isinstance(e, PreferencePair) else rated_row(e) for e in present]
    count = write_jsonl(rows, out)
    return ExportReport(
        kind=kind,
        path=Path(out),
        rows=count,
        heldout=sum(is_heldout(e.prompt_key, settings.heldout_fraction) for e in present),
        prompts=len({e.prompt_key for e in present}),
        skipped=len(examples) - len(present),
        left_out_consent=reasons.consent,
        left_out_voter_share=reasons.voter_share,
    )
