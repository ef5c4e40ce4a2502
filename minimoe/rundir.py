"""A run directory (train --out): one run at a time owns it, and what it leaves there is whole.

    with RunLock(out) as lock:        # RunLockError (a UserError) while another run owns it
        if lock.note:
            print(lock.note)          # a stale lock, left by a run that died, was taken over
        metrics, note = open_metrics(out, step)   # temporary files of killed saves removed first
        ...train; after each checkpoint: after_save(out, path, metrics, best)...

The lock file holds one JSON line: the owner's pid, host name and start time. Ownership itself
is an OS lock on the open file (fcntl.flock, POSIX): the kernel drops it when its process ends in
any way, kill -9 included, so a lock file whose OS lock is free was left by a run that died, and
is taken over with a note. Where flock does not exist (Windows), the file is created exclusively,
and one left by a process that no longer runs on this host is replaced. A lock file written on
another host is never taken over (that run may be alive over a network file system): the
message says to delete the file once that run is over. Removed when the run ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from minimoe import checkpoint
from minimoe.errors import UserError
from minimoe.metrics import MetricsLog

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILENAME = "run.lock"
METRICS_FILENAME = "metrics.jsonl"
BEST_FILENAME = "best.npz"  # the checkpoint of the best validation loss (train --keep-best)


class RunLockError(UserError):
    """The run directory is owned by another run."""


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (True when that cannot be told)."""
    if os.name == "nt":  # os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by another user
        return True
    return True


def _read(fd) -> dict:
    """The owner recorded in an open lock file ({} when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        owner = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def describe(owner: dict) -> str:
    """'pid 123 on host "box" since 2024-05-01 12:00:00' (whatever of it the file records)."""
    parts = [f"pid {owner.get('pid', '?')}", f"on host {owner.get('host', '?')!r}"]
    if isinstance(owner.get("started"), (int, float)):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])))
    return " ".join(parts)


class RunLock:
    """The lock of run directory `directory` (created if missing; removed again on release when it
    is still empty). See the module docstring."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_FILENAME
        self.fd = None
        self.note = None  # set when a stale lock was taken over
        self.made_dir = False
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}

    def acquire(self) -> RunLock:
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
            self.made_dir = True
        exclusive = 0 if fcntl is not None else os.O_EXCL  # without flock, creating the file is the lock
        for _ in range(10):  # retried only when the owner removed the file while we opened it
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | exclusive, 0o644)
            except FileExistsError:
                self._replace_if_stale()
                continue
            try:
                if self._take(fd):
                    self.fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise RunLockError(
            f"{str(self.path)!r} keeps changing; is another run starting in {str(self.dir)!r}?"
        )

    def _replace_if_stale(self) -> None:
        """(Without flock) remove a lock file whose owner no longer runs on this host, else refuse."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            owner = _read(fd)
        finally:
            os.close(fd)
        if owner.get("host") != self.me["host"] or not isinstance(owner.get("pid"), int):
            self._refuse(owner, "is locked by a run this machine cannot check", hint=True)
        if pid_alive(owner["pid"]):
            self._refuse(owner, "is in use by another run")
        self.path.unlink(missing_ok=True)
        self.note = self._taken_over(owner)

    def _taken_over(self, owner: dict) -> str:
        return (
            f"note: took over the lock {str(self.path)!r} of a run that is no longer running "
            f"({describe(owner)}); its checkpoint and metrics are kept"
        )

    def _take(self, fd) -> bool:
        """Own the open lock file fd (True), or find it was replaced meanwhile (False)."""
        flocked = False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                self._refuse(_read(fd), "is in use by another run")
            except OSError:  # a file system without flock: fall back to the recorded pid
                pass
        try:
            if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                return False  # the owner ended and removed the file: try the new one
        except FileNotFoundError:
            return False
        owner = _read(fd)
        if owner:
            if owner.get("host") != self.me["host"]:
                self._refuse(
                    owner, "was locked on another host, by a run this machine cannot check", hint=True
                )
            if not flocked and isinstance(owner.get("pid"), int) and pid_alive(owner["pid"]):
                self._refuse(owner, "is in use by another run")
            self.note = self._taken_over(owner)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(self.me) + "\n").encode())
        os.fsync(fd)
        return True

    def _refuse(self, owner: dict, what: str, hint: bool = False):
        fix = (
            f"if that run is over, delete {str(self.path)!r} and start again"
            if hint
            else "wait for it to end, stop it, or use another --out directory"
        )
        raise RunLockError(f"--out {str(self.dir)!r} {what} ({describe(owner)}); {fix}")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # before the OS lock goes: a waiter then sees the file is gone
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.made_dir:
            try:
                self.dir.rmdir()  # only when nothing was written there
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ------------------------------------------------------------------------- the files of a run
def temp_files(directory) -> list:
    """The temporary files that interrupted saves of ckpt.npz / best.npz / metrics.jsonl left in
    `directory` (named .NAME.<random>.tmp by tempfile.mkstemp)."""
    names = "|".join(re.escape(n) for n in (checkpoint.FILENAME, BEST_FILENAME, METRICS_FILENAME))
    pattern = re.compile(rf"\.({names})\.[^/]+\.tmp")
    d = Path(directory)
    return sorted(p for p in d.iterdir() if pattern.fullmatch(p.name) and p.is_file()) if d.is_dir() else []


def remove_temp_files(directory) -> list:
    """Delete temp_files(directory); returns their paths. Only safe while no other process saves
    there (training holds the directory's run lock)."""
    found = temp_files(directory)
    for p in found:
        p.unlink(missing_ok=True)
    return found


def copy_checkpoint(src, dest) -> Path:
    """Copy a checkpoint file atomically (a temporary file, then os.replace), e.g. to best.npz."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix="." + dest.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, open(src, "rb") as s:
            shutil.copyfileobj(s, f)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes the file private; use the usual mode
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def best_checkpoint(ckpt: checkpoint.Checkpoint) -> Path | None:
    """The best.npz beside a checkpoint when it holds the step and validation loss its train_state
    calls best (a best.npz of an earlier run in the same directory does not count); else None."""
    best, step = ckpt.path.parent / BEST_FILENAME, ckpt.train_state.get("best_step")
    if step is None or not best.is_file():
        return None
    try:
        with np.load(best, allow_pickle=False) as z:
            state = json.loads(str(z["train_state"][()]))
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, RecursionError):
        return None  # not a checkpoint of ours: it names nothing
    ts = ckpt.train_state
    mine = (
        isinstance(state, dict)
        and state.get("iteration") == step
        and state.get("last_val_loss") == ts.get("best_val_loss")
    )
    return best if mine else None


def open_metrics(out, step: int) -> tuple[MetricsLog, str | None]:
    """(OUT/metrics.jsonl for a run starting at `step`, a note on what was cleaned up), once the
    temporary files of killed saves are removed. A new run where a run already is writes its
    records beside the old ones until its first checkpoint (see MetricsLog). Call under the lock."""
    out = Path(out)
    removed = remove_temp_files(out)
    note = (
        f"removed {len(removed)} temporary file(s) left in {str(out)!r} by interrupted saves"
        if removed
        else None
    )
    aside = step == 0 and ((out / METRICS_FILENAME).exists() or checkpoint.checkpoint_path(out).exists())
    return MetricsLog(out / METRICS_FILENAME, step, aside), note


def after_save(out, path, metrics: MetricsLog, best: bool) -> None:
    """After checkpoint `path` was written: the metrics of its run go with it; with best, it is
    also copied to OUT/best.npz; temporary files left there are removed. Call under the lock."""
    metrics.commit()
    if best:
        copy_checkpoint(path, Path(out) / BEST_FILENAME)
    remove_temp_files(out)
