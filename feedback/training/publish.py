"""The candidate's way out of a training run: staged, gated, committed, promoted, recorded, announced."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feedback.training.config import GateArguments, TrainArguments
    from feedback.training.data import TrainingData
    from feedback.training.gate import GateScores, GateVerdict
    from feedback.training.store import JobStore
    from smolcord.registry import AdapterRegistry
    from smolcord.settings import Settings

__all__ = ["Outcome", "candidate_metrics", "earlier_tests", "publish_candidate", "tell_worker"]


@dataclass
class Outcome:
    """What became of a candidate: its version, whether it is served now, its metrics and report."""

    version: str
    promoted: bool
    message: str
    metrics: dict[str, Any]
    report: Path
    canary: bool = False  # passed the gate and serves a share of users first (SMOLCORD_CANARY)


def publish_candidate(
    settings: Settings,
    registry: AdapterRegistry,
    store: JobStore,
    *,
    save: Callable[[Path], Any],
    processor: Any,
    data: TrainingData,
    method: str,
    hp: TrainArguments,
    gate: GateArguments,
    force: bool = False,
    history: Sequence[dict[str, Any]] = (),
    trained: dict[str, Any] | None = None,
    run_id: int | None = None,
    release: Callable[[], None] | None = None,
) -> Outcome:
    """Stage the adapter `save` writes, gate it against current, commit it, promote it if it passed.

    Killed anywhere before the commit, the staged folder is removed by the registry's next writer;
    after it, the version exists but `current` only moves in `promote`, checked against what the
    gate compared with.
    """
    from feedback.training.data import with_images
    from feedback.training.gate import decide, score_versions
    from feedback.training.report import write_report
    from smolcord.registry import RegistryConflict

    current = registry.current()
    with registry.new_version() as staged:
        save(staged.path)
        if release is not None:
            release()  # the training model leaves memory before the serving copy arrives
        heldout_rows = [with_images(e.row) for e in data.heldout]
        scores = score_versions(
            model_id=settings.model, device=settings.device, dtype=settings.dtype, processor=processor,
            heldout_rows=heldout_rows, probe_rows=heldout_rows[: gate.probes], candidate_dir=staged.path,
            current_dir=registry.path(current) if current else None, current_version=current, beta=hp.beta,
            batch_size=gate.eval_batch_size, probe_max_new_tokens=gate.probe_max_new_tokens,
            tie_tolerance=gate.tie_tolerance,
        )  # fmt: skip
        verdict = decide(
            scores, min_heldout=settings.gate_min_heldout, margin=settings.gate_margin,
            confidence=settings.gate_confidence, force=force, earlier_tests=earlier_tests(store, current),
        )  # fmt: skip
        staged.metrics.update(
            candidate_metrics(settings, method, data, hp, scores, verdict, history, trained or {}, run_id)
        )
        staged.metrics["status"] = "accepted" if verdict.promote else "rejected"
        report = write_report(
            staged.path / "report.png", title=f"{settings.model} · {method} · {len(data.train)} examples",
            history=history, heldout=_heldout_for_report(scores), verdict="; ".join(verdict.reasons),
        )  # fmt: skip
    version = str(staged.version)
    metrics = dict(staged.metrics)
    promoted = verdict.promote
    canary = promoted and settings.canary and not force
    message = f"{version}: " + "; ".join(verdict.reasons)
    if promoted:
        try:
            if canary:
                # Passing the offline gate earns a canary, not everyone: live votes decide (bot.rollout).
                registry.start_canary(version, expected_current=current)
                metrics = registry.mark(version, status="canary")
                promoted = False
                message += f"; in canary for {settings.canary_share:.0%} of users until live votes decide"
            else:
                registry.promote(version, expected_current=current)
                metrics = registry.mark(version, status="promoted")
        except RegistryConflict as exc:
            metrics = registry.mark(version, status="rejected", reason=str(exc))
            promoted, canary, message = False, False, f"{version}: {exc}"
    if canary:
        store.record_canary(version=version, run_id=run_id, metrics=metrics, current=current)
    else:
        store.record_adapter(version=version, run_id=run_id, metrics=metrics, promoted=promoted)
    return Outcome(version, promoted, message, metrics, registry.path(version) / report.name, canary)


def earlier_tests(store: JobStore, current: str | None) -> int:
    """How many candidates the gate's sign test already compared with `current` (None: the base).

    Read from the store's adapter history, which outlives the registry's pruning, so the count (and
    with it how strict the next test is: `gate.sign_test_level`) never goes back down while `current` is
    served; every recorded test counts, forced ones and those from before a rollback included."""
    return sum(
        1
        for record in store.list_adapters()
        if record.metrics
        and (record.metrics.get("gate") or {}).get("p_value") is not None
        and (record.metrics.get("current") or {}).get("version") == current
    )


def candidate_metrics(
    settings: Settings,
    method: str,
    data: TrainingData,
    hp: TrainArguments,
    scores: GateScores,
    verdict: GateVerdict,
    history: Sequence[dict[str, Any]],
    trained: dict[str, Any],
    run_id: int | None,
) -> dict[str, Any]:
    """metrics.json of a candidate: the gate's numbers and verdict, the data's counts, the curves."""
    from feedback.training.gate import finite_or_none

    return {
        "method": method,
        "base_model": settings.model,
        "run_id": run_id,
        "heldout_pairs": scores.candidate.pairs,
        "heldout_accuracy": finite_or_none(scores.candidate.accuracy),
        "heldout_margin": finite_or_none(scores.candidate.mean_margin),
        "current": {
            "version": scores.current_version,
            "heldout_accuracy": finite_or_none(scores.current.accuracy),
            "heldout_margin": finite_or_none(scores.current.mean_margin),
        },
        "probes": {"candidate": asdict(scores.candidate_probes), "current": asdict(scores.current_probes)},
        "gate": {
            **verdict.as_dict(),
            "error": scores.error,
            "min_heldout": settings.gate_min_heldout,
            "margin": settings.gate_margin,
            "confidence": settings.gate_confidence,
        },
        "data": data.summary(),
        "train": trained,
        "hyperparameters": asdict(hp),
        "history": list(history),
    }


def tell_worker(settings: Settings, version: str | None, *, slot: str = "current") -> str:
    """POST /v1/adapters/load; a worker that is down picks `current` up when it starts, so that is fine."""
    import asyncio

    import aiohttp

    from smolcord.worker_client import WorkerClient, WorkerDown, WorkerError

    async def call() -> str:
        token = settings.worker_token.get_secret_value() if settings.worker_token else None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            await WorkerClient(session, settings.worker_url, token=token).load_adapter(version, slot=slot)
        if slot == "candidate":
            return f"the worker serves {version} beside current now"
        return f"the worker serves {version or 'the base model'} now"

    try:
        return asyncio.run(call())
    except WorkerDown:
        return f"the worker is not running: it serves {version or 'the base model'} when it starts"
    except WorkerError as exc:
        return f"the worker did not load {version or 'the base model'} ({exc}); it will when it restarts"


def _heldout_for_report(scores: GateScores) -> dict[str, dict[str, Any]]:
    base = {"accuracy": 0.5, "mean_margin": 0.0, "pairs": scores.candidate.pairs}
    current = {"accuracy": scores.current.accuracy, "mean_margin": scores.current.mean_margin}
    candidate = {"accuracy": scores.candidate.accuracy, "mean_margin": scores.candidate.mean_margin}
    if scores.current_version is None:
        return {"base": base, "candidate": candidate}
    return {"base": base, scores.current_version: current, "candidate": candidate}
