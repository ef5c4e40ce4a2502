"""`minimoe bench --ranks P`: one training step on P MPI ranks, split into computation and
communication, and the bytes each rank sends, checked against the formula.

    python -m minimoe bench --ranks 4 --preset mixtral      # launches mpiexec -n 4 itself

What is measured (medians over --iters steps after --warmup):
- step: wall time of train_step (forward, backward, gradient all-reduce, clipping, AdamW) on
  each rank, averaged over the ranks;
- communication: the time inside MPI calls (exchange.Group counts it, host staging copies
  included); waiting for a slower rank counts here too. computation = step - communication.
- bytes: what each rank sent to OTHER ranks per step, by kind: the all-to-alls of the expert-
  parallel MoE layers, the counts exchanged before them, and the all-reduces (gradients of the
  replicated parameters, routing statistics, losses).
The all-to-all bytes are checked twice: against the routing actually chosen (each MoE layer
moves every slot whose expert lives elsewhere out and back in the forward, and the same rows
again in the backward: 2 (out_r + in_r) C bytes per layer, before any capacity drop), and
against the formula for uniform routing, per rank and step:
    4 x (MoE layers) x N x K x C x (dtype bytes) x (P - 1) / P        N = B T / P tokens per rank
The workers run `python -m minimoe bench` with the same flags and --as-rank; rank 0 prints the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minimoe import dist
from minimoe.bench.timing import batch
from minimoe.errors import OptionError
from minimoe.model import GPT
from minimoe.optim import AdamW
from minimoe.train import train_step


def find_mpiexec() -> str:
    """The mpiexec of this environment (beside the Python, e.g. the mpich wheel's) or on PATH."""
    here = Path(sys.executable).with_name("mpiexec")
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if found is None:
        raise OptionError(
            "--ranks needs an MPI launcher (mpiexec), which was not found: pip install 'minimoe[dist]'"
        )
    return found


def launch(argv: list, ranks: int, threads: int) -> dict:
    """Run `minimoe bench ARGV --as-rank` on `ranks` MPI processes (each with `threads` BLAS
    threads); the result rank 0 prints. One rank is one plain process (no MPI), timed alike."""
    cmd = [sys.executable, "-m", "minimoe", "bench", *argv, "--as-rank"]
    if ranks > 1:
        try:
            import mpi4py  # noqa: F401  (optional: only the workers use it, but fail here, clearly)
        except ImportError:
            raise OptionError("--ranks needs mpi4py: pip install 'minimoe[dist]'") from None
        cmd = [find_mpiexec(), "-n", str(ranks), *cmd]
    threads_env = {v: str(threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **threads_env})
    errors = [line[len("error: ") :] for line in p.stderr.splitlines() if line.startswith("error: ")]
    if p.returncode == 2 and errors:  # the ranks' own one-line error (a bad layout, say)
        raise OptionError(errors[0])
    if p.returncode != 0:
        raise RuntimeError(f"the {ranks} benchmark ranks failed (status {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def _routing_bytes(model, w) -> int:
    """Bytes this rank's all-to-alls must send for the routing of the last step (before drops):
    per MoE layer 2 (out_r + in_r) C itemsize, out_r = own slots whose expert lives elsewhere,
    in_r = other ranks' slots for this rank's experts (gathered: n[s, d] slots of s for d)."""
    c, total = model.config, 0
    El = c.n_experts // w.size
    for st in model.stats["layers"]:
        dest = np.asarray(st["expert_idx"]).reshape(-1) // El
        n = w.group.allgather(np.bincount(dest, minlength=w.size))  # (P, P)
        out_r = n[w.rank].sum() - n[w.rank, w.rank]
        in_r = n[:, w.rank].sum() - n[w.rank, w.rank]
        total += 2 * int(out_r + in_r) * c.n_embd * np.dtype(model.dtype).itemsize
    return total


def measure(args, config) -> dict:
    """The benchmark on this rank (every rank runs it, or one process alone); rank 0 returns the
    summary, the others None. args: bench's options (batch_size, dtype, iters, warmup, parallel)."""
    w = dist.world()
    P, rank = (1, 0) if w is None else (w.size, w.rank)
    with dist.together(w):  # a layout error: one line from rank 0
        model = GPT(config, seed=0, dtype=args.dtype)
        opt = AdamW(model.params)
        mode = "data"
        if w is not None:
            dist.check_layout(args.batch_size, P)
            mode = dist.choose_mode(config, P, args.parallel)
            w.attach(model, opt, mode)
    with dist.guard(w):  # a failing rank stops them all
        return _time_steps(args, config, model, opt, w, mode)


def _time_steps(args, config, model, opt, w, mode) -> dict:
    P, rank = (1, 0) if w is None else (w.size, w.rank)
    x, y = batch(config, args.batch_size)
    steps, comm, sent, routed = [], [], {}, 0
    for i in range(args.warmup + args.iters):
        if w is not None:
            w.group.reset_traffic()
            w.comm.Barrier()
        t0 = time.perf_counter()
        train_step(model, opt, x, y, 1e-3, 1.0, world=w)
        t = time.perf_counter() - t0
        if i < args.warmup:
            continue
        steps.append(t)
        if w is not None:
            comm.append(sum(w.group.seconds.values()))
            for kind, n in w.group.bytes_sent.items():
                sent[kind] = sent.get(kind, 0) + n
            if mode == "expert":
                routed += _routing_bytes(model, w)
    local = np.array([np.median(steps), np.median(comm) if comm else 0.0])
    kinds = ("all_to_all", "counts", "allreduce")
    totals = np.array([sent.get(k, 0) for k in kinds] + [routed], dtype=np.int64)
    if w is not None:
        local = w.group.allgather(local).mean(axis=0)
        totals = w.group.allgather(totals).sum(axis=0)
    if rank != 0:
        return None
    N = args.batch_size * config.block_size // P
    moe_layers = sum(config.is_moe_block(i) for i in range(config.n_layer))
    itemsize = np.dtype(args.dtype).itemsize
    formula = (
        4 * moe_layers * N * config.top_k * config.n_embd * itemsize * (P - 1) / P if mode == "expert" else 0
    )
    per = P * args.iters  # per rank and step
    return {
        "ranks": P,
        "mode": mode,
        "preset": args.preset,
        "config": config.to_dict(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "block_size": config.block_size,
        "tokens_per_rank": N,
        "moe_layers": moe_layers,
        "iters": args.iters,
        "warmup": args.warmup,
        "library": None if w is None else w.library,
        "step_ms": float(local[0]) * 1e3,
        "comm_ms": float(local[1]) * 1e3,
        "compute_ms": float(local[0] - local[1]) * 1e3,
        "comm_share": float(local[1] / local[0]),
        "all_to_all_bytes_per_rank": float(totals[0] / per),
        "counts_bytes_per_rank": float(totals[1] / per),
        "allreduce_bytes_per_rank": float(totals[2] / per),
        "all_to_all_bytes_from_counts": float(totals[3] / per),
        "all_to_all_bytes_formula": float(formula),
    }


def format_table(r: dict) -> str:
    c = r["config"]
    how = "one process"
    if r["ranks"] > 1:
        how = f"{r['mode']} parallel on {r['ranks']} ranks ({r['library']})"
        if r["mode"] == "expert":
            how += f", {c['n_experts'] // r['ranks']} of {c['n_experts']} experts per rank"
    mb = 1e6
    lines = [
        f"minimoe bench --ranks {r['ranks']}: preset {r['preset']}, {r['dtype']}, global batch "
        f"B={r['batch_size']} x T={r['block_size']} ({r['tokens_per_rank']} tokens per rank), {how}",
        f"step {r['step_ms']:.1f} ms = computation {r['compute_ms']:.1f} ms + communication {r['comm_ms']:.1f} ms "
        f"({r['comm_share']:.0%}); medians of {r['iters']} steps, averaged over the ranks",
    ]
    if r["mode"] == "expert" and r["ranks"] > 1:
        ratio = r["all_to_all_bytes_per_rank"] / r["all_to_all_bytes_formula"]
        lines.append(
            f"all-to-all sent per rank per step: {r['all_to_all_bytes_per_rank'] / mb:.3f} MB measured, "
            f"{r['all_to_all_bytes_from_counts'] / mb:.3f} MB from the routing chosen, "
            f"{r['all_to_all_bytes_formula'] / mb:.3f} MB by the formula "
            f"4 x {r['moe_layers']} layers x N x K x C x bytes x (P-1)/P for uniform routing (measured/formula {ratio:.2f})"
        )
    if r["ranks"] > 1:
        lines.append(
            f"all-reduce sent per rank per step: {r['allreduce_bytes_per_rank'] / mb:.3f} MB "
            f"(gradients of the replicated parameters, statistics); counts {r['counts_bytes_per_rank']:.0f} B"
        )
    return "\n".join(lines)
