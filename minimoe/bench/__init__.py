"""`minimoe bench`: how fast is a training step, and how does it compare with PyTorch?

    python -m minimoe bench                                  # mixtral preset, batch 12
    python -m minimoe bench --preset dense --vs-torch        # side by side with PyTorch eager
    python -m minimoe bench --n-layer 6 --n-embd 384 --n-head 6 --block-size 256 --batch-size 16
    python -m minimoe bench --json                           # one JSON object instead of a table
    python -m minimoe bench --ranks 4                        # on 4 MPI ranks: compute vs communication

What is measured, and how:
- forward, backward and optimizer step (AdamW) timed separately with time.perf_counter; each
  figure is the MEDIAN over --iters steps after --warmup steps (medians shrug off the odd step
  slowed by another process). `step` is the median of the per-step sums.
- tokens/s = B*T / step time.
- FLOPs per step = count_params(config)["train_flops_per_token"] * B * T: PaLM's count, 6 per
  active matmul weight per token (forward 2, backward 4) plus the attention scores and their
  weighted sum (the full T x T square, which is what both implementations compute).
- MFU (model FLOPs utilisation) = FLOPs per step / step time / PEAK, where PEAK is this
  machine's float matmul speed measured in the same run: the median GFLOP/s of a 2048^3 NumPy
  matmul (sgemm for float32) with the same number of threads, timed once per round between
  the training steps (so it sees the same machine load as they do).
- peak memory: each framework trains a few steps in a fresh subprocess (bench/memory.py).
- --vs-torch runs a PyTorch eager model of the same architecture, sizes, dtype, weights and
  thread count (bench/torch_twin.py, which needs `pip install 'minimoe[compare]'`) in the same
  process, alternating steps with minimoe so both see the same machine load; ratio = minimoe /
  torch (<= 1.0: minimoe is at least as fast, or as small).
Threads: NumPy's BLAS thread count is set with threadpoolctl when installed, else through
OpenBLAS's own C function (bench/threads.py); torch.set_num_threads gets the same number.

The package: timing.py (the runners and the loop that alternates them), memory.py, threads.py,
torch_twin.py, ranks.py (--ranks: the step on P MPI ranks, its communication and bytes), and
here the command: its options, `run` (everything it reports, as a dict) and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from minimoe import dist
from minimoe.backend import DTYPES
from minimoe.bench import ranks
from minimoe.bench.memory import peak_memory
from minimoe.bench.threads import blas_threads
from minimoe.bench.timing import (
    PHASES,
    load_twin,
    make_config,
    matmul_timer,
    minimoe_step,
    summarize,
    time_steps,
    torch_step,
)
from minimoe.errors import OptionError, UserError
from minimoe.options import PARALLEL, check, check_choice, check_int
from minimoe.presets import count_params, toy_presets

__all__ = [
    "blas_threads",
    "build_parser",
    "count_params",
    "load_twin",
    "main",
    "make_config",
    "minimoe_step",
    "peak_memory",
    "run",
    "summarize",
    "time_steps",
    "torch_step",
]

# the preset's fields that a flag of the same name (--n-layer for n_layer) may replace
SIZES = (
    "block_size",
    "n_layer",
    "n_embd",
    "n_head",
    "n_kv_head",
    "n_experts",
    "top_k",
    "expert_hidden",
    "ffn_hidden",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump (the CLI's convention)
        raise OptionError(f"{message} (see `minimoe bench --help`)")


def build_parser():
    p = _Parser(prog="minimoe bench", description="Time a training step (forward, backward, AdamW).")
    p.add_argument(
        "--preset", default="mixtral", help=f"a toy preset: {', '.join(toy_presets())} (default mixtral)"
    )
    p.add_argument("--batch-size", type=int, default=12, metavar="B", help="batch size (default 12)")
    p.add_argument("--block-size", type=int, metavar="T", help="sequence length (default: the preset's)")
    for field in SIZES[1:]:
        p.add_argument(
            "--" + field.replace("_", "-"), type=int, metavar="N", help="replace the preset's value"
        )
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (default float32)")
    p.add_argument("--iters", type=int, default=20, metavar="N", help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps first (default 3)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="BLAS / torch threads (default: NumPy's current BLAS threads)",
    )
    p.add_argument("--vs-torch", action="store_true", help="also time a PyTorch eager twin, side by side")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--ranks",
        type=int,
        metavar="P",
        help="time the step on P MPI ranks (launches mpiexec; 1 thread each unless --threads): "
        "computation vs communication, and the bytes sent against the formula",
    )
    p.add_argument(
        "--parallel", choices=PARALLEL, default="auto", help="with --ranks: auto (default), data or expert"
    )
    p.add_argument("--as-rank", action="store_true", help=argparse.SUPPRESS)  # one of the launched ranks
    return p


def check_args(args) -> None:
    """OptionError naming the first flag whose value is invalid."""
    toy = toy_presets()
    check(args.preset in toy, "preset", args.preset, f"it must be a toy preset: {', '.join(toy)}")
    check_choice("dtype", args.dtype, DTYPES)
    for name in ("batch_size", "iters", *SIZES):
        if getattr(args, name) is not None:
            check_int(name, getattr(args, name), lo=1)
    check_int("warmup", args.warmup, lo=0)
    if args.threads is not None:
        check_int("threads", args.threads, lo=1)
    if args.ranks is not None:
        check_int("ranks", args.ranks, lo=1)
        check(not args.vs_torch, "vs_torch", True, "--vs-torch and --ranks cannot be combined")


def bench_config(args):
    """The preset's Config with the sizes given on the command line; only those change (a GQA
    preset keeps its key/value heads when --n-head alone is given)."""
    return make_config(args.preset, **{name: getattr(args, name) for name in SIZES})


def run(args) -> dict:
    """Everything `main` reports, as a dict (see the JSON output)."""
    check_args(args)
    config = bench_config(args)
    torch = None
    if args.vs_torch:
        load_twin()  # OptionError now, before any timing, when PyTorch is missing
        import torch
    threads = args.threads or blas_threads() or os.cpu_count()
    numpy_threads = blas_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)

    B, T = args.batch_size, config.block_size
    tokens = B * T
    counts = count_params(config)
    flops = counts["train_flops_per_token"] * tokens
    matmul = matmul_timer(args.dtype)
    steps = {"minimoe": minimoe_step(config, B, args.dtype)}
    if torch is not None:
        steps["torch"] = torch_step(config, B, args.dtype, like=steps["minimoe"].model)
    times = time_steps({**steps, "matmul": matmul}, args.iters, args.warmup)
    peak = matmul.flops / float(np.median(times.pop("matmul")[:, 0])) / 1e9
    result = {
        "preset": args.preset,
        "config": config.to_dict(),
        "dtype": args.dtype,
        "batch_size": B,
        "block_size": T,
        "tokens_per_step": tokens,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "flops_per_step": flops,
        "threads": threads,
        "numpy_blas_threads": numpy_threads,
        "torch_threads": torch.get_num_threads() if torch else None,
        "matmul_peak_gflops": peak,
        "iters": args.iters,
        "warmup": args.warmup,
    }
    for name, t in times.items():
        result[name] = summarize(t, tokens, flops, peak)
        result[name]["step_times_ms"] = [round(x * 1e3, 3) for x in t.sum(axis=1)]
        if not args.no_memory:
            result[name].update(peak_memory(name, config, B, args.dtype, threads))
    if "torch" in result:
        m, t = result["minimoe"], result["torch"]
        keys = (*(f"{p}_ms" for p in PHASES), "step_ms", "rss_mb")
        result["ratio"] = {k: m[k] / t[k] for k in keys if m.get(k) and t.get(k)}
    return result


def format_table(r: dict) -> str:
    """The result of `run` as the table `minimoe bench` prints."""
    c = r["config"]
    moe = f", {c['n_experts']} experts top-{c['top_k']}" if c["n_experts"] else ", dense"
    heads = f"{c['n_head']} heads" + (
        f" ({c['n_kv_head']} key/value)" if c["n_kv_head"] != c["n_head"] else ""
    )
    torch_threads = f", torch {r['torch_threads']}" if r["torch_threads"] else ""
    lines = [
        f"minimoe bench: preset {r['preset']}, {r['dtype']}, B={r['batch_size']} T={r['block_size']} "
        f"({r['tokens_per_step']} tokens/step), {c['n_layer']} layers, C={c['n_embd']}, {heads}{moe}",
        f"params {r['params_total'] / 1e6:.2f}M total, {r['params_active'] / 1e6:.2f}M active per token; "
        f"train FLOPs/step {r['flops_per_step'] / 1e9:.2f} G (count_params)",
        f"threads {r['threads']} (numpy BLAS {r['numpy_blas_threads']}{torch_threads}); "
        f"matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s (numpy 2048^3, median of {r['iters']})",
        f"medians of {r['iters']} steps after {r['warmup']} warm-up"
        + (", minimoe, torch and the peak matmul" if "torch" in r else ", minimoe and the peak matmul")
        + " alternating",
        "",
    ]
    names = [n for n in ("minimoe", "torch") if n in r]
    lines.append(
        f"{'':18s}" + "".join(f"{n:>12s}" for n in names) + ("   minimoe/torch" if "ratio" in r else "")
    )
    rows = [
        ("forward ms", "forward_ms", ".1f"),
        ("backward ms", "backward_ms", ".1f"),
        ("optimizer ms", "optimizer_ms", ".1f"),
        ("step ms", "step_ms", ".1f"),
        ("tokens/s", "tokens_per_s", ",.0f"),
        ("MFU %", "mfu", ".1%"),
        ("peak memory MB", "rss_mb", ".1f"),
        ("  numpy arrays MB", "traced_mb", ".1f"),
    ]
    for label, key, fmt in rows:
        if not any(r[n].get(key) is not None for n in names):
            continue
        cells = ["-" if r[n].get(key) is None else format(r[n][key], fmt) for n in names]
        ratio = r.get("ratio", {}).get(key)
        line = f"{label:18s}" + "".join(f"{s.rstrip('%'):>12s}" for s in cells)
        lines.append(line + (f"{ratio:16.2f}" if ratio is not None else ""))
    return "\n".join(lines)


def run_ranks(args, argv: list):
    """--ranks P: the step on P MPI ranks (ranks.launch starts them; each runs this with
    --as-rank and measures; rank 0 returns the result, the others None)."""
    if args.as_rank:
        return ranks.measure(args, bench_config(args))
    return ranks.launch([a for a in argv], args.ranks, args.threads or 1)


def main(argv=None) -> int:
    """`minimoe bench [options]`; returns the exit status (0 ok, 2 for a user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        if args.ranks is not None:
            check_args(args)
            result = run_ranks(args, argv)
            if result is None:  # a rank other than 0
                return 0
            print(json.dumps(result) if args.json or args.as_rank else ranks.format_table(result))
            return 0
        result = run(args)
    except UserError as e:
        if dist.is_rank0():
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
