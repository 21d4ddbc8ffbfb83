"""The bot's half of the learning loop: the nightly decision and trigger, `/smolcord retrain` with its
progress message and report, `/smolcord rollback`, and the daily purge (bot/nightly.py,
bot/training_runner.py, cogs/training.py).

Runs that only need the job's *contract* use a stand-in script that prints the same JSON lines;
one dry run goes through the real `python -m smolcord train` on the tiny model.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from bot_harness import BotWorld
from fake_discord import FakeInteraction, FakeMessage, FakeUser
from test_feedback.harness import StoreHarness, make_image

from bot.nightly import TrainingReadiness, next_nightly_run, nightly_time, should_train, training_readiness
from bot.training_runner import TRAIN_COMMAND, child_env
from feedback.store import adapters as adapters_service
from feedback.store.pairs import is_heldout
from smolcord.registry import AdapterRegistry
from smolcord.settings import Settings

INTERACTION_DEADLINE_S = 3.0
TEXT_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# A stand-in for `smolcord train --progress json`: logs how it was started, then prints the contract's
# JSON lines. argv: LOG VERDICT [--dry-run]; VERDICT "slow" waits before its verdict.
FAKE_JOB = """
import json, os, sys, time
log, verdict, *rest = sys.argv[1:]
with open(log, "a") as handle:
    handle.write(json.dumps({"args": rest, "pid": os.getpid(), "env": {k: v for k, v in os.environ.items()
                 if k.startswith("SMOLCORD_") or k == "DISCORD_TOKEN"}}) + "\\n")
print("not json: a library printed something", flush=True)
for step in (1, 2, 3):
    print(json.dumps({"step": step, "total": 3, "loss": round(0.7 - step / 10, 4)}), flush=True)
    if verdict == "slow":
        time.sleep(1)
print("a log line", file=sys.stderr, flush=True)
print(json.dumps({"verdict": "promoted", "exit_code": 0, "message": "v1: held-out accuracy 0.750 beats 0.500",
                  "version": "v1", "current": "v1", "heldout_accuracy": 0.75, "current_accuracy": 0.5,
                  "heldout_pairs": 4, "worker": "the worker serves v1 now"}), flush=True)
"""


class FakeJob:
    """Points the Training cog's runner at the stand-in script; `runs` are the logged starts."""

    def __init__(self, world: BotWorld, tmp_path: Path, verdict: str = "promoted") -> None:
        script = tmp_path / "fake_train_job.py"
        script.write_text(FAKE_JOB)
        self.log = tmp_path / f"fake_job_{verdict}.jsonl"
        world.bot.get_cog("Training").runner.command = [sys.executable, str(script), str(self.log), verdict]

    @property
    def runs(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


async def run_command(
    world: BotWorld, name: str, user: FakeUser, options: dict[str, Any] | None = None
) -> tuple[FakeInteraction, FakeMessage]:
    interaction = await world.fake.invoke_command(name, user, options, guild=world.guild)
    await interaction.wait_callback()
    answer = await interaction.wait_response(timeout=30)
    assert interaction.callback_delay is not None and interaction.callback_delay < INTERACTION_DEADLINE_S
    return interaction, answer


def store(world: BotWorld) -> StoreHarness:
    if "store" not in world.extra:
        world.extra["store"] = StoreHarness(world.sessions, world.settings)
    return world.extra["store"]


async def add_pair(world: BotWorld, number: int) -> str:
    """One prompt with a 👍 and a 👎 answer from alice (one preference pair); returns its key."""
    harness = store(world)
    prompt = await harness.prompt(
        f"what colour is picture {number}?",
        guild_id=world.guild.id,
        channel_id=int(world.channel["id"]),
        author_id=world.bob.id,
        images=[make_image(number)],
    )
    _, [liked] = await harness.answer(prompt.id, "red")
    _, [disliked] = await harness.answer(prompt.id, "blue")
    await harness.vote(liked, world.alice.id, "👍")
    await harness.vote(disliked, world.alice.id, "👎")
    return prompt.key


def png(colour: str = "red") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, "PNG")
    return buffer.getvalue()


def add_version(registry: AdapterRegistry, source: Path | None = None, report: bytes | None = None) -> str:
    """Commit a version (a copy of `source`, or a placeholder file) and make it current."""
    import shutil

    with registry.new_version() as staged:
        if source is not None:
            shutil.copytree(source, staged.path, dirs_exist_ok=True)
        else:
            (staged.path / "adapter_config.json").write_text("{}")
        if report is not None:
            (staged.path / "report.png").write_bytes(report)
    assert staged.version is not None
    registry.promote(staged.version, expected_current=registry.current())
    return staged.version


def save_lora(engine: Any, out: Path, seed: int) -> Path:
    """A LoRA on the tiny model's text layers with random, non-zero B (so it changes answers)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        copy.deepcopy(engine.model), LoraConfig(target_modules=TEXT_TARGETS, r=4, lora_alpha=8)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    model.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------ the decision


def readiness(new: int, heldout: int, *, min_new: int = 16, min_heldout: int = 16) -> TrainingReadiness:
    return TrainingReadiness(
        pairs=new + 5, new_pairs=new, heldout_pairs=heldout, min_new_pairs=min_new, min_heldout=min_heldout
    )


@pytest.mark.parametrize(
    ("new", "heldout", "go"),
    [(16, 16, True), (40, 20, True), (15, 16, False), (16, 15, False), (0, 0, False)],
)
def test_should_train_needs_both_thresholds(new: int, heldout: int, go: bool) -> None:
    decision, why = should_train(readiness(new, heldout))
    assert decision is go
    if not go:
        assert "only" in why


def test_should_train_says_what_is_missing() -> None:
    decision, why = should_train(readiness(3, 20, min_new=8, min_heldout=16))
    assert not decision
    assert "3 new pairs of the 8 needed" in why and "held-out" not in why
    assert readiness(3, 20, min_new=8).new_pairs_needed == 5
    assert readiness(3, 2, min_heldout=16).heldout_needed == 14


def test_nightly_time_is_utc_and_can_be_off() -> None:
    settings = Settings(_env_file=None, train_at="03:30")  # type: ignore[call-arg]
    assert nightly_time(settings) == dt.time(3, 30, tzinfo=dt.UTC)
    before = dt.datetime(2025, 1, 1, 2, 0, tzinfo=dt.UTC)
    after = dt.datetime(2025, 1, 1, 4, 0, tzinfo=dt.UTC)
    assert next_nightly_run(settings, before) == dt.datetime(2025, 1, 1, 3, 30, tzinfo=dt.UTC)
    assert next_nightly_run(settings, after) == dt.datetime(2025, 1, 2, 3, 30, tzinfo=dt.UTC)
    off = Settings(_env_file=None, train_at="off")  # type: ignore[call-arg]
    assert nightly_time(off) is None and next_nightly_run(off) is None


def test_the_job_gets_the_bots_settings_but_not_its_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert TRAIN_COMMAND == (sys.executable, "-m", "smolcord", "train", "--progress", "json")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        discord_token="secret",
        data_dir=tmp_path / "data",
        admin_ids="1,2",
        train_at="off",
        min_new_pairs=3,
        heldout_fraction=0.3,
        worker_token="worker-secret",
        attachment_hosts="https://a.example/,https://b.example/",
        learning_default=True,
    )
    env = child_env(settings, base={"DISCORD_TOKEN": "secret", "PATH": "/bin"})
    assert "DISCORD_TOKEN" not in env and env["PATH"] == "/bin"
    assert "secret" not in env.values()

    # What the child reads back from that environment is the bot's settings.
    for name in list(os.environ):
        if name.startswith("SMOLCORD_") or name == "DISCORD_TOKEN":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    child = Settings(_env_file=None)  # type: ignore[call-arg]
    expected = settings.model_dump(exclude={"discord_token"}) | {
        "data_dir": (tmp_path / "data").resolve(),
        "database_url": settings.db_url,
    }
    assert child.model_dump(exclude={"discord_token"}) == expected
    assert child.discord_token is None


# The real `smolcord train` entry (argument parsing, settings read by get_settings in the working
# directory) with the run itself replaced by a spy that logs what the job was given. argv: LOG
SPY_JOB = """
import json, os, sys
import feedback.training.job
from smolcord.cli import main

def spy(settings, options):
    with open(sys.argv[1], "w") as handle:
        json.dump({"token": None if settings.discord_token is None else settings.discord_token.get_secret_value(),
                   "data_dir": str(settings.data_dir), "env": dict(os.environ)}, handle)
    print(json.dumps({"verdict": "dry-run", "exit_code": 0, "message": "spied"}), flush=True)
    return 0

feedback.training.job.run = spy
sys.exit(main(["train", "--progress", "json", "--dry-run"]))
"""


async def test_the_job_never_sees_the_token_even_from_a_dotenv_in_the_working_directory(
    start_bot, tmp_path, monkeypatch
):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / ".env").write_text("DISCORD_TOKEN=token-from-dotenv\nSMOLCORD_DATA_DIR=/elsewhere\n")
    monkeypatch.chdir(workdir)  # where the operator runs `smolcord bot`, as the README says
    monkeypatch.setenv("DISCORD_TOKEN", "token-from-environment")
    async with start_bot(worker=False, discord_token="token-from-settings") as world:
        script, log = tmp_path / "spy_job.py", tmp_path / "spy.json"
        script.write_text(SPY_JOB)
        world.bot.get_cog("Training").runner.command = [sys.executable, str(script), str(log)]
        _, answer = await run_command(world, "smolcord retrain", world.fake.owner, {"dry_run": True})
        assert "Started" in answer.content
        await world.fake.wait_for(
            "message_update", lambda a: "spied" in a.data["content"], timeout=60, since=0
        )
    seen = json.loads(log.read_text())
    assert seen["token"] is None, "the training job's settings hold a Discord token"
    assert seen["data_dir"] == str(world.settings.data_dir.resolve())  # its settings are the bot's
    leaked = {name for name, value in seen["env"].items() if "token-from" in value or name == "DISCORD_TOKEN"}
    assert not leaked, leaked


# ------------------------------------------------------------------------------ nightly, through Discord


async def test_nightly_runs_the_job_only_when_enough_new_and_heldout_pairs_exist(start_bot, tmp_path):
    async with start_bot(
        min_new_pairs=3,
        gate_min_heldout=1,
        heldout_fraction=0.5,
        max_voter_share=1.0,
        learning_default=True,
        train_at="04:15",
    ) as world:
        cog = world.bot.get_cog("Training")
        assert cog.nightly.is_running() and cog.nightly.time == [dt.time(4, 15, tzinfo=dt.UTC)]
        next_run = cog.nightly.next_iteration
        assert next_run is not None and (next_run.hour, next_run.minute) == (4, 15)
        job = FakeJob(world, tmp_path)

        keys = []
        for number in range(40):
            now = await training_readiness(world.sessions, world.settings)
            if should_train(now)[0]:
                break
            assert await cog.nightly_run() is None  # below a threshold: the job never starts
            keys.append(await add_pair(world, number))
        assert job.runs == []
        assert now.new_pairs >= 3 and now.heldout_pairs >= 1
        assert now.heldout_pairs == sum(is_heldout(key, 0.5) for key in keys)

        await cog.nightly.coro(cog)  # the loop's body, as it runs at SMOLCORD_TRAIN_AT
        [run] = job.runs
        assert run["args"] == []  # not a dry run
        assert "DISCORD_TOKEN" not in run["env"]
        assert run["env"]["SMOLCORD_DATA_DIR"] == str(world.settings.data_dir.resolve())
        assert run["env"]["SMOLCORD_MIN_NEW_PAIRS"] == "3"

        _, answer = await run_command(world, "smolcord status", world.fake.owner)
        assert f"{now.new_pairs} new since the last run (nightly needs 3: 0 still needed)" in answer.content
        assert f"{now.heldout_pairs} held out (the gate needs 1: 0 still needed)" in answer.content


async def test_nightly_off(start_bot):
    async with start_bot(train_at="off", worker=False) as world:
        cog = world.bot.get_cog("Training")
        assert not cog.nightly.is_running()
        assert cog.daily_purge.is_running()


# ------------------------------------------------------------------------------ /smolcord retrain


async def test_retrain_posts_progress_then_the_verdict_and_the_report(start_bot, tmp_path):
    async with start_bot() as world:
        fake, owner = world.fake, world.fake.owner
        report = png()
        add_version(world.bot.registry, report=report)  # what the job's run "wrote"
        job = FakeJob(world, tmp_path, verdict="slow")

        interaction, answer = await run_command(world, "smolcord retrain", owner)
        assert interaction.deferred and answer.ephemeral
        assert "Started: progress and verdict in" in answer.content
        progress = await fake.wait_for(
            "message_create", lambda a: "Training run" in a.data["content"] and not a.data.get("webhook_id")
        )
        message = progress.message
        assert (
            message is not None and not message.ephemeral and message.channel_id == int(world.channel["id"])
        )
        assert str(message.id) in answer.content  # the ephemeral answer links to it

        _, busy = await run_command(world, "smolcord retrain", owner)  # one run at a time
        assert "already going" in busy.content

        await fake.wait_for(
            "message_update", lambda a: a.message is message and "promoted" in a.data["content"], timeout=30
        )
        assert any("step 1/3 · loss 0.6000" in version for version in message.history)
        assert "✅ **promoted**: v1: held-out accuracy 0.750 beats 0.500" in message.content
        assert (
            "held-out preference accuracy 0.750 against 0.500 for current over 4 held-out pairs"
            in message.content
        )
        assert "the worker serves v1 now" in message.content
        assert message.files == [("v1-report.png", report)]
        assert message.allowed_mentions == {"parse": []} and message.mentions == []
        assert len(job.runs) == 1


async def test_stopping_the_bot_stops_its_training_job(start_bot, tmp_path):
    async with start_bot(worker=False) as world:
        job = FakeJob(world, tmp_path, verdict="slow")
        await run_command(world, "smolcord retrain", world.fake.owner)
        await world.fake.wait_for("message_update", lambda a: "step 1/3" in a.data["content"], timeout=30)
        [run] = job.runs
        await world.bot.close()  # unloading the cog cancels the run, which stops the child
        with pytest.raises(ProcessLookupError):
            os.kill(run["pid"], 0)


async def test_retrain_dry_run_runs_the_real_training_job(start_bot, tmp_path):
    async with start_bot(min_new_pairs=1, max_voter_share=1.0, learning_default=True) as world:
        await add_pair(world, 1)
        _, answer = await run_command(world, "smolcord retrain", world.fake.owner, {"dry_run": True})
        assert "Started" in answer.content
        done = await world.fake.wait_for(
            "message_update", lambda a: "dry-run" in a.data["content"], timeout=240, since=0
        )
        text = done.data["content"]
        assert "🔍 **dry-run**" in text and "Dry run" in text
        assert "pairs to train on" in text and "held-out pairs" in text
        assert world.bot.registry.versions() == [], "a dry run trains nothing"


# ------------------------------------------------------------------------------ /smolcord rollback


async def test_rollback_moves_current_back_records_it_and_tells_the_worker(start_bot, tiny_engine, tmp_path):
    async with start_bot() as world:
        registry, owner = world.bot.registry, world.fake.owner
        try:
            v1 = add_version(registry, save_lora(tiny_engine, tmp_path / "lora1", seed=1))
            v2 = add_version(registry, save_lora(tiny_engine, tmp_path / "lora2", seed=2))
            await world.bot.worker.load_adapter(v2)
            assert (await world.bot.worker.health())["adapter"] == v2

            _, answer = await run_command(world, "smolcord rollback", owner)
            assert f"Rolled back from {v2} to **{v1}**" in answer.content
            assert f"The worker serves {v1} now." in answer.content
            assert registry.current() == v1
            assert (await world.bot.worker.health())["adapter"] == v1
            history = {a.version: a.status for a in await store(world).call(adapters_service.list_adapters)}
            assert history == {v1: "promoted", v2: "rolled_back"}

            _, answer = await run_command(world, "smolcord rollback", owner, {"version": v2})
            assert f"to **{v2}**" in answer.content and registry.current() == v2
            assert (await world.bot.worker.health())["adapter"] == v2

            for bad in ("v9", "../v1", v2):
                _, answer = await run_command(world, "smolcord rollback", owner, {"version": bad})
                assert "refused" in answer.content or "served already" in answer.content
            assert registry.current() == v2
        finally:
            tiny_engine.load_adapter(None, version=None)  # the engine is shared by every bot test


async def test_rollback_with_the_worker_down_says_it_will_pick_it_up(start_bot):
    async with start_bot(worker=False) as world:
        registry = world.bot.registry
        _, answer = await run_command(world, "smolcord rollback", world.fake.owner)
        assert "Nothing to roll back" in answer.content
        v1, v2 = add_version(registry), add_version(registry)
        _, answer = await run_command(world, "smolcord rollback", world.fake.owner)
        assert f"from {v2} to **{v1}**" in answer.content
        assert f"The worker is not running; it will serve {v1} when it starts." in answer.content
        assert registry.current() == v1


# ------------------------------------------------------------------------------ purge


async def test_daily_purge_deletes_what_is_past_retention(start_bot):
    from sqlalchemy import update

    from feedback.store.models import Prompt

    async with start_bot(retention_days=7, worker=False) as world:
        cog = world.bot.get_cog("Training")
        assert cog.daily_purge.is_running()
        harness = store(world)
        old = await harness.prompt("old", guild_id=world.guild.id, author_id=world.alice.id)
        new = await harness.prompt("new", guild_id=world.guild.id, author_id=world.alice.id)
        async with world.sessions() as session:
            eight_days_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=8)
            await session.execute(update(Prompt).where(Prompt.id == old.id).values(created_at=eight_days_ago))
            await session.commit()

        assert await cog.purge() == 1
        remaining = await harness.sql("SELECT id FROM prompts")
        assert [row[0] for row in remaining] == [new.id]
