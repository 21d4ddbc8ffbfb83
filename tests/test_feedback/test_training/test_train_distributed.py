"""The training job under a launcher: 2 processes on the CPU (gloo), the real `smolcord train` on the tiny model.

Only the main process locks, records the run, gates, publishes and prints; both train (DDP).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from feedback.store.db import upgrade_to_head
from feedback.store.errors import UnknownRun
from feedback.store.synthetic import record_colour_votes
from feedback.training.store import JobStore
from smolcord.registry import AdapterRegistry
from smolcord.settings import Settings
from smolcord.trainlock import training_running

CLOSED_PORT_URL = "http://127.0.0.1:9"  # nothing listens: the worker is down


def read_store(settings: Settings, read: Any) -> Any:
    """One read through the job's own store client, closed after it."""
    with JobStore(settings) as store:
        return read(store)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_processes_train_once_and_only_the_main_one_publishes(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data_dir = tmp_path / "data"
    values: dict[str, Any] = dict(
        data_dir=data_dir, model=str(tiny_model_dir), heldout_fraction=0.25, worker_url=CLOSED_PORT_URL
    )
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    upgrade_to_head(settings.db_url)
    record_colour_votes(settings, prompts=16)
    env = os.environ | {
        "SMOLCORD_DATA_DIR": str(data_dir), "SMOLCORD_MODEL": str(tiny_model_dir), "SMOLCORD_HELDOUT_FRACTION": "0.25",
        "SMOLCORD_WORKER_URL": CLOSED_PORT_URL, "SMOLCORD_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "smolcord", "train", "--force", "--progress", "json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-4000:]

    lines = [json.loads(line) for line in launched.stdout.splitlines()]  # JSON lines only, rank 0's only
    finals = [line for line in lines if "verdict" in line]
    assert len(finals) == 1 and lines[-1] is finals[0], launched.stdout
    final = finals[0]
    assert final["verdict"] == "promoted" and final["exit_code"] == 0 and final["version"] == "v1"
    steps = [line["step"] for line in lines if "step" in line]
    assert steps == sorted(set(steps)) and steps  # each optimizer step reported once
    # the 2 processes split each batch of pairs: 2 epochs of ceil(train / (4 per device * 2)) steps
    train_pairs = 16 - final["heldout_pairs"]
    assert lines[0]["total"] == 2 * -(-train_pairs // 8)

    registry = AdapterRegistry(settings.adapters_dir, locks_dir=settings.locks_dir)
    assert registry.versions() == ["v1"] and registry.current() == "v1"
    assert not training_running(settings.locks_dir)
    assert list(settings.runs_dir.glob(".tmp-*")) == []
    statuses = ("running", "succeeded", "failed", "skipped")
    last = read_store(settings, lambda store: store.last_run(statuses=statuses))
    assert last is not None and last.status == "succeeded" and last.id == final["run_id"]
    assert last.id == 1  # a fresh store: the only run recorded
    with pytest.raises(UnknownRun):
        read_store(settings, lambda store: store.get_run(run_id=2))
