"""What a training run measures and writes to OUT/metrics.jsonl (one JSON record per log interval):

    train_loss, train_loss_avg   the last and the mean LM loss since the previous record
    val_loss                     mean LM loss on held-out windows (at evaluations only)
    moe                          per MoE layer: expert load, dropped fraction, aux/z loss, entropy
and the yardstick printed at the start: the unigram loss, the best a model without context does.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from minimoe import backend, data


def loss_summary(model, pending: list, skipped: int = 0) -> dict:
    """The last and the mean of the LM losses kept on the device since the last record: one copy
    to the host (on a GPU every copy is a synchronisation). Steps skipped for a non-finite loss
    are not in `pending`: they are counted (`skipped`), and a record of skipped steps only has
    losses None."""
    rec = {"train_loss": None, "train_loss_avg": None}
    if pending:
        losses = backend.to_numpy(model.xp.stack(pending)).astype(np.float64)
        rec = {"train_loss": float(losses[-1]), "train_loss_avg": float(losses.mean())}
    if skipped:
        rec["skipped_steps"] = skipped
    return rec


def estimate_loss(model, ids, batch_size: int, block_size: int, eval_iters: int, seed: int) -> float:
    """Mean LM loss over `eval_iters` batches, in eval mode (no dropout, no router noise).

    The batches come from a generator of their own, seeded identically at every evaluation:
    every evaluation scores the same windows, and the training data stream is not disturbed.
    """
    rng = np.random.default_rng((seed, 1))
    was_training = model.training
    model.eval()
    losses = []
    try:
        for _ in range(eval_iters):
            x, y = data.get_batch(ids, batch_size, block_size, rng)
            model.forward(x, y)  # host batch: checked on the host, moved once
            losses.append(model.stats["lm_loss"])
    finally:
        if was_training:
            model.train()
    return float(backend.to_numpy(model.xp.stack(losses)).mean())  # one copy to the host


def unigram_loss(ids, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the best context-free model: the entropy of token frequencies."""
    counts = np.bincount(np.asarray(ids), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def moe_stats(model) -> list:
    """Per MoE layer: expert load (fractions of assignments), dropped fraction, losses, entropy."""
    out = []
    for st in model.stats.get("layers", []):
        counts = backend.to_numpy(st["tokens_per_expert"]).astype(np.float64)
        load = [round(float(f), 6) for f in counts / max(counts.sum(), 1.0)]
        scalars = ("dropped_fraction", "aux_loss", "z_loss", "router_entropy")
        out.append(
            {"layer": int(st["layer"]), "load": load, **{k: float(backend.to_numpy(st[k])) for k in scalars}}
        )
    return out


class MetricsLog:
    """OUT/metrics.jsonl, appended to and kept consistent with OUT/ckpt.npz; never truncated.

    A resumed run (start > 0) drops the records after its checkpoint's step (logged, but not saved
    before an interruption; the run redoes them), rewriting the file atomically, then appends.
    A new run in a directory that already holds a run writes to a temporary file beside it
    until its first checkpoint is saved: `commit()`, called after every successful save, then
    moves it over metrics.jsonl. A new run that crashes before that leaves the old metrics with
    the old checkpoint they describe (its temporary file is removed by the next run).
    """

    def __init__(self, path: Path, start: int, aside: bool):
        """start: the step the run starts from; aside: write to the temporary file until commit()
        (a new run where a run's metrics or checkpoint already are)."""
        self.path, self.pending = Path(path), None
        if start > 0:
            self._rewrite(lambda step: step <= start)
        elif aside:
            self.pending = _temp_beside(self.path)
        self.file = open(self.pending or self.path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def commit(self) -> None:
        """A checkpoint was saved: a new run's records now replace the old run's."""
        if self.pending is not None:
            self.file.close()
            os.replace(self.pending, self.path)
            self.pending = None
            self.file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self.file.close()
        if self.pending is not None:  # no checkpoint of this run: the old metrics stay
            self.pending.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _rewrite(self, keep) -> None:
        """Atomically keep only the records whose step passes keep(step), read line by line."""
        if not self.path.exists():
            return
        tmp = _temp_beside(self.path)
        try:
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                for line in src:
                    if keep(_step_of(line)):
                        dst.write(line.rstrip(b"\r\n") + b"\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _temp_beside(path: Path) -> Path:
    """A new empty file .NAME.<random>.tmp beside path, with the usual permissions (not mkstemp's
    private ones: it will replace path)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return Path(tmp)


def _step_of(line: bytes) -> float:
    """The step of a record; infinity for a line that is not one (cut short by a crash, or not
    minimoe's), so a resume drops it."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return math.inf
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf
