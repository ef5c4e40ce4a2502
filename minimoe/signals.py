"""Stopping a training run cleanly: the first Ctrl-C (SIGINT) or SIGTERM (sent by `kill`,
`timeout` and job schedulers) becomes a request that the loop checks between two steps (so a
checkpoint is never taken from a half-done optimizer update); a second one acts at once.
The command line then exits with 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM.

    with StopRequest() as stop:
        while step < max_iters:
            ...one whole step...
            if stop.requested:
                break      # save a checkpoint and stop
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """While active, the first of SIGNALS sets `requested` (and `received`, its number) instead of
    acting; that signal's previous handler is put back at once, so a second one acts as usual
    (Ctrl-C: KeyboardInterrupt). On leaving, every previous handler is restored.

    Signal handlers can only be set from the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)  # one more signal here is handled the same way

    def __init__(self, signals=None):
        self.signals = tuple(self.SIGNALS if signals is None else signals)
        self.received = None  # the number of the signal that asked to stop
        self.previous = {}  # signal number -> the handler to put back

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handler(self, signum, frame):
        self.received = signum
        signal.signal(signum, self.previous.pop(signum))  # the next one acts at once

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                previous = signal.signal(s, self._handler)
                # None: a handler not installed from Python; SIG_DFL is the closest we can put back
                self.previous[s] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
