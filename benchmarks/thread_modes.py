"""Ways of using the cores for one training step, side by side: the check behind minimoe/threads.py.

    PYTHONPATH=. python benchmarks/thread_modes.py                      # laptop mixtral, B=12
    PYTHONPATH=. python benchmarks/thread_modes.py --preset dense
    PYTHONPATH=. python benchmarks/thread_modes.py --n-embd 384 --n-head 6 --block-size 256 --batch-size 16

Times the same step (one model, one batch) in three ways, alternating step by step in one
process so that a change in machine load hits them alike:
    1 thread        BLAS 1 thread, everything in order
    BLAS N          BLAS splits every matrix product over N threads (OpenBLAS's default)
    experts side    BLAS 1 thread; the experts of an MoE layer and the attention's batch rows
    by side         run on N Python threads (ops/parallel.py)
and prints the median step time and CPU time of each, and which one minimoe's automatic choice
would take on an idle machine. N = the CPUs this process may use (--threads to change it).
Run it on a quiet machine: the point is what the cores give when they are free.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimoe import threads  # noqa: E402
from minimoe.bench.timing import make_config, minimoe_step  # noqa: E402
from minimoe.ops import parallel  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mixtral")
    p.add_argument("--batch-size", type=int, default=12)
    for name in ("n_layer", "n_embd", "n_head", "block_size", "n_experts", "top_k"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--threads", type=int, default=threads.cpu_cores())
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    sizes = {k: getattr(args, k) for k in ("n_layer", "n_embd", "n_head", "block_size", "n_experts", "top_k")}
    config = make_config(args.preset, **sizes)
    n, tokens = args.threads, args.batch_size * config.block_size
    modes = {"1 thread": (1, 1), f"BLAS {n}": (n, 1)}
    if config.n_experts:
        modes["experts side by side"] = (1, n)
    step = minimoe_step(config, args.batch_size)
    for blas, workers in modes.values():
        threads.blas_threads(blas)
        parallel.set_workers(workers)
        step(), step()
    wall = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    load = os.getloadavg()
    for i in range(args.iters):
        for m in list(modes) if i % 2 == 0 else list(modes)[::-1]:
            threads.blas_threads(modes[m][0])
            parallel.set_workers(modes[m][1])
            time.sleep(0.15)  # OpenBLAS's threads spin ~0.1 s after a call: let them settle
            c0 = time.process_time()
            wall[m].append(sum(step()))
            cpu[m].append(time.process_time() - c0)
    print(f"{config.name}: B={args.batch_size} T={config.block_size} C={config.n_embd}; typical product "
          f"{threads.matmul_flops(config, tokens) / 1e6:.1f} MFLOP; {time.strftime('%Y-%m-%d %H:%M')}; load "
          f"average {' '.join(f'{x:.2f}' for x in load)} before, "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after; medians of {args.iters} steps\n")  # fmt: skip
    base = np.median(wall["1 thread"])
    print("| mode | step ms | CPU ms per step | speed-up over 1 thread |\n|---|---:|---:|---:|")
    for m in modes:
        w = np.median(wall[m])
        print(f"| {m} | {w * 1e3:.1f} | {np.median(cpu[m]) * 1e3:.1f} | {base / w:.2f} |")
    rule = threads.split_threads(n, config, tokens)
    chosen = "experts side by side" if rule.workers > 1 else f"BLAS {n}" if rule.blas > 1 else "1 thread"
    print(f"\nminimoe's rule on an idle machine: {chosen}")


if __name__ == "__main__":
    main()
