"""Step time, communication share and bytes sent on P = 1, 2, 4 MPI ranks (a table for
docs/distributed.md): runs `python -m minimoe bench --ranks P --json` for each P.

    python benchmarks/dist_bench.py                      # mixtral preset, global batch 12 x 64
    python benchmarks/dist_bench.py --ranks 1 2 4 8 --preset deepseek --iters 20

The global batch is the same for every P (strong scaling: P ranks share the same work), each
rank with one BLAS thread. On a machine with fewer cores than ranks the ranks take turns on the
cores, and the time a rank waits for another inside MPI is counted as communication: read such
numbers as the behaviour of the code, not of a network.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(P, args):
    cmd = [sys.executable, "-m", "minimoe", "bench", "--ranks", str(P), "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--iters", str(args.iters), "--warmup", "2", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"--ranks {P} failed:\n{p.stderr}")
    return json.loads(p.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--preset", default="mixtral")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [run(P, args) for P in args.ranks]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    r0 = results[0]
    print(f"preset {r0['preset']}, {r0['dtype']}, global batch {r0['batch_size']} x {r0['block_size']}, "
          f"medians of {r0['iters']} steps, 1 BLAS thread per rank, cpu count {os.cpu_count()}\n")  # fmt: skip
    print("| P | mode | step ms | compute ms | comm ms | comm share | all-to-all MB/rank/step (measured / formula) "
          "| all-reduce MB/rank/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        a2a = "-"
        if r["all_to_all_bytes_formula"]:
            a2a = f"{r['all_to_all_bytes_per_rank'] / 1e6:.3f} / {r['all_to_all_bytes_formula'] / 1e6:.3f}"
        print(f"| {r['ranks']} | {r['mode'] if r['ranks'] > 1 else '-'} | {r['step_ms']:.1f} | {r['compute_ms']:.1f} "
              f"| {r['comm_ms']:.1f} | {r['comm_share']:.0%} | {a2a} | {r['allreduce_bytes_per_rank'] / 1e6:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
