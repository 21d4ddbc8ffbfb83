"""The adapter registry: atomic versions, the `current` swap, rollback, prune, the short lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from smolcord.registry import AdapterRegistry, RegistryConflict, RegistryError, UnknownVersion

REPO = Path(__file__).resolve().parents[2]


def add_version(registry: AdapterRegistry, payload: bytes = b"weights", **metrics) -> str:
    with registry.new_version(metrics) as staged:
        (staged.path / "adapter_config.json").write_text("{}")
        (staged.path / "adapter_model.safetensors").write_bytes(payload)
    assert staged.version is not None
    return staged.version


def temporaries(root: Path) -> list[str]:
    return sorted(name for name in os.listdir(root) if name.startswith(".tmp-"))


def run_python(code: str, *args: str, **popen) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, **popen)


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters", locks_dir=tmp_path / "locks")


# ------------------------------------------------------------------------------------ reading


def test_empty_registry(registry: AdapterRegistry):
    assert registry.versions() == []
    assert registry.current() is None
    assert registry.next_version() == "v1"


def test_versions_and_next_version(registry: AdapterRegistry):
    assert [add_version(registry) for _ in range(3)] == ["v1", "v2", "v3"]
    assert registry.versions() == ["v1", "v2", "v3"]
    assert registry.next_version() == "v4"
    assert registry.lock_path.parent.name == "locks" and registry.lock_path.exists()


def test_versions_sort_numerically(registry: AdapterRegistry):
    for number in (2, 10, 9):
        (registry.root / f"v{number}").mkdir(parents=True)
    (registry.root / "notes").mkdir()
    (registry.root / "v11").write_text("a file, not a version")
    assert registry.versions() == ["v2", "v9", "v10"]
    assert registry.next_version() == "v11"


def test_version_numbers_are_never_reused(registry: AdapterRegistry):
    for _ in range(3):
        add_version(registry)
    assert registry.prune(keep=1) == ["v1", "v2"]
    registry.path("v3")  # exists
    (registry.root / "v3" / "adapter_model.safetensors").unlink()
    os.rename(registry.root / "v3", registry.root / "elsewhere")  # someone removes the newest by hand
    assert add_version(registry) == "v4"


def test_metrics(registry: AdapterRegistry):
    version = add_version(registry, heldout_accuracy=0.7, pairs=32)
    metrics = registry.metrics(version)
    assert metrics["heldout_accuracy"] == 0.7 and metrics["pairs"] == 32
    assert metrics["version"] == version and "created_at" in metrics
    assert registry.mark(version, status="rejected")["status"] == "rejected"
    assert registry.metrics(version)["status"] == "rejected"
    assert registry.metrics(version)["pairs"] == 32
    (registry.path(version) / "metrics.json").write_text("{not json")
    assert registry.metrics(version) == {}
    (registry.path(version) / "metrics.json").unlink()
    assert registry.metrics(version) == {}


@pytest.mark.parametrize(
    "name",
    ["../v1", "v1/../../etc", "/etc", "v0", "v01", "v1/", "current", "", "V1", "v1\x00", "v1\n", ".tmp-1-2"],
)
def test_invalid_names_refused(registry: AdapterRegistry, name: str):
    add_version(registry)
    with pytest.raises(RegistryError):
        registry.path(name)
    with pytest.raises(RegistryError):
        registry.promote(name, expected_current=None)
    with pytest.raises(RegistryError):
        registry.rollback(name)


def test_a_folder_named_like_a_version_plus_newline_is_not_one(registry: AdapterRegistry):
    """`re.match` with `$` accepts a trailing newline: every version name is matched whole."""
    version = add_version(registry)
    impostor = registry.root / f"{version}\n"
    impostor.mkdir()
    assert registry.versions() == [version]
    (registry.root / "current").symlink_to(impostor.name)
    assert registry.current() is None


def test_unknown_version(registry: AdapterRegistry):
    with pytest.raises(UnknownVersion) as info:
        registry.path("v7")
    assert isinstance(info.value, KeyError) and "v7" in str(info.value)
    with pytest.raises(KeyError):
        registry.promote("v7", expected_current=None)


def test_symlinked_version_is_not_a_version(registry: AdapterRegistry, tmp_path: Path):
    (tmp_path / "outside").mkdir()
    registry.root.mkdir(parents=True)
    (registry.root / "v1").symlink_to(tmp_path / "outside")
    assert registry.versions() == []
    with pytest.raises(UnknownVersion):
        registry.path("v1")


# ----------------------------------------------------------------------------- promote, rollback


def test_promote(registry: AdapterRegistry):
    v1, v2 = add_version(registry), add_version(registry)
    registry.promote(v1, expected_current=None)
    assert registry.current() == v1
    assert os.readlink(registry.root / "current") == "v1"  # relative
    registry.promote(v2, expected_current=v1)
    assert registry.current() == v2
    assert temporaries(registry.root) == []


def test_promote_with_stale_expectation_conflicts(registry: AdapterRegistry):
    v1, v2, v3 = (add_version(registry) for _ in range(3))
    registry.promote(v1, expected_current=None)
    gate_saw = registry.current()
    registry.promote(v2, expected_current=v1)  # someone else promoted after our gate ran
    with pytest.raises(RegistryConflict):
        registry.promote(v3, expected_current=gate_saw)
    assert registry.current() == v2
    with pytest.raises(RegistryConflict):
        registry.promote(v3, expected_current=None)
    assert registry.current() == v2


def test_rollback_default_skips_rejected_then_reaches_base(registry: AdapterRegistry):
    v1, v2, v3 = (add_version(registry) for _ in range(3))
    registry.mark(v2, status="rejected")
    registry.promote(v3, expected_current=None)
    assert registry.rollback() == v1
    assert registry.current() == v1
    assert registry.rollback() is None
    assert registry.current() is None
    assert not os.path.lexists(registry.root / "current")
    assert registry.rollback() is None  # already the base


def test_rollback_explicit(registry: AdapterRegistry):
    v1, v2 = add_version(registry), add_version(registry)
    registry.promote(v1, expected_current=None)
    assert registry.rollback(v2) == v2  # any complete version, even a newer one
    assert registry.current() == v2
    with pytest.raises(UnknownVersion):
        registry.rollback("v9")
    assert registry.current() == v2


def test_current_naming_a_missing_version_is_the_base(registry: AdapterRegistry):
    add_version(registry)
    (registry.root / "current").symlink_to("v5")
    assert registry.current() is None


def test_readers_never_see_current_missing_or_half_written_versions(registry: AdapterRegistry):
    v1, v2 = add_version(registry), add_version(registry)
    registry.promote(v1, expected_current=None)
    payload = os.urandom(256 * 1024)
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def read() -> None:
        while not stop.is_set():
            current = registry.current()
            if current not in (v1, v2):
                problems.append(f"current was {current!r}")
            for version in registry.versions():
                folder = registry.root / version
                if not (folder / "metrics.json").exists():
                    problems.append(f"{version} listed without metrics.json")
                model = folder / "adapter_model.safetensors"
                if version not in (v1, v2) and model.stat().st_size != len(payload):
                    problems.append(f"{version} listed half-written")
            reads[0] += 1

    def commit_more() -> None:
        for _ in range(5):
            add_version(registry, payload)

    readers = [threading.Thread(target=read) for _ in range(3)]
    writer = threading.Thread(target=commit_more)
    for thread in [*readers, writer]:
        thread.start()
    try:
        for _ in range(150):
            registry.promote(v2, expected_current=v1)
            registry.promote(v1, expected_current=v2)
    finally:
        writer.join()
        stop.set()
        for thread in readers:
            thread.join()
    assert problems == []
    assert reads[0] > 100
    assert registry.versions() == [f"v{n}" for n in range(1, 8)]
    assert temporaries(registry.root) == []


# ------------------------------------------------------------------------------ staging, cleanup


def test_staged_version_abandoned_by_an_exception(registry: AdapterRegistry):
    with pytest.raises(RuntimeError), registry.new_version() as staged:
        (staged.path / "adapter_model.safetensors").write_bytes(b"half")
        assert registry.versions() == []
        assert temporaries(registry.root) == [staged.path.name]
        raise RuntimeError("training crashed")
    assert registry.versions() == []
    assert temporaries(registry.root) == []
    assert add_version(registry) == "v1"


def test_stage_commit_discard(registry: AdapterRegistry):
    staged = registry.stage()
    (staged / "adapter_model.safetensors").write_bytes(b"w")
    other = registry.stage()
    assert registry.versions() == []
    registry.discard(other)
    assert registry.commit(staged, {"loss": 0.5}) == "v1"
    assert registry.metrics("v1")["loss"] == 0.5
    assert temporaries(registry.root) == []
    with pytest.raises(RegistryError):
        registry.commit(registry.root / ".tmp-1-abc", {})


def test_live_stage_of_another_process_is_kept(registry: AdapterRegistry, tmp_path: Path):
    other = AdapterRegistry(registry.root, locks_dir=tmp_path / "locks")
    staged = other.stage()
    add_version(registry)  # runs the stale cleanup
    assert staged.exists()
    assert other.commit(staged, {}) == "v2"


def test_stage_left_by_a_killed_process_is_never_listed_and_cleaned_up(registry: AdapterRegistry):
    code = (
        "import os, sys; from pathlib import Path; from smolcord.registry import AdapterRegistry\n"
        "registry = AdapterRegistry(Path(sys.argv[1]), locks_dir=Path(sys.argv[2]))\n"
        "staged = registry.stage()\n"
        "(staged / 'adapter_model.safetensors').write_bytes(b'half-written')\n"
        "os._exit(1)\n"
    )
    child = run_python(code, str(registry.root), str(registry.lock_path.parent))
    assert child.wait(timeout=60) == 1
    assert len(temporaries(registry.root)) == 1
    assert registry.versions() == []
    assert registry.next_version() == "v1"

    assert add_version(registry) == "v1"
    assert temporaries(registry.root) == []
    assert registry.versions() == ["v1"]


# ---------------------------------------------------------------------------------------- prune


def test_prune_keeps_newest_and_current(registry: AdapterRegistry):
    versions = [add_version(registry) for _ in range(6)]
    registry.promote("v2", expected_current=None)
    assert registry.prune(keep=3) == ["v1", "v3"]
    assert registry.versions() == ["v2", "v4", "v5", "v6"]
    assert registry.current() == "v2"
    assert registry.prune(keep=3) == []
    assert registry.prune(keep=0) == ["v4", "v5", "v6"]
    assert registry.versions() == ["v2"]
    assert temporaries(registry.root) == []
    assert len(versions) == 6
    with pytest.raises(ValueError):
        registry.prune(keep=-1)


# ----------------------------------------------------------------------------------------- lock


def test_lock_released_when_its_holder_is_killed(registry: AdapterRegistry):
    v1 = add_version(registry)
    code = (
        "import sys, time; from pathlib import Path; from smolcord.registry import AdapterRegistry\n"
        "registry = AdapterRegistry(Path(sys.argv[1]), locks_dir=Path(sys.argv[2]))\n"
        "with registry.locked():\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(120)\n"
    )
    holder = run_python(
        code, str(registry.root), str(registry.lock_path.parent), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        impatient = AdapterRegistry(registry.root, locks_dir=registry.lock_path.parent, lock_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(RegistryError, match="registry busy"):
            impatient.promote(v1, expected_current=None)
        assert 0.25 < time.monotonic() - started < 5
        assert registry.current() is None
        # readers take no lock
        assert impatient.versions() == [v1]
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()
    impatient.promote(v1, expected_current=None)
    assert registry.current() == v1


def test_lock_file_defaults_to_the_root(tmp_path: Path):
    registry = AdapterRegistry(tmp_path / "adapters")
    add_version(registry)
    assert registry.lock_path == tmp_path / "adapters" / "registry.lock"
    assert registry.versions() == ["v1"]
    assert json.loads((tmp_path / "adapters" / "v1" / "metrics.json").read_text())["version"] == "v1"


# --------------------------------------------------------------------------------------- canary


def test_no_canary_at_first(registry: AdapterRegistry):
    assert registry.candidate() is None
    assert registry.canary() is None
    assert registry.abort_canary() is None


def test_start_promote_canary(registry: AdapterRegistry):
    v1, v2 = add_version(registry), add_version(registry)
    registry.promote(v1, expected_current=None)
    registry.start_canary(v2, expected_current=v1)
    assert registry.candidate() == v2 and registry.current() == v1
    assert os.readlink(registry.root / "candidate") == "v2"  # relative, like current
    record = registry.canary()
    assert record is not None
    assert record["candidate"] == v2 and record["current_at_start"] == v1
    assert record["started_at"].endswith("+00:00")
    # restart-safe: a new registry object (another process) reads the same state from disk
    again = AdapterRegistry(registry.root, locks_dir=registry.lock_path.parent)
    assert again.canary() == record
    again.promote_candidate(v2)
    assert registry.current() == v2
    assert registry.candidate() is None and registry.canary() is None
    assert not os.path.lexists(registry.root / "candidate")
    assert not (registry.root / "canary.json").exists()
    assert temporaries(registry.root) == []


def test_canary_against_the_base_model(registry: AdapterRegistry):
    v1 = add_version(registry)
    registry.start_canary(v1, expected_current=None)
    assert registry.canary() == {
        "candidate": v1,
        "current_at_start": None,
        "started_at": registry.canary()["started_at"],  # type: ignore[index]
    }
    registry.promote_candidate(v1)
    assert registry.current() == v1


def test_start_canary_refusals(registry: AdapterRegistry):
    v1, v2, v3 = (add_version(registry) for _ in range(3))
    registry.promote(v1, expected_current=None)
    with pytest.raises(UnknownVersion):
        registry.start_canary("v9", expected_current=v1)
    with pytest.raises(RegistryError):
        registry.start_canary("../v1", expected_current=v1)
    with pytest.raises(RegistryConflict, match="moved"):
        registry.start_canary(v2, expected_current=None)
    with pytest.raises(RegistryConflict, match="served already"):
        registry.start_canary(v1, expected_current=v1)
    assert registry.candidate() is None
    registry.start_canary(v2, expected_current=v1)
    with pytest.raises(RegistryConflict, match="one candidate at a time"):
        registry.start_canary(v3, expected_current=v1)
    assert registry.candidate() == v2


def test_promotion_refused_when_current_moved_since_the_canary_began(registry: AdapterRegistry):
    v1, v2, v3 = (add_version(registry) for _ in range(3))
    registry.promote(v1, expected_current=None)
    registry.start_canary(v3, expected_current=v1)
    with registry.locked():  # someone moves current by hand (not through rollback, which aborts)
        registry._point_link_at("current", v2)
    with pytest.raises(RegistryConflict, match="moved since"):
        registry.promote_candidate(v3)
    assert registry.current() == v2 and registry.candidate() == v3  # nothing changed
    assert registry.abort_canary(v3) == v3
    assert registry.current() == v2 and registry.canary() is None


def test_promote_candidate_refuses_another_version(registry: AdapterRegistry):
    v1, v2 = add_version(registry), add_version(registry)
    with pytest.raises(RegistryConflict, match="no canary"):
        registry.promote_candidate(v1)
    registry.start_canary(v1, expected_current=None)
    with pytest.raises(RegistryConflict, match="not in canary"):
        registry.promote_candidate(v2)
    assert registry.current() is None and registry.candidate() == v1


def test_abort_canary(registry: AdapterRegistry):
    v1, v2 = add_version(registry), add_version(registry)
    registry.start_canary(v1, expected_current=None)
    with pytest.raises(RegistryConflict):
        registry.abort_canary(v2)
    assert registry.candidate() == v1
    assert registry.abort_canary(v1) == v1
    assert registry.candidate() is None and registry.canary() is None
    assert registry.current() is None
    with pytest.raises(RegistryConflict):
        registry.abort_canary(v1)  # decided already
    assert registry.abort_canary() is None
    registry.start_canary(v2, expected_current=None)  # the next canary may start
    assert registry.abort_canary() == v2


def test_rollback_aborts_the_canary(registry: AdapterRegistry):
    v1, v2, v3 = (add_version(registry) for _ in range(3))
    registry.promote(v2, expected_current=None)
    registry.start_canary(v3, expected_current=v2)
    with pytest.raises(UnknownVersion):
        registry.rollback("v9")  # refused: nothing changes, the canary included
    assert registry.candidate() == v3
    assert registry.rollback() == v1
    assert registry.current() == v1
    assert registry.candidate() is None and registry.canary() is None
    assert not (registry.root / "canary.json").exists()


def test_prune_keeps_the_candidate(registry: AdapterRegistry):
    for _ in range(5):
        add_version(registry)
    registry.promote("v5", expected_current=None)
    # the candidate is old here only to prove the point: prune never takes it
    registry.start_canary("v1", expected_current="v5")
    assert registry.prune(keep=1) == ["v2", "v3", "v4"]
    assert registry.versions() == ["v1", "v5"]
    assert registry.candidate() == "v1"


def test_a_half_finished_change_reads_as_no_canary_and_is_tidied(registry: AdapterRegistry):
    v1, v2 = add_version(registry), add_version(registry)
    registry.promote(v1, expected_current=None)
    # a writer died after writing the record, before the link
    (registry.root / "canary.json").write_text(
        json.dumps({"candidate": v2, "current_at_start": v1, "started_at": "2026-01-01T00:00:00+00:00"})
    )
    assert registry.candidate() is None and registry.canary() is None
    registry.start_canary(v2, expected_current=v1)  # tidied and started afresh
    assert registry.canary()["started_at"] != "2026-01-01T00:00:00+00:00"  # type: ignore[index]
    # a promotion died after swapping current, before removing the link: it was promoted
    with registry.locked():
        registry._point_link_at("current", v2)
    assert registry.current() == v2
    assert registry.candidate() is None and registry.canary() is None
    assert registry.abort_canary() is None
    assert not os.path.lexists(registry.root / "candidate")
    assert not (registry.root / "canary.json").exists()


def _race(barrier: threading.Barrier, results: dict[str, object], key: str, action) -> None:
    barrier.wait()
    try:
        results[key] = action()
    except RegistryConflict as exc:
        results[key] = exc


def test_concurrent_promote_and_abort_one_wins(registry: AdapterRegistry, tmp_path: Path):
    """Each round, a promotion and an abort race from two registry objects: exactly one wins, whole."""
    v1, v2 = add_version(registry), add_version(registry)
    registry.promote(v1, expected_current=None)
    other = AdapterRegistry(registry.root, locks_dir=tmp_path / "locks")
    outcomes: dict[str, int] = {"promoted": 0, "aborted": 0}
    for _ in range(40):
        registry.rollback(v1)
        registry.start_canary(v2, expected_current=v1)
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}
        threads = [
            threading.Thread(
                target=_race, args=(barrier, results, "promote", lambda: registry.promote_candidate(v2))
            ),
            threading.Thread(target=_race, args=(barrier, results, "abort", lambda: other.abort_canary(v2))),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert registry.candidate() is None and registry.canary() is None
        if not isinstance(results["promote"], RegistryConflict):
            assert isinstance(results["abort"], RegistryConflict)
            assert registry.current() == v2
            outcomes["promoted"] += 1
        else:
            assert results["abort"] == v2
            assert registry.current() == v1
            outcomes["aborted"] += 1
    assert sum(outcomes.values()) == 40
    assert temporaries(registry.root) == []
