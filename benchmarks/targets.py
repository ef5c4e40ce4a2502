"""The speed targets of docs/speed.md, measured several times: minimoe vs PyTorch eager.

    PYTHONPATH=. python benchmarks/targets.py --runs 5       # every target, ~15 minutes
    PYTHONPATH=. python benchmarks/targets.py --runs 1 --only laptop-dense

Each run is a fresh `python -m minimoe bench --vs-torch --json` process (minimoe and torch
alternating step by step inside it), with minimoe's default threads (minimoe/threads.py) and
torch given the same number (--threads N fixes it for both). On a machine shared with other
work, single runs wander by 10-20 %; the median over runs of each run's median is what we
quote, with the range beside it.

The targets: laptop size = nanoGPT's laptop model (4 layers, 4 heads, C = 128, T = 64, B = 12):
  laptop-mixtral   the `mixtral` preset: 8 SwiGLU experts of F = 256, top-2
  laptop-dense     the `dense` preset: one SwiGLU MLP of F = 512 (the same active weights)
  laptop-gpt2      the `dense` preset in the gpt2 flavour: LayerNorm, GELU MLP of F = 4C, learned
                   positions, tied embeddings, biases: nanoGPT's own architecture at its laptop
                   settings (vocabulary 256 here, 65 in nanoGPT's Shakespeare run)
  large-mixtral    `mixtral` at 6 layers, C = 384, 6 heads, T = 256, B = 16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGE = ["--n-layer", "6", "--n-embd", "384", "--n-head", "6", "--block-size", "256", "--batch-size", "16"]
TARGETS = {
    "laptop-mixtral": ["--preset", "mixtral", "--iters", "20"],
    "laptop-dense": ["--preset", "dense", "--iters", "20"],
    "laptop-gpt2": ["--preset", "dense", "--flavour", "gpt2", "--iters", "20"],
    "large-mixtral": ["--preset", "mixtral", *LARGE, "--iters", "6", "--warmup", "1"],
}


def run_once(args: list, threads=None) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)  # minimoe chooses (or --threads); torch gets the same number
    cmd = [sys.executable, "-m", "minimoe", "bench", "--vs-torch", "--json", *args]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", choices=list(TARGETS))
    p.add_argument("--threads", type=int, help="threads for both (default: minimoe's choice, torch the same)")
    args = p.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {args.runs} runs per target\n")  # fmt: skip
    print(
        "| target | minimoe step ms | torch step ms | step ratio (range) | fwd | bwd | opt "
        "| MFU minimoe / torch | peak MB minimoe / torch (ratio) | threads |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, bench_args in TARGETS.items():
        if args.only and name != args.only:
            continue
        rs = [run_once(bench_args, args.threads) for _ in range(args.runs)]
        ratios = [r["ratio"]["step_ms"] for r in rs]
        m, t, q = (functools.partial(_median, rs, who) for who in ("minimoe", "torch", "ratio"))
        print(
            f"| {name} | {m('step_ms'):.1f} | {t('step_ms'):.1f} "
            f"| {np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {q('forward_ms'):.2f} | {q('backward_ms'):.2f} | {q('optimizer_ms'):.2f} "
            f"| {m('mfu'):.0%} / {t('mfu'):.0%} | {m('rss_mb'):.0f} / {t('rss_mb'):.0f} ({q('rss_mb'):.2f}) "
            f"| {'; '.join(sorted({r['threads_chosen'] for r in rs}))} |",
            flush=True,
        )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _median(results: list, who: str, key: str) -> float:
    return float(np.median([r[who][key] for r in results]))


if __name__ == "__main__":
    main()
