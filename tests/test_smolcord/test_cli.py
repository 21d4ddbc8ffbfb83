"""The command line: every subcommand of DESIGN.md is there; unbuilt ones say so and fail."""

import subprocess
import sys

import pytest

from smolcord.cli import build_parser, main

DESIGN_COMMANDS = {"run", "worker", "bot", "db", "sync", "ask", "export", "train", "adapters", "tiny-model"}


def test_every_design_command_exists():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == DESIGN_COMMANDS


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "smolcord", "--help"], capture_output=True, text=True, check=True
    )
    for command in DESIGN_COMMANDS:
        assert command in out.stdout


def test_bad_settings_exit_with_a_message(monkeypatch, capsys):
    monkeypatch.setenv("SMOLCORD_TRAIN_AT", "noon")
    assert main(["adapters", "list"]) == 2
    assert "train_at" in capsys.readouterr().err


def test_adapters_list_on_empty_data_dir(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SMOLCORD_DATA_DIR", str(tmp_path))
    assert main(["adapters"]) == 0
    assert "base model" in capsys.readouterr().out


def test_a_command_not_built_yet_says_so(capsys):
    from smolcord.cli import _not_built

    with pytest.raises(SystemExit) as info:
        _not_built("frobnicate", 99)(None, None)  # type: ignore[arg-type]
    assert info.value.code != 0
    assert "not built yet" in capsys.readouterr().err
