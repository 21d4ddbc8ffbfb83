"""`smolcord simulate` end to end: a worker process, the store, the bot's Answerer, nightly runs of the real job."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pytest

from smolcord.cli import main
from smolcord.simulate.loop import SMALL_COMMUNITY, TINY_TRAIN_ARGS, SimulationConfig, run


@pytest.mark.slow
@pytest.mark.timeout(900)  # builds the session's warm start (about a minute alone, more on a loaded machine)
def test_a_random_community_trains_but_the_gate_ships_no_noise(
    warm_start_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short training runs: what is checked here is the loop, not how well it learns (docs/benchmarks.md).
    monkeypatch.setenv("SMOLCORD_TRAIN_ARGS", "--max_steps 2 --min_train_pairs 2")
    monkeypatch.setenv("SMOLCORD_DEVICE", "cpu")
    monkeypatch.setenv("SMOLCORD_GATE_MIN_HELDOUT", "1")  # the environment wins over the simulation's own
    monkeypatch.setenv("SMOLCORD_MIN_NEW_PAIRS", "1")
    out = tmp_path / "sim"
    config = SimulationConfig(
        rounds=2,
        users=6,
        questions=16,
        eval_questions=8,
        rule="random",
        seed=4,
        out=out,
        model=warm_start_dir,
        bystanders=2,  # two others vote on every answer too
    )
    stdout = io.StringIO()
    assert run(config, stdout=stdout) == 0
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    first, rounds, final = lines[0], lines[1:-1], lines[-1]

    # Round 0 scores the base before any vote and names every setting the simulation overrides.
    assert first["round"] == 0 and first["served"] == "base" and first["config"]["rule"] == "random"
    from_env = {"gate_min_heldout", "min_new_pairs"}  # set above: the simulation keeps the environment's
    assert set(SMALL_COMMUNITY) - from_env <= set(first["overrides"])
    assert not from_env & set(first["overrides"]) and first["overrides"]["worker_token"] == "(random)"
    assert "train_args" not in first["overrides"]  # set in the environment: the simulation keeps it
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        traffic = record["traffic"]
        assert traffic["questions"] == 16 and traffic["failed"] == 0
        assert traffic["answers"] == 16 + traffic["regenerations"]
        assert traffic["votes_up"] + traffic["votes_down"] == traffic["answers"]  # the askers' votes
        assert traffic["bystander_votes"] == 2 * traffic["answers"]
        assert 0.0 <= record["eval_up_share"] <= 1.0
    # Coin-flip votes make pairs, the nightly run trains on them, and the gate promotes nothing.
    trained = [r for r in rounds if r["trained"]]
    # (with bystanders' votes summed a night may have too few pairs to train: "skipped", no candidate)
    assert all(r["verdict"] in ("rejected", "skipped") and not r["promoted"] for r in trained), trained
    assert any(r["verdict"] == "rejected" for r in trained), trained  # a candidate was trained and refused
    assert all(r["served"] == "base" for r in rounds)
    assert final["final"] is True and final["promotions"] == [] and final["served"] == "base"
    assert Path(final["report"]).is_file() and Path(final["report"]).stat().st_size > 10_000

    # Everything went through the real store: prompts, first answers and 🔁 alternatives, votes, runs.
    with sqlite3.connect(out / "data" / "smolcord.db") as db:
        prompts = db.execute("SELECT count(*), sum(trainable) FROM prompts").fetchone()
        regenerated = db.execute("SELECT count(*) FROM responses WHERE regenerated").fetchone()[0]
        votes = db.execute("SELECT count(*) FROM reactions").fetchone()[0]
        runs = db.execute("SELECT status, adapter_version FROM training_runs").fetchall()
    assert prompts == (32, 32)
    assert regenerated == sum(r["traffic"]["regenerations"] for r in rounds)
    assert votes == 3 * sum(r["traffic"]["answers"] for r in rounds)  # asker and two bystanders each
    assert len(runs) == len(trained)
    assert all(
        (status, version is None) in (("succeeded", False), ("skipped", True)) for status, version in runs
    )
    rejected = [version for _, version in runs if version]
    assert all((out / "data" / "adapters" / version / "metrics.json").is_file() for version in rejected)
    assert not (out / "data" / "adapters" / "current").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_colour_community_is_answered_better_after_two_nights(
    warm_start_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promise itself, on the real parts: votes by the colour rule, a nightly run that trains and
    passes the gate, and the served version's 👍 share on the fixed evaluation set rises."""
    monkeypatch.setenv("SMOLCORD_DEVICE", "cpu")
    monkeypatch.setenv("SMOLCORD_HELDOUT_FRACTION", "0.4")  # enough held-out pairs by the second night
    # The tiny model's flags, as the command uses them without --model (here the base is given).
    monkeypatch.setenv("SMOLCORD_TRAIN_ARGS", TINY_TRAIN_ARGS["dpo"])
    # Greedy first answers: more pairs a night from the same questions (every disliked first answer
    # starts a 🔁 chain against one fixed answer), so two nights are enough; the random-rule bias
    # of greedy first answers does not matter under the colour rule, where it points the same way.
    monkeypatch.setenv("SMOLCORD_ANSWER_TEMPERATURE", "0")
    out = tmp_path / "sim"
    config = SimulationConfig(
        rounds=2,
        users=12,
        questions=64,
        eval_questions=32,
        rule="colour",
        seed=0,
        out=out,
        model=warm_start_dir,
    )
    stdout = io.StringIO()
    assert run(config, stdout=stdout) == 0
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    first, rounds, final = lines[0], lines[1:-1], lines[-1]
    assert first["eval_up_share"] <= 0.45  # the base is at chance
    promoted = [r for r in rounds if r["promoted"]]
    assert promoted and promoted[-1]["served"] == promoted[-1]["candidate"], rounds
    assert rounds[-1]["eval_up_share"] >= first["eval_up_share"] + 0.15, [
        r["eval_up_share"] for r in lines[:-1]
    ]
    assert final["promoted_worse_than_before"] == []


def test_the_command_line_takes_the_issues_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[SimulationConfig] = []
    monkeypatch.setattr("smolcord.simulate.loop.run", lambda config: seen.append(config) or 0)
    argv = ["simulate", "--rounds", "3", "--users", "7", "--questions", "9", "--eval-questions", "5"]
    argv += [
        "--rule",
        "shape",
        "--noise",
        "0.2",
        "--method",
        "sft+dpo",
        "--seed",
        "4",
        "--out",
        str(tmp_path),
        "--bystanders",
        "2",
    ]
    assert main(argv) == 0
    assert seen == [
        SimulationConfig(
            rounds=3,
            users=7,
            questions=9,
            eval_questions=5,
            rule="shape",
            noise=0.2,
            method="sft+dpo",
            seed=4,
            out=tmp_path,
            model=None,
            bystanders=2,
        )
    ]
    assert main([*argv[:-1], "7"]) == 2 and len(seen) == 1  # only 6 others: refused, nothing run
