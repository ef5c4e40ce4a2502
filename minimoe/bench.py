"""`minimoe bench`: how fast is a training step, and how does it compare with PyTorch?

    python -m minimoe bench                                  # mixtral preset, batch 12
    python -m minimoe bench --preset dense --vs-torch        # side by side with PyTorch eager
    python -m minimoe bench --n-layer 6 --n-embd 384 --n-head 6 --block-size 256 --batch-size 16
    python -m minimoe bench --json                           # one JSON object instead of a table

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
- peak memory: each framework trains a few steps in a fresh subprocess; we report the growth of
  the process's peak resident set size (VmHWM in /proc/self/status on Linux, else getrusage's
  ru_maxrss) over its size just after the imports: weights, gradients, optimizer state,
  activations and temporaries, seen the same way for NumPy and PyTorch. For minimoe we also
  give tracemalloc's peak (NumPy reports every array buffer to tracemalloc): the exact bytes of
  the arrays alive at the worst moment.
- --vs-torch runs a PyTorch eager model of the same architecture, sizes, dtype, weights and
  thread count (benchmarks/torch_reference.py) in the same process, alternating steps with
  minimoe so both see the same machine load; ratio = minimoe / torch (<= 1.0: minimoe is at
  least as fast, or as small).
Threads: NumPy's BLAS thread count is set with threadpoolctl when installed, else through
OpenBLAS's own C function; torch.set_num_threads gets the same number. NumPy's elementwise
operations always run on one thread.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minimoe.cli import _int_at_least
from minimoe.config import Config
from minimoe.model import GPT
from minimoe.optim import AdamW
from minimoe.presets import PRESETS, count_params, get_preset

REFERENCE = Path(__file__).resolve().parent.parent / "benchmarks" / "torch_reference.py"
_PHASES = ("forward", "backward", "optimizer")
_threadpool_limits = []  # keeps a threadpoolctl limit alive for the life of the process


# --------------------------------------------------------------------------------------- threads
def _openblas_functions():
    """(get, set) C functions of the OpenBLAS loaded by NumPy, or None (not OpenBLAS, not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for path in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        lib = ctypes.CDLL(path)
        for prefix in ("openblas", "scipy_openblas", "openblas64_", "scipy_openblas64_"):
            for suffix in ("", "64_", "_64_"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    return get, put
    return None


def blas_threads(n: int | None = None) -> int | None:
    """NumPy's BLAS thread count; with n, first set it to n. None when it cannot be told."""
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        if n is not None:
            _threadpool_limits.append(threadpoolctl.threadpool_limits(n, user_api="blas"))
        counts = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
        return counts[0] if counts else None
    funcs = _openblas_functions()
    if funcs is None:
        return None
    get, put = funcs
    if n is not None:
        put(ctypes.c_int(n))
    return int(get())


# ---------------------------------------------------------------------------------------- pieces
def matmul_timer(dtype="float32", n=2048):
    """A function timing one n x n x n NumPy matmul (2 n^3 FLOPs): this machine's matmul peak.
    It runs among the training steps (see time_steps), so it sees the same machine load."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype=dtype)

    def run():
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        return time.perf_counter() - t0, 0.0, 0.0

    run.flops = 2 * n**3
    return run


def make_config(preset: str, **overrides) -> Config:
    """The preset's Config with the given fields replaced (None values are ignored)."""
    return get_preset(preset, **{k: v for k, v in overrides.items() if v is not None})


def batch(config: Config, batch_size: int, seed: int = 0):
    """A fixed random batch: idx, targets (B, T) int64 with T = block_size."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, config.block_size)
    return rng.integers(0, config.vocab_size, shape), rng.integers(0, config.vocab_size, shape)


def minimoe_step(config: Config, batch_size: int, dtype="float32", seed=0):
    """A function running one minimoe training step, returning (forward, backward, optimizer) seconds."""
    model = GPT(config, seed=seed, dtype=dtype)
    opt = AdamW(model.params)
    idx, targets = batch(config, batch_size, seed)

    def step():
        t0 = time.perf_counter()
        model.forward(idx, targets)
        t1 = time.perf_counter()
        model.backward()
        t2 = time.perf_counter()
        opt.step(model.grads)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    step.model = model
    return step


def load_reference(path=REFERENCE):
    """The module benchmarks/torch_reference.py (it ships with the source checkout, not the package)."""
    if not Path(path).is_file():
        raise ValueError(
            f"--vs-torch needs {path}, which comes with minimoe's source checkout, not the package"
        )
    spec = importlib.util.spec_from_file_location("minimoe_torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_step(config: Config, batch_size: int, dtype="float32", seed=0, like=None, reference=None):
    """One PyTorch eager training step of the same architecture; `like` (a minimoe GPT) gives the
    weights, so both route the same tokens to the same experts."""
    import torch

    reference = reference or load_reference()
    model = reference.TorchGPT.from_minimoe(like) if like is not None else reference.TorchGPT(config, dtype)
    opt = model.make_optimizer()
    idx, targets = (torch.from_numpy(a) for a in batch(config, batch_size, seed))

    def step():
        t0 = time.perf_counter()
        _, loss = model(idx, targets)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    return step


def time_steps(steps: dict, iters: int, warmup: int, pause: float = 0.15) -> dict:
    """name -> array (iters, 3) of (forward, backward, optimizer) seconds.

    The runners alternate step by step (swapping who goes first), so a change in machine load
    hits all of them alike. Before each step we pause: after a call, OpenBLAS's worker threads
    spin for up to ~0.1 s waiting for more work, and spinning threads of one library would steal
    the cores of the other (PyTorch's steps ran 100x slower without the pause).
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times = {n: [] for n in names}
    for i in range(iters):
        for n in names if i % 2 == 0 else names[::-1]:
            time.sleep(pause)
            times[n].append(steps[n]())
    return {n: np.array(t) for n, t in times.items()}


def summarize(t, tokens: int, flops: float, peak_gflops: float) -> dict:
    """Medians (ms) of each phase and of the whole step, tokens/s and MFU from an (iters, 3) array."""
    step = float(np.median(t.sum(axis=1)))
    out = {f"{p}_ms": float(np.median(t[:, i])) * 1e3 for i, p in enumerate(_PHASES)}
    out.update(
        step_ms=step * 1e3,
        step_min_ms=float(t.sum(axis=1).min()) * 1e3,
        tokens_per_s=tokens / step,
        mfu=flops / step / (peak_gflops * 1e9),
    )
    return out


# ---------------------------------------------------------------------------------------- memory
def _rss_bytes(field="VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident set size in bytes.

    Linux: /proc/self/status, which starts afresh in every new program. Elsewhere the peak from
    getrusage: careful, on Linux ru_maxrss would carry over the PARENT's peak into a subprocess.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def memory_child(payload: str):
    """Run in a fresh process by `peak_memory`: train a few steps, print the memory as JSON."""
    spec = json.loads(payload)
    if spec["threads"]:
        blas_threads(spec["threads"])
    config = Config.from_dict(spec["config"])
    reference = None
    if spec["kind"] == "torch":
        import torch

        torch.set_num_threads(spec["threads"] or torch.get_num_threads())
        reference = load_reference(spec["reference"])
    import tracemalloc

    before = _rss_bytes("VmRSS")
    if spec["kind"] == "minimoe":
        tracemalloc.start()  # numpy reports its array buffers to tracemalloc
        step = minimoe_step(config, spec["batch_size"], spec["dtype"])
    else:
        step = torch_step(config, spec["batch_size"], spec["dtype"], reference=reference)
    for _ in range(spec["steps"]):
        step()
    traced = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else None
    out = {"rss_mb": (_rss_bytes() - before) / 2**20, "traced_mb": traced and traced / 2**20}
    print(json.dumps(out))


def peak_memory(kind: str, config: Config, batch_size: int, dtype: str, threads, steps=3) -> dict:
    """{"rss_mb", "traced_mb"} of `kind` ("minimoe" or "torch") training `steps` steps, measured in
    a fresh subprocess (see the module docstring); {} where resource usage is not available."""
    try:
        import resource  # noqa: F401  (Unix only)
    except ImportError:
        return {}
    payload = json.dumps(
        dict(
            kind=kind,
            config=config.to_dict(),
            batch_size=batch_size,
            dtype=dtype,
            threads=threads,
            steps=steps,
            reference=str(REFERENCE),
        )
    )
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # so the child imports this very minimoe
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = "import sys; from minimoe.bench import memory_child; memory_child(sys.argv[1])"
    res = subprocess.run([sys.executable, "-c", code, payload], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the {kind} memory measurement failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump (the CLI's convention)
        raise ValueError(f"{message} (see `minimoe bench --help`)")


# the command line's own argument checks, so `bench` reports bad sizes exactly like `train`
_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def build_parser():
    p = _Parser(prog="minimoe bench", description="Time a training step (forward, backward, AdamW).")
    p.add_argument(
        "--preset",
        default="mixtral",
        help="a toy preset: "
        + ", ".join(n for n, d in PRESETS.items() if not d.get("counted_only"))
        + " (default mixtral)",
    )
    p.add_argument("--batch-size", type=_positive, default=12, help="B (default 12)")
    p.add_argument("--block-size", type=_positive, help="T, the sequence length (default: the preset's)")
    for flag in ("n-layer", "n-embd", "n-head", "n-experts", "top-k", "expert-hidden", "ffn-hidden"):
        p.add_argument(f"--{flag}", type=_positive, help="override the preset's value")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--iters", type=_positive, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=_non_negative, default=3, help="untimed steps first (default 3)")
    p.add_argument(
        "--threads",
        type=_positive,
        help="BLAS / torch threads (default: NumPy's current BLAS threads, else all cores)",
    )
    p.add_argument("--vs-torch", action="store_true", help="also time a PyTorch eager twin, side by side")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def run(args) -> dict:
    """Everything `main` reports, as a dict (see the JSON output)."""
    if args.preset not in PRESETS or PRESETS[args.preset].get("counted_only"):
        toy = [n for n, d in PRESETS.items() if not d.get("counted_only")]
        raise ValueError(f"--preset must be a toy preset ({', '.join(toy)}), got {args.preset!r}")
    sizes = dict(
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_kv_head=args.n_head,
        n_experts=args.n_experts,
        top_k=args.top_k,
        expert_hidden=args.expert_hidden,
        ffn_hidden=args.ffn_hidden,
    )
    config = make_config(args.preset, **sizes)
    torch = reference = None
    if args.vs_torch:
        try:
            import torch
        except ImportError:
            raise ValueError("--vs-torch needs PyTorch, which is not installed (pip install torch)") from None
        reference = load_reference()
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
        steps["torch"] = torch_step(config, B, args.dtype, like=steps["minimoe"].model, reference=reference)
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
        result["ratio"] = {
            k: m[k] / t[k]
            for k in (*(f"{p}_ms" for p in _PHASES), "step_ms", "rss_mb")
            if m.get(k) and t.get(k)
        }
    return result


def format_table(r: dict) -> str:
    c = r["config"]
    moe = f", {c['n_experts']} experts top-{c['top_k']}" if c["n_experts"] else ", dense"
    lines = [
        f"minimoe bench: preset {r['preset']}, {r['dtype']}, B={r['batch_size']} T={r['block_size']} "
        f"({r['tokens_per_step']} tokens/step), {c['n_layer']} layers, C={c['n_embd']}, "
        f"{c['n_head']} heads{moe}",
        f"params {r['params_total'] / 1e6:.2f}M total, {r['params_active'] / 1e6:.2f}M active per token; "
        f"train FLOPs/step {r['flops_per_step'] / 1e9:.2f} G (count_params)",
        f"threads {r['threads']} (numpy BLAS {r['numpy_blas_threads']}"
        + (f", torch {r['torch_threads']})" if r["torch_threads"] else ")")
        + f"; matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s (numpy 2048^3, median of {r['iters']})",
        f"medians of {r['iters']} steps after {r['warmup']} warm-up"
        + (", minimoe, torch and the peak matmul" if "torch" in r else ", minimoe and the peak matmul")
        + " alternating",
        "",
    ]
    names = [n for n in ("minimoe", "torch") if n in r]
    head = f"{'':18s}" + "".join(f"{n:>12s}" for n in names) + ("   minimoe/torch" if "ratio" in r else "")
    lines.append(head)
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
        cells = []
        for n in names:
            v = r[n].get(key)
            s = "-" if v is None else format(v, fmt)
            cells.append(f"{s.rstrip('%'):>12s}")
        ratio = r.get("ratio", {}).get(key)
        lines.append(f"{label:18s}" + "".join(cells) + (f"{ratio:16.2f}" if ratio is not None else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    """`minimoe bench [options]`; returns the exit status (0 ok, 2 for a user error)."""
    try:
        args = build_parser().parse_args(argv)
        result = run(args)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
