"""What a training run measures and writes to OUT/metrics.jsonl (one JSON record per log interval):

    train_loss, train_loss_avg   the last and the mean LM loss since the previous record
    val_loss                     mean LM loss on held-out windows (at evaluations only)
    moe                          per MoE layer: expert load, dropped fraction, aux/z loss, entropy
and the yardstick printed at the start: the unigram loss, the best a model without context does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from minimoe import backend, data


def loss_summary(model, pending: list) -> dict:
    """The last and the mean of the LM losses kept on the device since the last record: one copy
    to the host (on a GPU every copy is a synchronisation)."""
    losses = backend.to_numpy(model.xp.stack(pending)).astype(np.float64)
    return {"train_loss": float(losses[-1]), "train_loss_avg": float(losses.mean())}


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


def prepare_metrics_file(path: Path, start: int):
    """A fresh run starts an empty metrics file; a resumed one drops records after its checkpoint
    (steps that were logged but not saved before an interruption, and are now redone)."""
    lines = path.read_text(encoding="utf-8").splitlines() if start > 0 and path.exists() else []
    keep = [line for line in lines if _step_of(line) <= start]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # a line cut short by a crash
        return math.inf
