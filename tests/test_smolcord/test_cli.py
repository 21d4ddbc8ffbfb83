"""The command line: every subcommand of DESIGN.md is there; unbuilt ones say so and fail."""

import subprocess
import sys
from pathlib import Path

import pytest

from smolcord.cli import build_parser, main

DESIGN_COMMANDS = {
    "run", "worker", "bot", "db", "sync", "ask", "export", "train", "simulate", "adapters", "tiny-model",
}  # fmt: skip


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


@pytest.fixture
def started(monkeypatch) -> list[tuple[str, int]]:
    """`smolcord worker` up to the point where it would listen: where it would, recorded instead."""
    import aiohttp.web

    import model.app

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(model.app, "init_app", lambda settings: None)
    monkeypatch.setattr(aiohttp.web, "run_app", lambda app, host, port, print: calls.append((host, port)))
    for name in ("SMOLCORD_WORKER_TOKEN", "SMOLCORD_WORKER_ALLOW_OPEN", "SMOLCORD_WORKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_worker_beyond_loopback_needs_a_token_or_allow_open(started, monkeypatch, capsys, host):
    assert main(["worker", "--host", host, "--port", "8799"]) == 2
    assert "SMOLCORD_WORKER_TOKEN" in capsys.readouterr().err and started == []
    assert main(["worker", "--host", host, "--port", "8799", "--allow-open"]) == 0
    monkeypatch.setenv("SMOLCORD_WORKER_TOKEN", "s3cret")
    assert main(["worker", "--host", host, "--port", "8799"]) == 0
    monkeypatch.delenv("SMOLCORD_WORKER_TOKEN")
    monkeypatch.setenv("SMOLCORD_WORKER_ALLOW_OPEN", "true")
    assert main(["worker", "--host", host, "--port", "8799"]) == 0
    assert started == [(host, 8799)] * 3


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_worker_on_loopback_needs_no_token(started, host):
    assert main(["worker", "--host", host, "--port", "8799"]) == 0
    assert started == [(host, 8799)]


def test_adapters_rollback_does_what_the_slash_command_does(monkeypatch, tmp_path, capsys):
    """Registry, store history and worker, through the same function as `/smolcord rollback`."""
    import asyncio
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from feedback.store import adapters as adapters_service
    from feedback.store.db import create_engine, sessionmaker
    from smolcord.registry import AdapterRegistry
    from smolcord.settings import Settings

    loaded: list[str] = []

    class Worker(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            loaded.append(body["version"])
            reply = json.dumps({"version": body["version"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Worker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("SMOLCORD_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("SMOLCORD_WORKER_URL", f"http://127.0.0.1:{server.server_address[1]}")
        settings = Settings()
        registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
        for _ in range(2):
            with registry.new_version() as staged:
                (staged.path / "adapter_config.json").write_text("{}")
            registry.promote(staged.version, expected_current=registry.current())
        assert registry.current() == "v2"

        assert main(["adapters", "rollback"]) == 0
        assert "Rolled back from v2 to v1. The worker serves v1 now." in capsys.readouterr().out
        assert registry.current() == "v1" and loaded == ["v1"]

        async def history() -> dict[str, str]:
            engine = create_engine(settings.db_url)
            try:
                async with sessionmaker(engine)() as session:
                    return {a.version: a.status for a in await adapters_service.list_adapters(session)}
            finally:
                await engine.dispose()

        assert asyncio.run(history()) == {"v1": "promoted", "v2": "rolled_back"}

        assert main(["adapters", "rollback", "v1"]) == 1
        assert "v1 is served already" in capsys.readouterr().err
        assert loaded == ["v1"]
    finally:
        server.shutdown()


def test_simulate_refuses_a_canary_too_small_to_split_and_a_scenario_without_one(capsys) -> None:
    assert main(["simulate", "--canary", "--users", "20"]) == 2
    assert "--users 50 or more" in capsys.readouterr().err
    assert main(["simulate", "--scenario", "minority"]) == 2
    assert "add --canary" in capsys.readouterr().err
