"""When a rank fails: what every rank does about it (minimoe.dist re-exports them).

    with together(w): ...set-up...       # an error on any rank: every rank raises it (printed once)
    with guard(w), Watchdog(w) as dog:   # an exception on one rank: print it, MPI_Abort every rank
        ...each step...; dog.beat()      # no step for MINIMOE_DIST_TIMEOUT seconds: abort them all
w is a dist.World (its comm, rank, size and abort), or None in one process: then nothing happens.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from minimoe.errors import UserError


class DistError(UserError, RuntimeError):
    """A distributed launch that cannot work: mpi4py missing, or a rank that failed in set-up."""


def error_line(rank: int, e: BaseException) -> str:
    """'error: rank 2: <the error, on one line>'."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"error: rank {rank}: {text}"


@contextlib.contextmanager
def together(w):
    """Set-up every rank does alike: if it fails on any rank, every rank raises that rank's
    error (the same UserError, printed once by rank 0, exit status 2); a rank whose own failure
    is a bug re-raises it with its traceback. Nothing to do in one process."""
    if w is None:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:
        error = e
    kind = 0 if error is None else (1 if isinstance(error, UserError) else 2)
    reports = w.comm.allgather((kind, "" if error is None else " ".join(str(error).split())))
    failed = [(r, k, msg) for r, (k, msg) in enumerate(reports) if k]
    if not failed:
        return
    if kind == 2:
        raise error
    if kind == 1 and all(msg == failed[0][2] for _, _, msg in failed) and len(failed) == w.size:
        raise error  # the same mistake everywhere (a bad flag): one line, as in one process
    r, k, msg = failed[0]
    raise DistError(f"rank {r} failed during set-up{'' if k == 1 else ' with a bug'}: {msg}")


@contextlib.contextmanager
def guard(w, agreed=(KeyboardInterrupt,)):
    """While the ranks must keep in step (the training loop): an exception on this rank prints
    its error (and traceback, for a bug) on stderr and aborts every rank (`World.abort`).
    The `agreed` exceptions pass: every rank raises them at the same step (a stop they agreed
    on, a divergence they all see). Nothing to do in one process."""
    if w is None:
        yield
        return
    try:
        yield
    except agreed:
        raise
    except BaseException as e:
        w.abort(e)


class NoMetrics:
    """The metrics file of the ranks other than 0, which write none (rundir.MetricsLog's methods)."""

    def write(self, rec: dict) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class Watchdog:
    """Aborts every rank when this one has made no progress (`beat`) for `timeout` seconds: a
    peer that hangs, or died without its launcher noticing, would otherwise leave us waiting
    inside a collective forever. A daemon thread; MPI_Abort is allowed from any thread."""

    def __init__(self, w, timeout: float | None = None):
        self.w = w
        self.timeout = float(os.environ.get("MINIMOE_DIST_TIMEOUT", "600")) if timeout is None else timeout
        self.last = time.monotonic()
        self._done = threading.Event()
        if w is not None:
            threading.Thread(target=self._watch, daemon=True, name="minimoe-watchdog").start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _watch(self):
        while not self._done.wait(min(1.0, self.timeout / 10)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                print(f"error: rank {self.w.rank}: no progress for {idle:.0f} s (another rank hangs or died); "
                      "stopping every rank", file=sys.stderr, flush=True)  # fmt: skip
                self.w.comm.Abort(1)
                return

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
