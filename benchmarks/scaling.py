"""How a minimoe training step grows with tokens per batch, number of experts and top-k.

    PYTHONPATH=. python benchmarks/scaling.py             # minimoe only
    PYTHONPATH=. python benchmarks/scaling.py --vs-torch  # with the PyTorch eager twin, side by side

Starts from the `mixtral` preset at the laptop size (4 layers, 128 wide, 4 heads, 8 experts of
F = 256, top-2, T = 64, batch 12) and changes one thing at a time:
  - tokens per batch (the batch size B at T = 64): the step should grow about linearly;
  - the number of experts E at top-2: FLOPs per token stay the same (each token still visits 2
    experts of the same size), so only the per-expert overhead and the optimizer (which updates
    every expert's weights) should grow;
  - top-k at E = 8: each extra expert per token adds a third of a dense FFN's FLOPs per token.
Prints Markdown tables of median step times (ms), tokens/s and, with --vs-torch, the ratio
minimoe / torch (<= 1.0: minimoe is at least as fast). The timing is that of `minimoe bench`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimoe import bench, threads  # noqa: E402

BASE = dict(preset="mixtral", batch_size=12)
SWEEPS = {
    "tokens per batch (batch size B at T = 64)": ("batch_size", [3, 6, 12, 24, 48]),
    "experts E (top-2)": ("n_experts", [2, 4, 8, 16, 32]),
    "top-k (E = 8)": ("top_k", [1, 2, 4, 8]),
}


def measure(batch_size, iters, warmup, vs_torch, threads_given=None, **overrides) -> dict:
    """Median step times of one configuration (and of the torch twin when asked), with the
    threads minimoe chooses for it (or threads_given); torch gets the same number."""
    config = bench.make_config(BASE["preset"], **overrides)
    choice = threads.apply(threads_given, config, batch_size * config.block_size)
    if vs_torch:
        import torch

        torch.set_num_threads(choice.threads)
    steps = {"minimoe": bench.minimoe_step(config, batch_size)}
    if vs_torch:
        steps["torch"] = bench.torch_step(config, batch_size, like=steps["minimoe"].model)
    times = bench.time_steps(steps, iters, warmup)
    tokens = batch_size * config.block_size
    flops = bench.count_params(config)["train_flops_per_token"] * tokens
    return {n: dict(bench.summarize(t, tokens, flops, 1.0), flops=flops, threads=choice.describe())
            for n, t in times.items()}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vs-torch", action="store_true")
    p.add_argument("--threads", type=int, help="for both (default: minimoe's choice per configuration)")
    args = p.parse_args(argv)
    print(f"mixtral preset, laptop size, float32, medians of {args.iters} steps; "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    chosen = set()
    for title, (field, values) in SWEEPS.items():
        head = f"| {field} | tokens/step | GFLOP/step | minimoe ms | tokens/s |"
        rule = "|---:|---:|---:|---:|---:|"
        if args.vs_torch:
            head, rule = head + " torch ms | minimoe/torch |", rule + "---:|---:|"
        print(f"**{title}**\n\n{head}\n{rule}")
        for v in values:
            kw = {field: v}
            B = kw.pop("batch_size", BASE["batch_size"])
            r = measure(B, args.iters, args.warmup, args.vs_torch, args.threads, **kw)
            m = r["minimoe"]
            chosen.add(f"{field} = {v}: {m['threads']}")
            row = (
                f"| {v} | {B * 64} | {m['flops'] / 1e9:.1f} | {m['step_ms']:.1f} | {m['tokens_per_s']:,.0f} |"
            )
            if args.vs_torch:
                row += f" {r['torch']['step_ms']:.1f} | {m['step_ms'] / r['torch']['step_ms']:.2f} |"
            print(row, flush=True)
        print()
    print("threads:\n" + "\n".join(sorted(chosen)))


if __name__ == "__main__":
    main()
