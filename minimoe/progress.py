"""The training progress display, in three forms chosen by where the output goes:

a terminal, tqdm installed   a tqdm bar; loss and tokens/s as its postfix
a terminal, no tqdm          one line rewritten in place (\\r): step, loss, tokens/s, ETA
not a terminal (a log file)  one printed line per log interval: step, loss, tokens/s, ETA

progress = Progress(total=max_iters, initial=step)
progress.update(step)       after every step
progress.log(record)        after every metrics record (its train_loss_avg and tokens_per_s)
progress.write(line)        a line of its own, above the bar
progress.close()
"""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    """3725.2 -> '1h02m', 75 -> '1m15s'."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A progress display: tqdm when installed; else one line rewritten with \\r on a terminal,
    or one printed line per log interval when the stream is not a terminal (a log file).
    enabled=False prints nothing."""

    WIDTH = 79  # the rewritten line is padded to this width, so a shorter line clears a longer one

    def __init__(self, total: int, initial: int, stream=None, enabled: bool = True):
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.total, self.start = total, initial
        self.t0 = time.time()
        self.last_draw = 0.0
        self.status = ""
        self.bar = None
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        if self.tty:  # a bar only on a terminal: in a log file its redraws would be noise
            try:
                from tqdm import tqdm  # optional
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, file=self.stream, unit="it", dynamic_ncols=True)

    def eta(self, it: int) -> float:
        """Seconds left at step `it`, from this session's mean step time (NaN before the first)."""
        done = it - self.start
        return (time.time() - self.t0) / done * (self.total - it) if done > 0 else float("nan")

    def _line(self, it: int) -> str:
        parts = (f"step {it}/{self.total}", self.status, f"ETA {format_duration(self.eta(it))}")
        return " | ".join(p for p in parts if p)

    def update(self, it: int):
        """Step `it` is done (redrawn at most every 0.1 s without tqdm)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        elif self.tty and time.time() - self.last_draw > 0.1:
            self.last_draw = time.time()
            self.stream.write("\r" + self._line(it).ljust(self.WIDTH))
            self.stream.flush()

    def log(self, rec: dict):
        """A metrics record: show its mean loss and speed (a log file gets a line of its own)."""
        if not self.enabled:
            return
        loss, speed = rec["train_loss_avg"], rec["tokens_per_s"] / 1000
        self.status = f"loss {loss:.4f} | {speed:.1f}k tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {speed:.1f}k tok/s")
        elif not self.tty:
            self.write(self._line(rec["step"]))

    def write(self, line: str):
        """Print a line of its own, clearing the rewritten progress line first."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(("\r" + " " * self.WIDTH + "\r" if self.tty else "") + line + "\n")
            self.stream.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
