"""The speed targets of docs/speed.md, measured several times: minimoe vs PyTorch eager.

    PYTHONPATH=. python benchmarks/targets.py            # 3 runs of each target, ~10 minutes
    PYTHONPATH=. python benchmarks/targets.py --runs 1 --only laptop-dense

Each run is a fresh `python -m minimoe bench --vs-torch --json` process (minimoe and torch
alternating step by step inside it). On a machine shared with other work, single runs wander by
10-20 %; the median over runs of each run's median is what we quote, with the range beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGE = ["--n-layer", "6", "--n-embd", "384", "--n-head", "6", "--block-size", "256", "--batch-size", "16"]
TARGETS = {
    "laptop-mixtral": ["--preset", "mixtral", "--iters", "20"],
    "laptop-dense": ["--preset", "dense", "--iters", "20"],
    "large-mixtral": ["--preset", "mixtral", *LARGE, "--iters", "6", "--warmup", "1"],
}


def run_once(args: list) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "minimoe", "bench", "--vs-torch", "--json", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", choices=list(TARGETS))
    args = p.parse_args(argv)
    print(
        "| target | minimoe step ms | torch step ms | step ratio (range) | fwd | bwd | opt "
        "| MFU minimoe | peak MB minimoe / torch (ratio) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, bench_args in TARGETS.items():
        if args.only and name != args.only:
            continue
        rs = [run_once(bench_args) for _ in range(args.runs)]
        ratios = [r["ratio"]["step_ms"] for r in rs]
        m, t, q = (functools.partial(_median, rs, who) for who in ("minimoe", "torch", "ratio"))
        print(
            f"| {name} | {m('step_ms'):.1f} | {t('step_ms'):.1f} "
            f"| {np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {q('forward_ms'):.2f} | {q('backward_ms'):.2f} | {q('optimizer_ms'):.2f} | {m('mfu'):.0%} "
            f"| {m('rss_mb'):.0f} / {t('rss_mb'):.0f} ({q('rss_mb'):.2f}) |",
            flush=True,
        )


def _median(results: list, who: str, key: str) -> float:
    return float(np.median([r[who][key] for r in results]))


if __name__ == "__main__":
    main()
