"""How much of the MoE layer's time goes to moving token-slots around (dispatch and combine)?

Times one MoE layer, forward + backward (layers/moe.py: moe_forward / moe_backward), and inside it the
four data-movement steps of ops/experts.py -- dispatch_forward, combine_forward,
combine_backward, dispatch_backward -- against the experts' own matmuls and the router. Reports
medians over repeated runs after warm-up.

    PYTHONPATH=. python benchmarks/moe_dispatch.py            # N=4096 C=256 E=8 K=2 F=512, float32
    PYTHONPATH=. python benchmarks/moe_dispatch.py --json
    OPENBLAS_NUM_THREADS=2 taskset -c 0,1 python benchmarks/moe_dispatch.py   # pin to 2 cores

F = 512 = 2C is the toy `mixtral` preset's expert width ratio (F = 256 at C = 128; Mixtral 8x7B
itself has 3.5C): a realistically sized expert, so the share measured is what a layer of this
shape sees. Under a busy machine, compare OPENBLAS_NUM_THREADS=1 and 2.
Legend: N tokens, C channels, E experts, K experts per token, F expert hidden size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minimoe import backend  # noqa: E402
from minimoe.config import Config  # noqa: E402
from minimoe.layers import moe  # noqa: E402
from minimoe.ops import experts  # noqa: E402

DISPATCH_COMBINE = ("dispatch_forward", "combine_forward", "combine_backward", "dispatch_backward")
EXPERTS = ("experts_forward", "experts_backward")


def _sync(xp):
    if xp is not numpy:
        xp.cuda.Device().synchronize()


def instrument(times: dict, xp):
    """Wrap the ops in ops/experts.py (layers/moe.py calls them through the module) so each call adds
    its wall time to times[name]."""
    for name in DISPATCH_COMBINE + EXPERTS:
        fn = getattr(experts, name)

        def timed(*args, _fn=fn, _name=name, **kw):
            _sync(xp)
            t0 = time.perf_counter()
            out = _fn(*args, **kw)
            _sync(xp)
            times[_name] += time.perf_counter() - t0
            return out

        setattr(experts, name, timed)


def run(args) -> dict:
    backend.set_backend(args.backend)
    xp = backend.get_xp()
    N, C, E, K, F = args.tokens, args.channels, args.experts, args.top_k, args.hidden
    c = Config(
        flavour="llama",
        n_layer=1,
        n_head=4,
        n_embd=C,
        n_experts=E,
        top_k=K,
        expert_hidden=F,
        activation=args.activation,
        capacity_factor=args.capacity_factor,
        aux_loss_coef=0.01,
        z_loss_coef=1e-3,
    )
    rng = numpy.random.default_rng(args.seed)
    pre = "moe."
    p = moe.init_params(c, pre, rng, 0.02, 0.02 / math.sqrt(2))
    p = {k: backend.to_device(v, xp, args.dtype) for k, v in p.items()}
    h = backend.to_device(rng.standard_normal((1, N, C)), xp, args.dtype)
    dy = backend.to_device(rng.standard_normal((1, N, C)), xp, args.dtype)

    times = {name: 0.0 for name in DISPATCH_COMBINE + EXPERTS}
    instrument(times, xp)
    runs = []
    for i in range(args.warmup + args.repeats):
        for name in times:
            times[name] = 0.0
        _sync(xp)
        t0 = time.perf_counter()
        _, cache, stats = moe.moe_forward(c, h, p, {}, pre, None, False)
        grads = {}
        moe.moe_backward(c, dy, cache, pre, grads)
        _sync(xp)
        total = time.perf_counter() - t0
        if i >= args.warmup:
            runs.append(dict(times, total=total))

    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    dc = statistics.median(sum(r[k] for k in DISPATCH_COMBINE) for r in runs)
    ex = statistics.median(sum(r[k] for k in EXPERTS) for r in runs)
    counts = backend.to_numpy(stats["tokens_per_expert"])
    M = int(counts.sum()) if not args.capacity_factor else int(round((1 - stats["dropped_fraction"]) * N * K))
    mats = 3 if args.activation == "swiglu" else 2
    expert_flops = 3 * 2 * M * C * F * mats  # forward 2*M*C*F per matrix, backward twice that
    return {
        "config": dict(
            tokens=N,
            channels=C,
            experts=E,
            top_k=K,
            hidden=F,
            activation=args.activation,
            capacity_factor=args.capacity_factor,
            dtype=args.dtype,
            backend=args.backend,
            repeats=args.repeats,
            warmup=args.warmup,
            threads=os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"),
            cpu_count=os.cpu_count(),
            machine=platform.machine(),
        ),
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "dispatch_combine_ms": 1e3 * dc,
        "experts_ms": 1e3 * ex,
        "dispatch_combine_share": dc / med["total"],
        "experts_share": ex / med["total"],
        "expert_gflops": expert_flops / ex / 1e9,
        "tokens_per_expert": counts.tolist(),
    }


def print_table(r: dict):
    cfg, ms = r["config"], r["median_ms"]
    print(
        f"MoE layer forward+backward: N={cfg['tokens']} C={cfg['channels']} E={cfg['experts']} "
        f"K={cfg['top_k']} F={cfg['hidden']} {cfg['activation']} {cfg['dtype']} on {cfg['backend']} "
        f"(threads={cfg['threads'] or 'default'}, {cfg['cpu_count']} cpus); "
        f"median of {cfg['repeats']} runs after {cfg['warmup']} warm-up"
    )
    total = ms["total"]
    print(f"{'part':<22}{'ms':>10}{'share':>9}")
    for k in DISPATCH_COMBINE:
        print(f"  {k:<20}{ms[k]:>10.2f}{ms[k] / total:>9.1%}")
    print(f"{'dispatch+combine':<22}{r['dispatch_combine_ms']:>10.2f}{r['dispatch_combine_share']:>9.1%}")
    for k in EXPERTS:
        print(f"  {k:<20}{ms[k]:>10.2f}{ms[k] / total:>9.1%}")
    rest = total - r["dispatch_combine_ms"] - r["experts_ms"]
    print(f"{'router, losses, rest':<22}{rest:>10.2f}{rest / total:>9.1%}")
    print(f"{'whole MoE layer':<22}{total:>10.2f}{1:>9.1%}")
    print(f"experts run at {r['expert_gflops']:.1f} GFLOP/s; tokens per expert {r['tokens_per_expert']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="N = B*T tokens (default 4096)")
    ap.add_argument("--channels", type=int, default=256, help="C (default 256)")
    ap.add_argument("--experts", type=int, default=8, help="E (default 8)")
    ap.add_argument("--top-k", type=int, default=2, help="K (default 2)")
    ap.add_argument("--hidden", type=int, default=512, help="F, each expert's hidden size (default 512)")
    ap.add_argument("--activation", default="swiglu", choices=["swiglu", "gelu", "gelu_exact"])
    ap.add_argument("--capacity-factor", type=float, default=0.0, help="0 = dropless (default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--repeats", type=int, default=20, help="timed runs (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    for name in ("tokens", "channels", "experts", "top_k", "hidden", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        ap.error(f"--top-k must be at most --experts = {args.experts}, got {args.top_k}")
    if args.channels % 4:
        ap.error(f"--channels must be divisible by 4 (the layer's config uses 4 heads), got {args.channels}")
    try:
        r = run(args)
    except backend.BackendError as e:
        ap.exit(2, f"error: {e}\n")
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_table(r)


if __name__ == "__main__":
    main()
