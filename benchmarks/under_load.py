"""A training step beside busy neighbours: OpenBLAS's default threads against minimoe's choice.

    PYTHONPATH=. python benchmarks/under_load.py               # mixtral, B=12, T=64: a few minutes
    PYTHONPATH=. python benchmarks/under_load.py --preset dense --steps 10

For 0, 1 and 2 neighbours (processes that each keep one core busy with a Python loop, started
and stopped here), times the laptop-size training step in fresh processes, for
  old: NumPy's BLAS with its default thread count (one per core) and nothing else: what minimoe
       did before it chose its threads (no OPENBLAS_NUM_THREADS in the environment);
  new: minimoe's automatic choice (minimoe/threads.py), made when the process starts, so it sees
       the neighbours that are already running.
Prints a Markdown table of median step times and each one's slowdown against its own time
alone. The old and new processes alternate, `--repeats` times each; the medians pool their steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
BURN = "while True:\n    pass\n"


def child(args) -> None:
    """Time `args.steps` steps in this process and print one JSON line."""
    from minimoe import threads
    from minimoe.bench.timing import make_config, minimoe_step

    config = make_config(args.preset)
    how = "OpenBLAS default"
    if args.child == "new":
        how = threads.apply(None, config, args.batch_size * config.block_size).describe()
    step = minimoe_step(config, args.batch_size)
    for _ in range(args.warmup):
        step()
    times = [sum(step()) for _ in range(args.steps)]
    print(json.dumps({"times_ms": [t * 1e3 for t in times], "how": how, "blas": threads.blas_threads()}))


def run_child(mode: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--preset", args.preset]
    cmd += ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mixtral")
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--steps", type=int, default=10, help="timed steps per process (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="processes per default and load (default 2)")
    p.add_argument("--neighbours", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    print(f"{args.preset} preset, B={args.batch_size}, {args.steps} steps per process after {args.warmup}, "
          f"{args.repeats} processes each; {os.cpu_count()} CPUs; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {time.strftime('%Y-%m-%d %H:%M')}\n")  # fmt: skip
    results = {}  # (mode, neighbours) -> {"times": [...], "how": {...}}
    for n in args.neighbours:
        burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(n)]
        try:
            time.sleep(1.0)  # the neighbours are running before the step's process starts
            for _ in range(args.repeats):
                for mode in ("old", "new"):
                    r = run_child(mode, args)
                    slot = results.setdefault((mode, n), {"times": [], "how": set()})
                    slot["times"] += r["times_ms"]
                    slot["how"].add(r["how"])
        finally:
            for b in burners:
                b.terminate()
            for b in burners:
                b.wait()
        time.sleep(1.0)

    head = "| default | " + " | ".join(f"{n} busy: step ms (x alone)" for n in args.neighbours) + " |"
    print(head + "\n|---|" + "---:|" * len(args.neighbours))
    for mode in ("old", "new"):
        alone = np.median(results[(mode, args.neighbours[0])]["times"])
        cells = []
        for n in args.neighbours:
            med = float(np.median(results[(mode, n)]["times"]))
            cells.append(f"{med:.1f} ({med / alone:.1f}x)")
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print("\nthreads chosen by the new default:")
    for n in args.neighbours:
        print(f"  {n} busy: " + "; ".join(sorted(results[("new", n)]["how"])))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
