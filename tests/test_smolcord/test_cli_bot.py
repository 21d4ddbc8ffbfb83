"""`smolcord bot` and `smolcord sync`: the token, the migration before the event loop, the command sync."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_discord import FakeDiscord

from smolcord.cli import main
from smolcord.settings import DISCORD_TOKEN_HELP


def _env_without_token(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "SMOLCORD_DISCORD_TOKEN")}
    env["SMOLCORD_DATA_DIR"] = str(data_dir)
    return env


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DISCORD_TOKEN in the environment and no .env in the working directory."""
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    monkeypatch.delenv("SMOLCORD_DISCORD_TOKEN", raising=False)
    monkeypatch.setenv("SMOLCORD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "data"


@pytest.mark.parametrize("command", ["bot", "sync"])
def test_without_a_token_it_says_how_to_get_one(command: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "smolcord", command],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no .env here
        env=_env_without_token(tmp_path / "data"),
        timeout=120,
    )
    assert out.returncode != 0
    assert DISCORD_TOKEN_HELP in out.stderr
    assert not (tmp_path / "data" / "smolcord.db").exists(), "nothing is migrated without a token"


@pytest.mark.parametrize("command", ["bot", "sync", "run"])
def test_without_a_token_the_shell_says_so_without_loading_the_bot(command: str, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from smolcord.cli import main\n"
        f"code = main([{command!r}])\n"
        "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('bot', 'discord')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no .env here
        env=_env_without_token(tmp_path / "data"),
        timeout=120,
    )
    assert out.stdout.split() == ["2", "[]"], out.stderr
    assert DISCORD_TOKEN_HELP in out.stderr


def test_bot_migrates_before_the_event_loop_starts(no_token: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.main
    import feedback.store.db

    calls: list[str] = []

    def upgrade(url: str) -> str:
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()  # Alembic runs a loop of its own: none may be running yet
        assert url.endswith(str(no_token / "smolcord.db"))
        calls.append("upgrade")
        return "head"

    async def run_bot(settings: object) -> None:
        calls.append("run_bot")

    monkeypatch.setenv("DISCORD_TOKEN", "a-token")
    monkeypatch.setattr(feedback.store.db, "upgrade_to_head", upgrade)
    monkeypatch.setattr(bot.main, "run_bot", run_bot)
    assert main(["bot"]) == 0
    assert calls == ["upgrade", "run_bot"]


async def test_sync_registers_the_commands_from_the_shell(
    no_token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeDiscord() as fake:
        guild = fake.add_guild("dev")
        monkeypatch.setenv("DISCORD_TOKEN", fake.token)
        monkeypatch.delenv("SMOLCORD_DEV_GUILD_ID", raising=False)
        # main() runs its own event loop, so it runs in a thread while the fake serves from this one.
        assert await asyncio.to_thread(main, ["sync", "--guild", str(guild.id)]) == 0
        names = {command["name"] for command in fake.commands[guild.id]}
        assert {"privacy", "learning", "smolcord"} <= names
        assert not fake.commands.get(None), "--guild syncs that guild only"
        assert not fake.actions_of("identify"), "a sync logs in over REST only, no gateway"

        assert await asyncio.to_thread(main, ["sync"]) == 0  # no guild and no dev guild: global
        assert {command["name"] for command in fake.commands[None]} == names

        monkeypatch.setenv("DISCORD_TOKEN", "not-the-token")
        assert await asyncio.to_thread(main, ["sync"]) == 1
