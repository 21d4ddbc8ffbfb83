"""The adapter registry on disk: the only writer of `data/adapters/`.

Layout::

    adapters/
      v1/  v2/  v3/          peft adapter folders, each with metrics.json
      current -> v3          relative symlink to the served version (absent: the base model)
      candidate -> v4        relative symlink to the version in canary (absent: no canary)
      canary.json            the canary's record: candidate, current when it began, when it began
      .tmp-<pid>-<random>    a version being written, a symlink being swapped, a version being removed
      registry.lock          the short registry lock (unless locks_dir is given)

Every change that readers can see is one atomic rename: a version is written under a temporary
name and renamed into place, `current` is replaced with `os.replace`, a version is renamed away
before it is deleted. Readers (the worker, `smolcord adapters list`) take no lock and never see a
half-written version or a missing `current` during a swap.

A canary is the `candidate` symlink plus `canary.json`, changed together under the lock: started
by writing canary.json and then the symlink, ended (promoted or aborted) by removing the symlink
and then canary.json, and promoted by swapping `current` to the candidate first. So a writer that
dies halfway leaves at worst a canary.json without its symlink, or a `candidate` naming what
`current` names now: readers treat both as "no canary", and the next locked write tidies them.
The symlink is what the worker serves; canary.json is what promotion checks (`current` must not
have moved since the canary began).

Writers take the short registry lock (`flock`, so the OS releases it when a holder dies). It is
separate from the lock that keeps training runs one at a time: a run writes its version without
holding it, and a rollback never waits for a run. Linux and macOS only (fcntl).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "AdapterRegistry",
    "RegistryConflict",
    "RegistryError",
    "StagedVersion",
    "UnknownVersion",
]

log = logging.getLogger(__name__)

# Always fullmatch: `re.match` with `$` also accepts a trailing newline ("v1\n").
_VERSION = re.compile(r"v[1-9][0-9]*")
_TMP_PREFIX = ".tmp-"
CURRENT = "current"
CANDIDATE = "candidate"
CANARY_RECORD = "canary.json"
METRICS = "metrics.json"
LOCK_NAME = "registry.lock"
_SEQUENCE = ".last-version"  # highest number ever committed, so a pruned or deleted number is never reused


class RegistryError(Exception):
    """The registry refused an operation (bad name, busy lock, broken layout)."""


class RegistryConflict(RegistryError):
    """`current` moved since the caller looked at it (another promotion or a rollback won)."""


class UnknownVersion(RegistryError, KeyError):
    """No complete version of that name."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass
class StagedVersion:
    """A version being written: files go into `path`; `metrics` is written as metrics.json on commit."""

    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str | None = None  # set by commit


class AdapterRegistry:
    """Versions `v1`, `v2`, ... under `root`, `current` naming the served one, `candidate` the one in canary."""

    def __init__(self, root: Path, *, locks_dir: Path | None = None, lock_timeout: float = 10.0) -> None:
        self.root = Path(root)
        self.lock_path = Path(locks_dir or root) / LOCK_NAME
        self.lock_timeout = lock_timeout
        self._stage_fds: dict[Path, int] = {}  # staged folder -> fd holding its flock

    # ------------------------------------------------------------------------------- reading

    def versions(self) -> list[str]:
        """Complete versions, oldest first (numerically: v2 before v10)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        names = [e.name for e in entries if _VERSION.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
        return sorted(names, key=_number)

    def current(self) -> str | None:
        """The served version, None for the base model (no `current`, or one naming no version)."""
        return self._read_link(CURRENT)

    def candidate(self) -> str | None:
        """The version in canary, None when no canary runs (no `candidate`, or one naming `current`'s version)."""
        candidate = self._read_link(CANDIDATE)
        if candidate is not None and candidate == self.current():
            return None  # a promotion stopped between its two steps: it was promoted, the canary is over
        return candidate

    def canary(self) -> dict[str, Any] | None:
        """The running canary: {"candidate", "current_at_start" (None: the base), "started_at" (ISO UTC)}, or None."""
        candidate = self.candidate()
        if candidate is None:
            return None
        record = self._canary_record()
        if record is None or record.get("candidate") != candidate:
            log.warning(
                "adapters/candidate names %s but %s does not: no canary record", candidate, CANARY_RECORD
            )
            return None
        return record

    def path(self, version: str) -> Path:
        """The folder of a complete version (the name is validated: nothing outside the registry)."""
        _check_name(version)
        folder = self.root / version
        if folder.is_symlink() or not folder.is_dir():
            raise UnknownVersion(f"no adapter version {version!r} in {self.root}")
        return folder

    def metrics(self, version: str) -> dict[str, Any]:
        """A version's metrics.json, {} when absent or unreadable."""
        try:
            data = json.loads((self.path(version) / METRICS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def next_version(self) -> str:
        """The name the next commit would get (advisory: commit picks it again under the lock)."""
        existing = [_number(v) for v in self.versions()]
        return f"v{max([self._sequence(), *existing]) + 1}"

    # ------------------------------------------------------------------------------- writing

    @contextmanager
    def new_version(self, metrics: dict[str, Any] | None = None) -> Iterator[StagedVersion]:
        """Stage a version, commit it when the block ends, discard it if the block raises.

        with registry.new_version() as staged:
            model.save_pretrained(staged.path)
            staged.metrics["heldout_accuracy"] = 0.71
        staged.version  # "v4"
        """
        staged = StagedVersion(self.stage(), dict(metrics or {}))
        try:
            yield staged
        except BaseException:
            self.discard(staged.path)
            raise
        try:
            staged.version = self.commit(staged.path, staged.metrics)
        except BaseException:
            self.discard(staged.path)
            raise

    def stage(self) -> Path:
        """A new empty temporary folder to write a version into; no lock is held while you write.

        The folder stays flocked by this process until `commit` or `discard`: a process that dies
        releases it, and the next stage or commit removes the leftovers.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._remove_stale()
            folder = self.root / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            folder.mkdir()
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # created under the lock: nobody else has it
        self._stage_fds[folder] = fd
        return folder

    def commit(self, staged: Path, metrics: dict[str, Any] | None = None) -> str:
        """Write metrics.json into a staged folder and rename it into place as the next version."""
        staged = Path(staged)
        if staged not in self._stage_fds or staged.parent != self.root:
            raise RegistryError(f"{staged} was not staged by this registry")
        record = dict(metrics or {})
        record.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
        _fsync_tree(staged)  # the payload may be large: flush it before taking the lock
        with self._locked():
            self._remove_stale()
            version = self.next_version()
            record["version"] = version
            _write_json(staged / METRICS, record)
            _fsync_dir(staged)
            os.rename(staged, self.root / version)
            self._write_sequence(_number(version))
            _fsync_dir(self.root)
        os.close(self._stage_fds.pop(staged))
        log.info("adapter %s committed", version)
        return version

    def discard(self, staged: Path) -> None:
        """Remove a staged folder that will not be committed."""
        staged = Path(staged)
        shutil.rmtree(staged, ignore_errors=True)
        fd = self._stage_fds.pop(staged, None)
        if fd is not None:
            os.close(fd)

    def promote(self, version: str, *, expected_current: str | None) -> None:
        """Serve `version`, only if `current` is still `expected_current` (what the gate compared with)."""
        with self._locked():
            self.path(version)
            actual = self.current()
            if actual != expected_current:
                raise RegistryConflict(
                    f"current is {actual or 'the base model'}, expected {expected_current or 'the base model'}: "
                    f"it moved since the gate ran, {version} is not promoted"
                )
            self._point_link_at(CURRENT, version)
        log.info("adapter %s promoted (was %s)", version, expected_current or "base")

    def rollback(self, version: str | None = None) -> str | None:
        """Serve `version`, or by default the newest older version not marked rejected, or else the base.

        A running canary is aborted first: a rollback says the newer versions are not wanted.
        Returns what is served now (None: the base model).
        """
        with self._locked():
            before = self.current()
            if version is not None:
                self.path(version)
                target: str | None = version
            else:
                limit = _number(before) if before else 0
                older = [v for v in self.versions() if _number(v) < limit]
                usable = [v for v in older if self.metrics(v).get("status") != "rejected"]
                target = usable[-1] if usable else None
            aborted = self._end_canary()  # before `current` moves: the candidate never outlives its baseline
            self._point_link_at(CURRENT, target)
        if aborted is not None:
            log.info("canary of %s aborted by a rollback", aborted)
        log.info("adapters rolled back from %s to %s", before or "base", target or "base")
        return target

    def prune(self, keep: int) -> list[str]:
        """Remove the oldest versions beyond the newest `keep`, never the current or the candidate; returns the removed."""
        if keep < 0:
            raise ValueError("keep must be >= 0")
        removed = []
        with self._locked():
            # the candidate's link is read raw: even one a dying promotion left behind keeps its version
            served = {self.current(), self._read_link(CANDIDATE)}
            versions = self.versions()
            doomed = [v for v in versions[: max(0, len(versions) - keep)] if v not in served]
            for version in doomed:
                # Rename first, so readers see the version either whole or gone, never half-deleted.
                trash = self.root / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(self.root / version, trash)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(version)
            if removed:
                _fsync_dir(self.root)
        if removed:
            log.info("adapters pruned: %s", ", ".join(removed))
        return removed

    # -------------------------------------------------------------------------------- canary

    def start_canary(self, version: str, *, expected_current: str | None) -> None:
        """Put `version` in canary beside `current`, only if `current` is still `expected_current` and none runs."""
        with self._locked():
            self.path(version)
            self._tidy_canary()
            actual = self.current()
            if actual != expected_current:
                raise RegistryConflict(
                    f"current is {actual or 'the base model'}, expected {expected_current or 'the base model'}: "
                    f"it moved since the gate ran, {version} is not put in canary"
                )
            running = self.candidate()
            if running is not None:
                raise RegistryConflict(f"{running} is in canary already: one candidate at a time")
            if version == actual:
                raise RegistryConflict(f"{version} is served already")
            record = {
                "candidate": version,
                "current_at_start": actual,
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            # the record first: a writer dying before the link leaves a record readers ignore
            _write_json(self.root / CANARY_RECORD, record)
            self._point_link_at(CANDIDATE, version)
        log.info("adapter %s in canary (current %s)", version, actual or "base")

    def promote_candidate(self, version: str) -> None:
        """Serve the candidate `version` to everyone and end its canary, only if `current` has not moved since it began."""
        with self._locked():
            self._tidy_canary()
            running = self.candidate()
            if running != version:
                raise RegistryConflict(
                    f"{version} is not in canary ({running or 'no canary runs'}): not promoted"
                )
            record = self._canary_record()
            if record is None or record.get("candidate") != version:
                raise RegistryConflict(f"{version} has no canary record: not promoted (abort the canary)")
            before = record.get("current_at_start")
            actual = self.current()
            if actual != before:
                raise RegistryConflict(
                    f"current is {actual or 'the base model'}, but the canary of {version} began against "
                    f"{before or 'the base model'}: it moved since, {version} is not promoted"
                )
            self.path(version)
            # current first: a writer dying now leaves `candidate` naming current, which reads as no canary
            self._point_link_at(CURRENT, version)
            self._end_canary()
        log.info("adapter %s promoted from canary (was %s)", version, before or "base")

    def abort_canary(self, version: str | None = None) -> str | None:
        """End the canary without promoting (only if `version`, when given, is the candidate); returns the aborted version."""
        with self._locked():
            self._tidy_canary()
            running = self.candidate()
            if version is not None:
                _check_name(version)
                if running != version:
                    raise RegistryConflict(f"{version} is not in canary ({running or 'no canary runs'})")
            aborted = self._end_canary()
        if aborted is not None:
            log.info("canary of %s aborted", aborted)
        return aborted

    def mark(self, version: str, **fields: Any) -> dict[str, Any]:
        """Update a version's metrics.json (e.g. `status="rejected"`) atomically; returns the new metrics."""
        with self._locked():
            folder = self.path(version)
            record = self.metrics(version) | fields
            _write_json(folder / METRICS, record)
        return record

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry lock (for admin scripts and tests: registry methods take it themselves)."""
        with self._locked():
            yield

    # ------------------------------------------------------------------------------ internals

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The short registry lock. Not re-entrant: methods holding it call no locking method."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RegistryError(
                            f"registry busy: {self.lock_path} held for more than {self.lock_timeout:g} s"
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _read_link(self, name: str) -> str | None:
        """The version a registry symlink names; None when absent or naming no version."""
        try:
            target = os.readlink(self.root / name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # a plain file or folder: not ours
                raise RegistryError(f"{self.root / name} is not a symlink") from None
            raise
        folder = self.root / target
        if not _VERSION.fullmatch(target) or folder.is_symlink() or not folder.is_dir():
            log.warning("adapters/%s points at %r, which is not a version: ignored", name, target)
            return None
        return target

    def _canary_record(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.root / CANARY_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _end_canary(self) -> str | None:
        """Remove `candidate`, then canary.json; returns the version the canary ran. Lock held."""
        running = self.candidate()
        self._point_link_at(CANDIDATE, None)
        with suppress(FileNotFoundError):
            os.unlink(self.root / CANARY_RECORD)
        return running

    def _tidy_canary(self) -> None:
        """Finish what a writer that died mid-change left: a link naming `current`, or a record without its link. Lock held."""
        link = self.root / CANDIDATE
        if os.path.lexists(link) and self.candidate() is None:
            self._point_link_at(CANDIDATE, None)
        if not os.path.lexists(link):
            with suppress(FileNotFoundError):
                os.unlink(self.root / CANARY_RECORD)

    def _point_link_at(self, name: str, version: str | None) -> None:
        """Swap a registry symlink atomically (a temporary symlink renamed over it); None removes it. Lock held."""
        link = self.root / name
        if link.exists() and not link.is_symlink():
            raise RegistryError(f"{link} is not a symlink; refusing to replace it")
        if version is None:
            try:
                os.unlink(link)
            except FileNotFoundError:
                return  # nothing to remove (perhaps no registry folder yet)
        else:
            temporary = self.root / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            os.symlink(version, temporary)  # relative: the data dir may be mounted elsewhere
            try:
                os.replace(temporary, link)
            except BaseException:
                with suppress(OSError):
                    os.unlink(temporary)
                raise
        _fsync_dir(self.root)

    def _remove_stale(self) -> None:
        """Remove temporaries whose writer is gone. Lock held, so no temporary is half-created now."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.name.startswith(_TMP_PREFIX):
                continue
            path = Path(entry.path)
            if not entry.is_dir(follow_symlinks=False):
                # symlinks and files are only created under the lock we hold: left by a dead writer
                with suppress(OSError):
                    os.unlink(path)
                continue
            if path in self._stage_fds or not _unlocked(path):
                continue  # a live stage (ours, or another process's)
            log.info("removing stale adapter temporary %s", entry.name)
            shutil.rmtree(path, ignore_errors=True)

    def _sequence(self) -> int:
        try:
            return int((self.root / _SEQUENCE).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return 0

    def _write_sequence(self, number: int) -> None:
        temporary = self.root / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        temporary.write_text(f"{number}\n", encoding="ascii")
        os.replace(temporary, self.root / _SEQUENCE)


def _check_name(version: str) -> None:
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise RegistryError(f"invalid adapter version name {version!r} (expected v1, v2, ...)")


def _number(version: str) -> int:
    return int(version[1:])


def _unlocked(folder: Path) -> bool:
    """Whether nobody holds the flock of a staged folder (its writer finished or died)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically: a temporary file beside it, fsynced, renamed over it."""
    temporary = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
