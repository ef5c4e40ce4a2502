"""Plot a run's losses from its metrics.jsonl: training loss (mean per log line) and validation loss.

    python scripts/plot_run.py out/metrics.jsonl docs/img/default_run.png [--title TEXT]

Needs matplotlib. The README's figure of the default run is made this way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> list:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            sys.exit(f"error: {path}:{n} is not a JSON line")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--title", default="")
    p.add_argument("--unigram", type=float, default=None, help="draw the unigram baseline at this loss")
    args = p.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plotting needs matplotlib (pip install matplotlib)")
    rows = read_metrics(args.metrics)
    train = [(r["step"], r["train_loss_avg"]) for r in rows if "train_loss_avg" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(*zip(*train), lw=1, label="train (mean per 10 steps)")
    ax.plot(*zip(*val), "o-", label="validation (held-out 10%)")
    if args.unigram is not None:
        ax.axhline(args.unigram, ls="--", c="gray", lw=1, label=f"unigram baseline {args.unigram:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per character)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png)
    print(f"saved {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
