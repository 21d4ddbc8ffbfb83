"""What a training run trains and is gated on: examples from the store, split, measured, too-long ones dropped.

Lengths come from the data, never from a fixed max_length: every example is tokenized once the
way trl's vision collator will tokenize it, examples longer than the model can take are dropped
and counted, and the trainer's max_length is the longest kept one, so trl never truncates (a cut
completion would silently train on nothing).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feedback.training.store import JobStore
    from smolcord.settings import Settings

__all__ = [
    "Example",
    "TrainingData",
    "load_training_data",
    "measure",
    "split_by_length",
    "with_images",
]


@dataclass
class Example:
    """One training row in trl's conversational columns, and what the job needs to know about it."""

    row: dict[str, Any]  # images, prompt, and chosen/rejected (pairs) or completion/label (KTO)
    prompt_key: str  # the prompt's key: the held-out split is taken by it
    heldout: bool
    chosen_response_id: int | None = None
    rejected_response_id: int | None = None
    source: Any = None  # the store's PreferencePair or RatedAnswer (recorded with the run)
    tokens: int = 0  # the longest sequence it makes (prompt + its longer completion), set by measure()
    completion_tokens: int = 0  # its shortest completion's tokens, set by measure()

    @property
    def images(self) -> int:
        return len(self.row.get("images") or [])


@dataclass
class TrainingData:
    """The run's examples: trained on, held out for the gate (always pairs), dropped as too long;
    for sft+dpo also the liked answers of its supervised pass."""

    method: str
    train: list[Example]
    heldout: list[Example]
    dropped: list[Example] = field(default_factory=list)
    limit: int = 0  # the longest sequence the model may take
    missing_images: int = 0  # examples left out because an image file is gone (deleted since)
    liked: list[Example] = field(default_factory=list)  # sft+dpo: 👍 answers outside the held-out keys

    @property
    def max_length(self) -> int:
        """The longest kept sequence: trl's max_length, so its truncation never cuts anything."""
        return max((e.tokens for e in self.train + self.heldout + self.liked), default=0)

    def summary(self) -> dict[str, Any]:
        """Counts for --dry-run and the run's metrics (no texts)."""
        lengths = [e.tokens for e in self.train + self.heldout + self.liked]
        unit = "answers" if self.method == "kto" else "pairs"
        liked = {"train_liked_answers": len(self.liked)} if self.method == "sft+dpo" else {}
        return {
            "method": self.method,
            f"train_{unit}": len(self.train),
            **liked,
            "heldout_pairs": len(self.heldout),
            "dropped_too_long": len(self.dropped),
            "dropped_heldout": sum(e.heldout for e in self.dropped),
            "missing_images": self.missing_images,
            "images": sum(e.images for e in self.train + self.heldout + self.liked),
            "token_limit": self.limit,
            "tokens": {
                "min": min(lengths, default=0),
                "median": int(statistics.median(lengths)) if lengths else 0,
                "max": max(lengths, default=0),
            },
        }


def load_training_data(
    store: JobStore, settings: Settings, *, method: str, processor: Any, limit: int
) -> TrainingData:
    """The store's pairs (and, for KTO and sft+dpo, rated answers) now: split by prompt key, measured,
    filtered."""
    from feedback.store.export import METADATA_COLUMNS, pair_row, rated_row
    from feedback.store.pairs import is_heldout

    pairs, rated = store.pairs_and_rated(with_rated=method in ("kto", "sft+dpo"))
    missing = 0

    def examples(sources: Sequence[Any], kind: str) -> list[Example]:
        nonlocal missing
        found = []
        for source in sources:
            if not all(Path(p).is_file() for p in source.images):
                missing += 1
                continue
            row = pair_row(source) if kind == "pairs" else rated_row(source)
            for name in METADATA_COLUMNS[kind]:
                row.pop(name)
            if kind == "pairs":
                chosen, rejected = source.chosen_response_id, source.rejected_response_id
            else:
                chosen, rejected = (source.response_id, None) if source.label else (None, source.response_id)
            heldout = is_heldout(source.prompt_key, settings.heldout_fraction)
            found.append(Example(row, source.prompt_key, heldout, chosen, rejected, source=source))
        return found

    paired = examples(pairs, "pairs")
    heldout = [e for e in paired if e.heldout]
    # The gate compares pairs for every method; KTO trains on rated answers outside the held-out keys,
    # sft+dpo on the pairs after a supervised pass on the liked ones among them.
    unpaired = examples(rated, "unpaired") if method in ("kto", "sft+dpo") else []
    train = [e for e in (unpaired if method == "kto" else paired) if not e.heldout]
    liked = [e for e in unpaired if not e.heldout and e.row["label"]] if method == "sft+dpo" else []
    measure(train + heldout + liked, processor)
    kept_train, dropped_train = split_by_length(train, limit)
    kept_heldout, dropped_heldout = split_by_length(heldout, limit)
    kept_liked, dropped_liked = split_by_length(liked, limit)
    dropped = dropped_train + dropped_heldout + dropped_liked
    return TrainingData(method, kept_train, kept_heldout, dropped, limit, missing, kept_liked)


def with_images(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of a row whose `images` are opened PIL images instead of file paths."""
    from PIL import Image

    def opened(image: Any) -> Any:
        if not isinstance(image, str | Path):
            return image
        with Image.open(image) as handle:
            return handle.convert("RGB")

    return {**row, "images": [opened(i) for i in row.get("images") or []]}


def measure(examples: Sequence[Example], processor: Any) -> None:
    """Set each example's lengths by collating it alone, exactly as trl's vision collator will."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.kto_trainer import DataCollatorForVisionUnpairedPreference

    pairs = DataCollatorForVisionPreference(processor=processor, max_length=None)
    unpaired = DataCollatorForVisionUnpairedPreference(
        processor=processor, max_length=None, calculate_kl=False
    )
    for example in examples:
        row = with_images(example.row)
        batch = pairs([row]) if "chosen" in row else unpaired([row])
        example.tokens = int(batch["attention_mask"].sum(-1).max())
        example.completion_tokens = int(batch["completion_mask"].sum(-1).min())


def split_by_length(examples: Sequence[Example], limit: int) -> tuple[list[Example], list[Example]]:
    """(kept, dropped): dropped are longer than `limit` tokens, or have a completion of no tokens."""
    kept: list[Example] = []
    dropped: list[Example] = []
    for example in examples:
        ok = 0 < example.tokens <= limit and example.completion_tokens > 0
        (kept if ok else dropped).append(example)
    return kept, dropped
