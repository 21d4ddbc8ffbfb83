"""`smolcord run`: the token check, readiness, stopping in order, a dying child, and the real thing end to end.

The supervisor's logic runs against stand-in children (small scripts) so it is fast; one slow test
runs the real `smolcord run` (worker on the tiny model, bot against FakeDiscord in this process)
and stops it with SIGINT.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_discord import FakeDiscord
from PIL import Image

from bot.main import API_BASE_ENV, GATEWAY_ENV
from feedback.store.votes import REGENERATE
from smolcord.settings import DISCORD_TOKEN_HELP
from smolcord.supervisor import Supervisor, probe_worker

pytestmark = pytest.mark.timeout(180)

# A stand-in worker: /v1/models answers 503 twice (warming up), then lists a model. argv: PORT LOG
STAND_IN_WORKER = """
import json, signal, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
port, log = int(sys.argv[1]), sys.argv[2]
asked = [0]
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        asked[0] += 1
        if asked[0] <= 2:
            self.send_response(503); self.end_headers(); return
        body = json.dumps({"data": [{"id": "stand-in", "max_model_len": 1024}]}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
def stop(*_):
    open(log, "a").write("worker stopping\\n"); sys.exit(0)
signal.signal(signal.SIGTERM, stop)
time.sleep(0.5)  # not listening at first
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

# A stand-in bot: runs until SIGTERM (taking a moment to stop), or exits by itself. argv: LOG MODE
STAND_IN_BOT = """
import signal, sys, time
log, mode = sys.argv[1], sys.argv[2]
def stop(*_):
    time.sleep(0.3)  # finishing its writes
    open(log, "a").write("bot stopped\\n"); sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(log, "a").write("bot started\\n")
if mode == "dies":
    time.sleep(0.5); sys.exit(3)
while True:
    time.sleep(0.1)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stand_ins(
    tmp_path: Path, bot_mode: str = "runs", worker: str = STAND_IN_WORKER
) -> tuple[Supervisor, Path]:
    port, log = free_port(), tmp_path / "children.log"
    (tmp_path / "worker.py").write_text(worker)
    (tmp_path / "bot.py").write_text(STAND_IN_BOT)
    supervisor = Supervisor(
        f"http://127.0.0.1:{port}",
        model="stand-in",
        worker_command=[sys.executable, str(tmp_path / "worker.py"), str(port), str(log)],
        bot_command=[sys.executable, str(tmp_path / "bot.py"), str(log), bot_mode],
        poll_s=0.05,
    )
    return supervisor, log


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ------------------------------------------------------------------------------ the supervisor, stand-ins


def test_waits_for_readiness_then_stops_the_bot_before_the_worker(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="smolcord.run")
    supervisor, log = stand_ins(tmp_path)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run()))
    thread.start()
    try:
        wait_until(lambda: log.exists() and "bot started" in log.read_text())
        assert probe_worker(supervisor.worker_url).state == "ready", (
            "the bot starts only once the worker is ready"
        )
    finally:
        supervisor.request_stop("test")
        thread.join(30)
    assert result == [0]
    assert log.read_text().splitlines() == ["bot started", "bot stopped", "worker stopping"]
    assert supervisor.bot is not None and supervisor.worker is not None
    assert gone(supervisor.bot.pid) and gone(supervisor.worker.pid)
    assert "warming up" in caplog.text and "the worker is ready" in caplog.text


async def test_the_readiness_probe_sends_the_worker_token(
    aiohttp_server, tiny_engine, tmp_path: Path
) -> None:
    from model.app import init_app
    from smolcord.settings import Settings

    settings = Settings(
        _env_file=None, data_dir=tmp_path, model=tiny_engine.name, worker_token="probe-secret"
    )  # type: ignore[call-arg]
    server = await aiohttp_server(await init_app(settings, engine=tiny_engine))
    url = str(server.make_url(""))
    without = await asyncio.to_thread(probe_worker, url)
    assert without.state == "error" and "401" in without.detail
    assert (await asyncio.to_thread(probe_worker, url, token="wrong")).state == "error"
    ready = await asyncio.to_thread(probe_worker, url, token="probe-secret")
    assert ready.state == "ready" and ready.detail == tiny_engine.name


def test_a_dying_bot_takes_the_worker_down(tmp_path: Path, caplog) -> None:
    supervisor, log = stand_ins(tmp_path, bot_mode="dies")
    assert supervisor.run() == 1
    assert "the bot (pid" in caplog.text and "exited with code 3; stopping the worker too" in caplog.text
    assert log.read_text().splitlines() == ["bot started", "worker stopping"]
    assert supervisor.worker is not None and gone(supervisor.worker.pid)


def test_a_worker_that_dies_while_loading_is_reported_and_no_bot_starts(tmp_path: Path, caplog) -> None:
    supervisor, log = stand_ins(tmp_path, worker="import sys, time; time.sleep(0.3); sys.exit(7)")
    assert supervisor.run() == 1
    assert "the worker exited with code 7 before it was ready" in caplog.text
    assert "SMOLCORD_MODEL" in caplog.text
    assert supervisor.bot is None and not log.exists()


def test_refuses_to_start_when_something_already_listens(tmp_path: Path, caplog) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
        supervisor = Supervisor(f"http://127.0.0.1:{port}", worker_command=["false"], bot_command=["false"])
        assert supervisor.run() == 1
    assert "something already listens" in caplog.text and supervisor.worker is None


def test_run_without_a_token_says_how_to_get_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISCORD_TOKEN", "SMOLCORD_DISCORD_TOKEN")}
    env["SMOLCORD_DATA_DIR"] = str(tmp_path / "data")
    out = subprocess.run(
        [sys.executable, "-m", "smolcord", "run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no .env here
        env=env,
        timeout=120,
    )
    assert out.returncode != 0
    assert DISCORD_TOKEN_HELP in out.stderr
    assert not (tmp_path / "data" / "smolcord.db").exists(), "nothing is migrated without a token"


# ------------------------------------------------------------------------------ the real thing


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, "PNG")
    return buffer.getvalue()


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
async def test_smolcord_run_answers_through_the_real_worker_and_stops_on_ctrl_c(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        guild = fake.add_guild("test-server")
        fake.add_member(guild, alice)
        channel = guild.channel()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMOLCORD_")}
        env |= {
            "DISCORD_TOKEN": fake.token,
            "SMOLCORD_MODEL": str(tiny_model_dir),
            "SMOLCORD_DEVICE": "cpu",
            "SMOLCORD_WORKER_URL": f"http://127.0.0.1:{free_port()}",
            "SMOLCORD_DATA_DIR": str(tmp_path / "data"),
            "SMOLCORD_ATTACHMENT_HOSTS": fake.cdn_base,
            "SMOLCORD_DEV_GUILD_ID": str(guild.id),
            "SMOLCORD_COOLDOWN_S": "0",
            "SMOLCORD_MAX_TOKENS": "8",
            # The readiness probe and the bot must both send it: the worker requires it everywhere.
            "SMOLCORD_WORKER_TOKEN": "run-secret",
            API_BASE_ENV: fake.api_base,
            GATEWAY_ENV: fake.gateway_url,
        }
        log_path = tmp_path / "run.log"
        with log_path.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smolcord",
                "run",
                cwd=tmp_path,
                env=env,
                stdout=log_file,
                stderr=log_file,
            )
        try:
            await fake.wait_for("identify", timeout=120)  # the worker loaded, then the bot connected
            children = children_of(process.pid)
            assert len(children) == 2, children

            question = await fake.send_message(
                channel,
                alice,
                f"{fake.bot_user.mention} what colour is this?",
                attachments=[fake.attachment("red.png", png("red"))],
            )
            done = await fake.wait_for(
                "reaction_add",
                lambda a: a.data["emoji"] == REGENERATE and a.message.reply_to == question.id,
                timeout=60,
                since=0,
            )
            answer = done.message
            assert answer.author_id == fake.bot_user.id
            assert answer.content.splitlines()[-1].startswith("-# smolcord base")
            assert (tmp_path / "data" / "smolcord.db").exists()

            process.send_signal(signal.SIGINT)  # Ctrl-C
            code = await asyncio.wait_for(process.wait(), 60)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        log = log_path.read_text(errors="replace")
        assert code == 0, log[-3000:]
        assert all(gone(pid) for pid in children), "no child is left behind"
        assert "the worker is ready" in log and "SIGINT: stopping the bot, then the worker" in log
        assert log.index("the bot stopped") < log.index("the worker stopped")
        assert "Traceback" not in log, log[-3000:]
