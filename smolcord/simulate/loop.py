"""`smolcord simulate`: night after night of a simulated community on the real worker, store, job, gate and registry.

    smolcord simulate [--rounds 6] [--users 12] [--questions 48] [--eval-questions 64]
                      [--rule colour|shape|short|random] [--noise 0.0] [--method dpo|kto|sft+dpo]
                      [--seed 0] [--out DIR] [--model DIR]

Only Discord is replaced. A model worker process serves the base (`smolcord worker`); the store
is a SQLite file in `--out`; questions go through the bot's `Answerer`, votes through the store's
`set_reaction` and 🔁 through `Answerer.regenerate` (smolcord.simulate.community); each night the
bot's nightly decision (`bot.nightly.should_train`) decides whether to train, and the bot's
`TrainingRunner` starts the real training job as a child process, which gates, publishes through
the registry and tells the worker. Then the served version answers a fixed evaluation set (never
asked before, the same every round) greedily, and the hidden rule scores it: that 👍 share is the
round's figure.

Without `--model`, the base is built here: `smolcord tiny-model` followed by a short supervised
warm start on captions whose colour and shape are random (feedback.training.warmstart), so it
answers in the world's words at chance. With `--model` (a real SmolVLM checkpoint on a GPU box),
that checkpoint is the base as it is: the operator's dry run before `/learning on`.

stdout: JSON lines, one for round 0 (the base, with every setting the simulation overrides), one
per round, and a final one; `report.png` in `--out`; a progress line per step on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from smolcord.settings import Settings
    from smolcord.simulate.world import Scene

__all__ = ["SimulationConfig", "run", "simulation_settings"]

log = logging.getLogger(__name__)

# What a small community needs, against the defaults a real server starts with: a run trains once a
# few pairs exist, and the gate judges on a handful of held-out pairs (its sign test still decides).
SMALL_COMMUNITY = {
    "min_new_pairs": 4,
    "heldout_fraction": 0.25,
    "gate_min_heldout": 6,
    "max_tokens": 24,  # the world's answers are one short sentence
    "regen_temperature": 1.0,  # 🔁 must be able to name another colour than the greedy answer
    # First answers drawn as the alternatives are: with greedy first answers every pair would reject
    # the greedy answer (🔁 follows a 👎), and "avoid your greedy answer" is learnable even from coin
    # flips, which the gate then cannot tell from a real preference (docs/benchmarks.md).
    "answer_temperature": 1.0,
    "cooldown_s": 0.0,
    "keep_versions": 20,
    "train_at": "off",  # the simulation decides when night falls
    "learning_default": True,
}
# The hyperparameters that learned the colours from the warm start on the tiny model (docs/benchmarks.md):
# the LoRA must reach the vision tower too (the warm start learned to ignore the image), and many epochs
# over the few pairs a small community makes.
_TINY_COMMON = "--learning_rate 3e-3 --beta 0.1 --lora_r 16 --lora_targets all --per_device_train_batch_size 4 --min_train_pairs 4"
TINY_TRAIN_ARGS = {
    "dpo": f"{_TINY_COMMON} --num_train_epochs 30 --sft_weight 1.0",
    "sft+dpo": f"{_TINY_COMMON} --num_train_epochs 20",
    # KTO trains on every rated answer (about five per pair), so fewer epochs; at 3e-3 its answers lost
    # their form (measured offline: docs/benchmarks.md). No setting tried learned the colours.
    "kto": _TINY_COMMON.replace("--learning_rate 3e-3", "--learning_rate 1e-3") + " --num_train_epochs 6",
}
WORKER_START_S = 600.0


@dataclass(frozen=True)
class SimulationConfig:
    """The command line of `smolcord simulate`."""

    rounds: int = 6
    users: int = 12
    questions: int = 48
    eval_questions: int = 64
    rule: str = "colour"
    noise: float = 0.0
    method: str = "dpo"
    seed: int = 0
    out: Path = Path("simulation")
    model: Path | None = None
    regenerate: float = 0.8  # how often a user presses 🔁 on an answer they dislike
    max_regenerations: int = 3
    bystanders: int = 0  # other users who vote on each answer besides the asker
    canary: bool = False
    scenario: str = "honest"


def run(config: SimulationConfig, *, stdout: TextIO | None = None) -> int:
    """The whole simulation; returns 0, or 1 if the worker or a step failed."""
    stdout = stdout or sys.stdout
    started = time.perf_counter()
    out = config.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "data", ignore_errors=True)  # every run starts from an empty server
    model_dir = _base_model(config, out)
    settings, overrides = simulation_settings(config, out, model_dir, port=_free_port())
    from feedback.store.db import upgrade_to_head

    upgrade_to_head(settings.db_url)
    with _worker(settings, out / "worker.log"):
        rounds = asyncio.run(_simulate(config, settings, overrides, stdout))
    from smolcord.simulate.report import write_report

    report = write_report(out / "report.png", rounds, title=_title(config))
    final = _final(config, rounds, report, time.perf_counter() - started)
    _emit(stdout, final)
    return 0


def simulation_settings(
    config: SimulationConfig, out: Path, model_dir: Path, *, port: int
) -> tuple[Settings, dict[str, Any]]:
    """The settings of every part of the simulation, and those it sets over the environment's."""
    from smolcord.settings import Settings

    # What a small community needs, unless the environment says otherwise (SMOLCORD_GATE_MIN_HELDOUT=...).
    community = {k: v for k, v in SMALL_COMMUNITY.items() if f"SMOLCORD_{k.upper()}" not in os.environ}
    overrides: dict[str, Any] = {
        **community,
        "data_dir": str(out / "data"),
        "database_url": None,
        "model": str(model_dir),
        "worker_url": f"http://127.0.0.1:{port}",
        "worker_token": secrets.token_urlsafe(16),  # the worker listens on loopback, still not open
        "train_method": config.method,
        # A gated candidate is promoted at once unless --canary: then live votes decide (bot.rollout).
        "canary": config.canary,
    }
    if config.model is None and not os.environ.get("SMOLCORD_TRAIN_ARGS"):
        overrides["train_args"] = TINY_TRAIN_ARGS[config.method]
    settings = Settings(_env_file=None, **overrides)  # type: ignore[call-arg]
    shown = {k: ("(random)" if k == "worker_token" else v) for k, v in overrides.items()}
    return settings, shown


# ------------------------------------------------------------------------------ the rounds


async def _simulate(
    config: SimulationConfig, settings: Settings, overrides: dict[str, Any], stdout: TextIO
) -> list[dict[str, Any]]:
    import aiohttp

    from bot.answering import Answerer
    from bot.limits import ChannelPacer
    from bot.nightly import should_train, training_readiness
    from bot.training_runner import TrainingRunner
    from feedback.store.db import create_engine, sessionmaker
    from smolcord.registry import AdapterRegistry
    from smolcord.simulate.community import Community
    from smolcord.simulate.world import World, canary_community, community
    from smolcord.worker_client import WorkerClient

    world = World(config.seed)
    evaluation = world.evaluation_set(config.eval_questions)
    if config.canary:
        users = canary_community(config.users, seed=config.seed, scenario=config.scenario, noise=config.noise)
    else:
        users = community(
            config.users, seed=config.seed, rule=config.rule, noise=config.noise, regenerate=config.regenerate
        )
    registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    engine = create_engine(settings.db_url)
    sessions = sessionmaker(engine)
    token = settings.worker_token.get_secret_value() if settings.worker_token else None
    records: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession() as http:
            worker = WorkerClient(http, settings.worker_url, token=token)
            answerer = Answerer(settings=settings, sessions=sessions, worker=worker)
            answerer.pacer = ChannelPacer(0.0)  # no Discord edit rate limit to respect here
            people = Community(
                settings=settings, sessions=sessions, answerer=answerer, users=users,
                max_regenerations=config.max_regenerations, bystanders=config.bystanders, seed=config.seed,
            )  # fmt: skip
            await people.open_server()
            runner = TrainingRunner(settings)

            _say("round 0: scoring the base on the evaluation set")
            base = await _evaluate(worker, settings, evaluation, rule=config.rule, seed=config.seed, number=0)
            record = {"round": 0, **base, "config": _config(config), "overrides": overrides}
            records.append(record)
            _emit(stdout, record)
            for number in range(1, config.rounds + 1):
                started = time.perf_counter()
                scenes = world.scenes(config.questions, round=number)
                _say(f"round {number}: {len(scenes)} questions from {len(users)} users")
                traffic = await people.live_a_round(scenes, round=number)
                canary: dict[str, Any] = {}
                if config.canary:  # as the bot's nightly run: the canary is decided before any training
                    canary = await _decide_canary(settings, registry, sessions, worker, number)
                    answerer.router.forget()
                readiness = await training_readiness(sessions, settings)
                train, why = should_train(readiness)
                if canary.get("decision") == "waiting":
                    train, why = False, f"the canary of {canary['candidate']} is undecided"
                night = await _night(runner, settings, train, why, number)
                if canary.get("decision") == "promote":
                    night["promoted"] = True
                _say(
                    f"round {number}: scoring {night.get('served') or 'the served version'} on the evaluation set"
                )
                scores = await _evaluate(
                    worker, settings, evaluation, rule=config.rule, seed=config.seed, number=number
                )
                candidate = registry.candidate() if config.canary else None
                if candidate is not None:  # what the canary's arm is answering, on the same evaluation set
                    scored = await _evaluate(
                        worker, settings, evaluation, rule=config.rule, seed=config.seed, number=number,
                        version=candidate,
                    )  # fmt: skip
                    scores["candidate_eval"] = {"version": candidate, **scored}
                record = {
                    "round": number, **scores, **canary, **night, "traffic": traffic.as_dict(),
                    "pairs_available": readiness.pairs, "seconds": round_seconds(started),
                }  # fmt: skip
                records.append(record)
                _emit(stdout, record)
    finally:
        await engine.dispose()
    return records


async def _decide_canary(
    settings: Settings, registry: Any, sessions: Any, worker: Any, number: int
) -> dict[str, Any]:
    """The nightly canary step (bot.rollout.decide_canary), as the round's line shows it."""
    from bot.rollout import decide_canary

    outcome = await decide_canary(settings=settings, registry=registry, sessions=sessions, worker=worker)
    if outcome is None:
        return {}
    numbers = outcome.numbers
    arms = {
        arm: {k: numbers.get(arm, {}).get(k) for k in ("version", "rated", "liked", "share", "interval")}
        for arm in ("candidate", "current")
    }
    _say(f"round {number}: canary of {outcome.candidate}: {outcome.decision} ({outcome.rule})")
    return {
        "decision": outcome.decision,
        "candidate": outcome.candidate,
        "canary": {
            "rule": outcome.rule, "reason": outcome.message, "arms": arms,
            "p_not_worse": numbers.get("p_not_worse"), "p_worse": numbers.get("p_worse"),
        },
    }  # fmt: skip


async def _night(runner: Any, settings: Settings, train: bool, why: str, number: int) -> dict[str, Any]:
    """The nightly run, as the bot's schedule would start it; what it decided, in the round's line."""
    if not train:
        _say(f"round {number}: no training tonight: {why}")
        return {"trained": False, "promoted": False, "reasons": [why]}
    _say(f"round {number}: training ({why})")

    async def progress(update: Any) -> None:
        if update.step == update.total or update.step % 10 == 0:
            _say(f"round {number}: training step {update.step}/{update.total}")

    result = await runner.run(on_progress=progress)
    record = result.record
    metrics = _metrics_of(settings, result.version)
    gate = metrics.get("gate") or {}
    data = metrics.get("data") or {}
    _say(f"round {number}: {result.verdict}: {result.message}")
    return {
        "trained": True,
        "verdict": result.verdict,
        "promoted": result.verdict == "promoted",
        "candidate": result.version,
        "reasons": gate.get("reasons") or [result.message],
        "p_value": gate.get("p_value"),
        "gate_test": gate.get("test_number"),  # the k-th candidate tested against the served version
        "gate_level": gate.get("level"),  # the p-value it needed
        "pairs_used": data.get("train_pairs", data.get("train_answers")),
        "heldout_pairs": record.get("heldout_pairs"),
        "heldout_accuracy": record.get("heldout_accuracy"),
        "current_accuracy": record.get("current_accuracy"),
    }


def _metrics_of(settings: Settings, version: str | None) -> dict[str, Any]:
    if not version:
        return {}
    path = settings.adapters_dir / version / "metrics.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


async def _evaluate(
    worker: Any,
    settings: Settings,
    scenes: Sequence[Scene],
    *,
    rule: str,
    seed: int,
    number: int,
    version: str | None = None,
) -> dict[str, Any]:
    """Greedy answers of the served version to the evaluation set, scored by the rule (and by colour
    and shape, for the record). Asked straight of the worker: evaluation is not traffic, so nothing
    of it is stored."""
    from bot.conversation import Question, worker_messages
    from bot.text import base_name, served_version
    from smolcord.images import normalize_image
    from smolcord.simulate.world import colour_rule, judge, shape_rule

    gate = asyncio.Semaphore(16)

    async def answer(scene: Scene) -> tuple[str, str]:
        image = normalize_image(
            scene.png, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
            max_edge=settings.max_image_edge,
        )  # fmt: skip
        messages = await worker_messages(Question(text=scene.question, images=(image,)))
        async with gate:
            result = await worker.chat(
                messages, max_tokens=settings.max_tokens, temperature=0.0, model=await model_name()
            )
        return result.text, served_version(result.model)

    names: list[str] = []

    async def model_name() -> str | None:
        """`<base>:<version>` for a canary candidate (None: the worker's current)."""
        if version is None:
            return None
        if not names:
            names.append(base_name(str((await worker.ready()).get("id") or "")))
        return f"{names[0]}:{version}"

    answers = await asyncio.gather(*(answer(scene) for scene in scenes))
    coin = random.Random(f"{seed}/evaluation/{number}")  # the `random` rule's coins, fixed per round
    liked = [judge(rule, text, scene.truth, coin) for (text, _), scene in zip(answers, scenes, strict=True)]
    count = len(scenes) or 1
    return {
        "served": answers[0][1] if answers else None,
        "eval_up_share": round(sum(liked) / count, 4),
        "eval_colour_share": round(
            sum(colour_rule(t, s.truth) for (t, _), s in zip(answers, scenes, strict=True)) / count, 4
        ),
        "eval_shape_share": round(
            sum(shape_rule(t, s.truth) for (t, _), s in zip(answers, scenes, strict=True)) / count, 4
        ),
        "eval_distinct_answers": len({text for text, _ in answers}),
    }


def round_seconds(started: float) -> float:
    return round(time.perf_counter() - started, 1)


# ------------------------------------------------------------------------------ the parts around


def _base_model(config: SimulationConfig, out: Path) -> Path:
    """--model as it is, or the tiny model with a warm start at chance, built once in out/models/."""
    if config.model is not None:
        return config.model.resolve()
    from feedback.training.warmstart import build_warm_start
    from model.tiny import build_tiny_model

    tiny = out / "models" / "tiny"
    if not (tiny / "config.json").is_file():
        _say(f"building the tiny model in {tiny}")
        build_tiny_model(tiny)
    # One base for every seed, as an operator has one base model: the seed varies the world, the
    # users, their votes and training; runs sharing --out build the warm start once.
    if config.canary and config.scenario == "minority":
        # A server whose model already answers fairly well, and a brigade that would teach it wrong colours.
        warm = out / "models" / "warm-start-mostly-truth"
        _say(f"warm start naming the true colour most of the time in {warm} (cached once built)")
        return build_warm_start(tiny, warm, seed=0, captions="mostly-truth")
    warm = out / "models" / "warm-start-seed0"
    _say(f"warm start in {warm} (cached once built)")
    return build_warm_start(tiny, warm, seed=0)


@contextlib.contextmanager
def _worker(settings: Settings, log_file: Path) -> Iterator[None]:
    """`smolcord worker` as a child process with the simulation's settings, until the block ends."""
    from bot.training_runner import child_env
    from smolcord.supervisor import probe_worker

    port = settings.worker_url.rsplit(":", 1)[1]
    token = settings.worker_token.get_secret_value() if settings.worker_token else None
    with open(log_file, "ab") as logs:
        process = subprocess.Popen(
            [sys.executable, "-m", "smolcord", "worker", "--host", "127.0.0.1", "--port", port],
            env=child_env(settings), stdout=logs, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        _say(f"starting the worker on port {port} (log: {log_file})")
        deadline = time.monotonic() + WORKER_START_S
        while (state := probe_worker(settings.worker_url, token=token)).state != "ready":
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with {process.returncode}; see {log_file}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker was not ready in {WORKER_START_S:.0f} s ({state.detail})")
            time.sleep(0.5)
        yield
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _final(
    config: SimulationConfig, rounds: list[dict[str, Any]], report: Path, seconds: float
) -> dict[str, Any]:
    shares = [r["eval_up_share"] for r in rounds]
    promoted = [r["round"] for r in rounds if r.get("promoted")]
    reached = next((r["round"] for r in rounds if r["eval_up_share"] >= 0.8), None)
    # Every promotion should score at least what it replaced (the round before it).
    worse = [
        r["round"] for r in rounds[1:] if r.get("promoted") and r["eval_up_share"] < shares[r["round"] - 1]
    ]
    return {
        "final": True,
        "rule": config.rule,
        "method": config.method,
        "seed": config.seed,
        "start_share": shares[0],
        "final_share": shares[-1],
        "best_share": max(shares),
        "promotions": promoted,
        "promoted_worse_than_before": worse,
        "first_round_at_0.8": reached,
        "served": rounds[-1].get("served"),
        "seconds": round(seconds, 1),
        "report": str(report),
    }


def _config(config: SimulationConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def _title(config: SimulationConfig) -> str:
    return (
        f"rule {config.rule}, noise {config.noise:g}, {config.method}, {config.users} users, "
        f"{config.questions} questions a round, seed {config.seed}"
    )


def _emit(stdout: TextIO, record: dict[str, Any]) -> None:
    stdout.write(json.dumps(record, default=str) + "\n")
    stdout.flush()


def _say(message: str) -> None:
    print(f"simulate: {message}", file=sys.stderr, flush=True)
