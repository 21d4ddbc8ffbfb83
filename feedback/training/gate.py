"""The promotion gate: held-out preference accuracy and probe answers, scored in the form the worker serves.

A candidate adapter is compared with the one served now (`current`, or the base model) on the
permanent held-out split, never on pairs it trained on. Both are scored the way the worker would
run them: the base loaded in the worker's device and dtype (bf16 on CUDA) with the adapter merged
into its weights by `model.adapters.MergedAdapters`, the worker's own code.

- Implicit reward of an answer y to prompt x: beta * (log pi(y|x) - log pi_base(y|x)), DPO's
  reward with the base as reference. Preference accuracy is the share of held-out pairs whose
  chosen answer gets the higher reward, ties counted as half; the margin is the mean reward gap.
  The base against itself scores 0.5 with margin 0: all ties.
- The decision is a one-sided sign test, not a bare point estimate: on each held-out pair the
  candidate is better than current (it ranks the pair right and current does not, or current
  ties), worse, or the same. With W pairs better and L worse, p = P(X >= W) for X ~ Binomial(W + L,
  1/2): how likely a candidate no better than current would look this good. The candidate is
  promoted only when p is at most the test's level AND its accuracy beats current's by
  SMOLCORD_GATE_MARGIN.
- The level is spent over the nights, not granted afresh each night: the nightly job tests a new
  candidate against the same current version night after night, and a 5% test repeated six times
  lets coin-flip votes through up to about a fifth of the time. The k-th candidate tested against one
  version must reach p <= alpha / (k (k + 1)), alpha = 1 - SMOLCORD_GATE_CONFIDENCE (0.025, 0.0083,
  0.0042, ... at the default 0.95). These levels sum to alpha, so votes that carry no preference
  replace a served version with probability at most alpha over all the nights it serves (a union
  bound: `sign_test_level`). A promotion starts the count again for the new version.
- Probes: greedy answers to a few held-out questions. A candidate whose answers are empty or
  degenerate (looping) more often than current's is refused, however well it ranks the pairs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "GateScores",
    "GateVerdict",
    "HeldoutScore",
    "ProbeScore",
    "decide",
    "is_degenerate",
    "preference_score",
    "score_versions",
    "sign_test",
    "sign_test_level",
]

log = logging.getLogger(__name__)

# A greedy answer this long whose 3-grams are more than half repeats is a loop, not an answer.
DEGENERATE_MIN_TOKENS = 8
DEGENERATE_REPEAT_SHARE = 0.5


@dataclass
class HeldoutScore:
    """Preference accuracy (ties half) and mean reward margin of one model on the held-out pairs."""

    pairs: int
    accuracy: float | None  # None without pairs
    mean_margin: float | None
    margins: list[float] = field(default_factory=list, repr=False)
    outcomes: list[float] = field(default_factory=list, repr=False)  # per pair: 1 right, 0.5 tie, 0 wrong


@dataclass
class ProbeScore:
    """How one model answered the probe questions: counts and lengths only (no texts kept)."""

    probes: int
    empty: int
    degenerate: int  # includes the empty ones
    mean_tokens: float


@dataclass
class GateScores:
    """Everything the gate measured for a candidate and the version it would replace."""

    candidate: HeldoutScore
    current: HeldoutScore
    candidate_probes: ProbeScore
    current_probes: ProbeScore
    current_version: str | None
    error: str | None = None  # the candidate could not be served (corrupt, unmergeable, non-finite)


@dataclass
class GateVerdict:
    """Whether to promote, and why (or why not), in words an admin can act on."""

    promote: bool
    reasons: list[str]
    forced: bool = False
    better: int | None = None  # held-out pairs the candidate ranks better than current
    worse: int | None = None  # ... and worse
    p_value: float | None = None  # one-sided sign test of better against worse
    test_number: int = 1  # the k-th candidate tested against this current version
    level: float | None = None  # the p-value this test needed: alpha / (k (k + 1))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def preference_score(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    base_chosen_logps: torch.Tensor,
    base_rejected_logps: torch.Tensor,
    *,
    beta: float,
    tie_tolerance: float = 1e-6,
) -> HeldoutScore:
    """Accuracy (ties half) and mean margin of the implicit reward beta * log(pi / pi_base) over pairs."""
    chosen_rewards = beta * (chosen_logps.double() - base_chosen_logps.double())
    rejected_rewards = beta * (rejected_logps.double() - base_rejected_logps.double())
    margins = chosen_rewards - rejected_rewards
    pairs = int(margins.numel())
    if pairs == 0:
        return HeldoutScore(pairs=0, accuracy=None, mean_margin=None)
    if not bool(torch.isfinite(margins).all()):
        raise ValueError("non-finite log-probabilities on the held-out pairs")
    wins = (margins > tie_tolerance).double()
    ties = (margins.abs() <= tie_tolerance).double()
    outcomes = wins + 0.5 * ties
    accuracy = float(outcomes.mean())
    return HeldoutScore(
        pairs, accuracy, float(margins.mean()), [float(m) for m in margins], [float(o) for o in outcomes]
    )


def sign_test(candidate: Sequence[float], current: Sequence[float]) -> tuple[int, int, float]:
    """(better, worse, p): pairs where the candidate's outcome beats current's and the reverse, and the
    one-sided p-value P(X >= better), X ~ Binomial(better + worse, 1/2); pairs with equal outcomes
    carry no information about which is better and are left out (the sign test's rule)."""
    if len(candidate) != len(current):
        raise ValueError(f"{len(candidate)} candidate outcomes against {len(current)} of current")
    better = sum(c > k for c, k in zip(candidate, current, strict=True))
    worse = sum(c < k for c, k in zip(candidate, current, strict=True))
    n = better + worse
    p = sum(math.comb(n, i) for i in range(better, n + 1)) / 2**n if n else 1.0
    return better, worse, p


def is_degenerate(token_ids: Sequence[int], text: str) -> bool:
    """Empty, or a loop: at least DEGENERATE_MIN_TOKENS tokens whose 3-grams are mostly repeats."""
    if not text.strip():
        return True
    if len(token_ids) < DEGENERATE_MIN_TOKENS:
        return False
    grams = [tuple(token_ids[i : i + 3]) for i in range(len(token_ids) - 2)]
    return 1 - len(set(grams)) / len(grams) > DEGENERATE_REPEAT_SHARE


def sign_test_level(confidence: float, test_number: int) -> float:
    """The p-value the `test_number`-th candidate tested against one current version must reach:
    alpha / (k (k + 1)) with alpha = 1 - confidence. Summed over k = 1, 2, ... it is alpha.
    Confidence 0 asks for no confidence at all: every p-value passes (level 1), night after night."""
    if test_number < 1:
        raise ValueError(f"test_number counts from 1, not {test_number}")
    if confidence <= 0.0:
        return 1.0
    return (1.0 - confidence) / (test_number * (test_number + 1))


def decide(
    scores: GateScores,
    *,
    min_heldout: int,
    margin: float,
    confidence: float = 0.95,
    force: bool = False,
    earlier_tests: int = 0,
) -> GateVerdict:
    """Promote only with enough held-out pairs, an accuracy gain of at least `margin` that a one-sided
    sign test finds significant at this test's level (`confidence` spread over every candidate tested
    against the same current version; `earlier_tests` of them came before), and probes no worse than
    current's."""
    if scores.error:  # integrity, not judgement: --force does not override it
        return GateVerdict(False, [f"candidate refused: {scores.error}"], forced=False)
    reasons = []
    candidate, current = scores.candidate, scores.current
    against = scores.current_version or "the base model"
    better = worse = None
    p_value = None
    test_number = earlier_tests + 1
    level = sign_test_level(confidence, test_number)
    if candidate.pairs < min_heldout:
        reasons.append(
            f"only {candidate.pairs} held-out pairs; the gate needs at least {min_heldout} "
            "(SMOLCORD_GATE_MIN_HELDOUT)"
        )
    elif candidate.accuracy is None or current.accuracy is None:
        reasons.append("no held-out accuracy to compare")
    else:
        better, worse, p_value = sign_test(candidate.outcomes, current.outcomes)
        evidence = (
            f"better on {better} held-out pairs, worse on {worse}: one-sided sign test p = {p_value:.3g}"
        )
        if candidate.accuracy < current.accuracy + margin - 1e-12:
            reasons.append(
                f"held-out accuracy {candidate.accuracy:.3f} is not above {against}'s "
                f"{current.accuracy:.3f} by {margin:g} (SMOLCORD_GATE_MARGIN)"
            )
        elif p_value > level + 1e-12:
            reasons.append(
                f"held-out accuracy {candidate.accuracy:.3f} against {against}'s {current.accuracy:.3f} "
                f"could be chance ({evidence}, needs <= {level:.2g}: candidate {test_number} tested "
                f"against {against}, {confidence:.0%} confidence spread over them, SMOLCORD_GATE_CONFIDENCE)"
            )
    if scores.candidate_probes.degenerate > scores.current_probes.degenerate:
        reasons.append(
            f"{scores.candidate_probes.degenerate} of {scores.candidate_probes.probes} probe answers are "
            f"empty or degenerate, against {scores.current_probes.degenerate} for {against}"
        )
    if not reasons:
        assert candidate.accuracy is not None and current.accuracy is not None
        return GateVerdict(
            True,
            [
                f"held-out accuracy {candidate.accuracy:.3f} beats {against}'s {current.accuracy:.3f} "
                f"(better on {better} pairs, worse on {worse}: one-sided sign test p = {p_value:.3g}, "
                f"needs <= {level:.2g} as candidate {test_number} tested against it)"
            ],
            better=better, worse=worse, p_value=p_value, test_number=test_number, level=level,
        )  # fmt: skip
    if force:
        reasons.append("promoted anyway (--force)")
    return GateVerdict(
        force, reasons, forced=force, better=better, worse=worse, p_value=p_value,
        test_number=test_number, level=level,
    )  # fmt: skip


# ------------------------------------------------------------------------------ scoring


def score_versions(
    *,
    model_id: str,
    device: str,
    dtype: str,
    processor: Any,
    heldout_rows: Sequence[dict[str, Any]],
    probe_rows: Sequence[dict[str, Any]],
    candidate_dir: Path,
    current_dir: Path | None,
    current_version: str | None,
    beta: float,
    batch_size: int = 4,
    probe_max_new_tokens: int = 32,
    tie_tolerance: float = 1e-6,
) -> GateScores:
    """Load the base as the worker does, then score the candidate and current merged into it."""
    from transformers import AutoModelForImageTextToText

    from model.devices import resolve_device, resolve_dtype

    target = resolve_device(device)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=resolve_dtype(dtype, target))
    try:
        return _score(
            model.to(target).eval(),  # type: ignore[arg-type]  # transformers' stubs of .to
            model_id=model_id, processor=processor, heldout_rows=heldout_rows,
            probe_rows=probe_rows, candidate_dir=candidate_dir, current_dir=current_dir,
            current_version=current_version, beta=beta, batch_size=batch_size,
            probe_max_new_tokens=probe_max_new_tokens, tie_tolerance=tie_tolerance,
        )  # fmt: skip
    finally:
        del model  # the serving copy leaves GPU memory before the run goes on
        if target.type == "cuda":
            torch.cuda.empty_cache()


def _score(
    model: Any,
    *,
    model_id: str,
    processor: Any,
    heldout_rows: Sequence[dict[str, Any]],
    probe_rows: Sequence[dict[str, Any]],
    candidate_dir: Path,
    current_dir: Path | None,
    current_version: str | None,
    beta: float,
    batch_size: int,
    probe_max_new_tokens: int,
    tie_tolerance: float,
) -> GateScores:
    from model.adapters import AdapterError, MergedAdapters

    adapters = MergedAdapters(model, base_model_id=model_id)
    batches = _pair_batches(processor, heldout_rows, batch_size)  # tokenized and tiled once, for every model
    probes = _probe_batches(processor, probe_rows)
    base = _sequence_logps(model, batches)

    def against_base() -> HeldoutScore:
        return preference_score(
            *_sequence_logps(model, batches), *base, beta=beta, tie_tolerance=tie_tolerance
        )

    # The candidate first: one that cannot be served is refused before anything else is spent on it.
    try:
        adapters.load(candidate_dir, version="candidate")
        candidate = against_base()
    except (AdapterError, ValueError) as exc:
        log.warning("candidate refused: %s", exc)
        missing, none = HeldoutScore(len(heldout_rows), None, None), ProbeScore(0, 0, 0, 0.0)
        return GateScores(missing, missing, none, none, current_version, error=str(exc))
    candidate_probes = _probe(model, processor, probes, probe_max_new_tokens)
    adapters.load(current_dir, version=current_version)  # None: the base, which scores all ties
    current = against_base() if current_dir is not None else preference_score(*base, *base, beta=beta)
    current_probes = _probe(model, processor, probes, probe_max_new_tokens)
    return GateScores(candidate, current, candidate_probes, current_probes, current_version)


def _pair_batches(
    processor: Any, rows: Sequence[dict[str, Any]], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Held-out pairs collated exactly as trl collates them for training (chosen rows, then rejected)."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    collator = DataCollatorForVisionPreference(processor=processor, max_length=None)
    return [collator([dict(r) for r in rows[i : i + batch_size]]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def _sequence_logps(
    model: Any, batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of every pair's chosen and of its rejected answer."""
    chosen, rejected = [torch.zeros(0)], [torch.zeros(0)]
    for batch in batches:
        logps = sequence_logps(model, batch)
        half = logps.shape[0] // 2
        chosen.append(logps[:half])
        rejected.append(logps[half:])
    return torch.cat(chosen), torch.cat(rejected)


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row: the sum of log pi(token) over the tokens its completion_mask marks."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "completion_mask"}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = inputs["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].to(device).bool()
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1).cpu()


def _probe_batches(processor: Any, rows: Sequence[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """The probe prompts, encoded once and left-padded for batched generation (with and without images)."""
    from trl.data_utils import prepare_multimodal_messages

    groups: dict[bool, tuple[list[str], list[list[Any]]]] = {True: ([], []), False: ([], [])}
    for row in rows:
        images = list(row.get("images") or [])
        messages = prepare_multimodal_messages(row["prompt"], images=images)
        texts, image_lists = groups[bool(images)]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        image_lists.append(images)
    return [
        processor(
            images=image_lists if has_images else None,
            text=texts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        for has_images, (texts, image_lists) in groups.items()
        if texts
    ]


@torch.no_grad()
def _probe(model: Any, processor: Any, batches: Sequence[Any], max_new_tokens: int) -> ProbeScore:
    """Greedy answers to the probe prompts; counts the empty and the degenerate ones."""
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    answers = 0
    empty = degenerate = total_tokens = 0
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            ids = row[: next((i for i, t in enumerate(row) if t in stops), len(row))]
            answer = tokenizer.decode(ids, skip_special_tokens=True)
            answers += 1
            total_tokens += len(ids)
            empty += not answer.strip()
            degenerate += is_degenerate(ids, answer)
    return ProbeScore(answers, empty, degenerate, total_tokens / answers if answers else 0.0)


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: metrics carry None instead."""
    return None if value is None or not math.isfinite(value) else value
