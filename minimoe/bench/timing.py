"""Timing a training step: the runners (minimoe, its PyTorch twin, a peak-speed matmul), the
loop that alternates them, and the medians that summarise them.

    config = make_config("mixtral", n_layer=2)
    steps = {"minimoe": minimoe_step(config, 12)}
    steps["torch"] = torch_step(config, 12, like=steps["minimoe"].model)   # same weights
    times = time_steps(steps, iters=20, warmup=3)       # name -> (iters, 3) seconds
    summarize(times["minimoe"], tokens, flops, peak_gflops)
Each runner is a function returning the seconds of (forward, backward, optimizer) of one step.
"""

from __future__ import annotations

import time

import numpy as np

from minimoe.config import Config
from minimoe.errors import OptionError
from minimoe.model import GPT
from minimoe.optim import AdamW
from minimoe.presets import get_preset
from minimoe.threads import blas_threads

PHASES = ("forward", "backward", "optimizer")


def make_config(preset: str, **overrides) -> Config:
    """The preset's Config with the given fields replaced (None values are ignored)."""
    return get_preset(preset, **{k: v for k, v in overrides.items() if v is not None})


def batch(config: Config, batch_size: int, seed: int = 0):
    """A fixed random batch: idx, targets (B, T) int64 with T = block_size."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, config.block_size)
    return rng.integers(0, config.vocab_size, shape), rng.integers(0, config.vocab_size, shape)


def matmul_timer(dtype="float32", n=2048, threads=None):
    """A runner timing one n x n x n NumPy matmul (2 n^3 FLOPs): this machine's matmul peak with
    `threads` BLAS threads (None: as set). It runs among the training steps (see time_steps), so
    it sees the same machine load as they do. When minimoe's experts use the threads instead of
    BLAS (minimoe/threads.py), BLAS gets `threads` for this product only, so the peak is that of
    the same number of cores."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype=dtype)

    def run():
        before = blas_threads()
        if threads is not None and threads != before:
            blas_threads(threads)
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        elapsed = time.perf_counter() - t0
        if threads is not None and threads != before:
            blas_threads(before)
        return elapsed, 0.0, 0.0

    run.flops = 2 * n**3
    return run


def minimoe_step(config: Config, batch_size: int, dtype="float32", seed=0):
    """A runner: one minimoe training step (forward, backward, AdamW). `.model` is its GPT."""
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


def load_twin():
    """The module minimoe.bench.torch_twin; OptionError when PyTorch is not installed."""
    try:
        import torch  # noqa: F401  (optional: only the comparison needs it)
    except ImportError:
        raise OptionError(
            "--vs-torch needs PyTorch, which is not installed: pip install 'minimoe[compare]'"
        ) from None
    from minimoe.bench import torch_twin  # imported here, not at the top: it needs torch

    return torch_twin


def torch_step(config: Config, batch_size: int, dtype="float32", seed=0, like=None):
    """A runner: one training step of the PyTorch eager twin of the same architecture; `like`
    (a minimoe GPT) gives the weights, so both route the same tokens to the same experts."""
    twin = load_twin()
    import torch

    model = twin.TorchGPT.from_minimoe(like) if like is not None else twin.TorchGPT(config, dtype)
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
    out = {f"{p}_ms": float(np.median(t[:, i])) * 1e3 for i, p in enumerate(PHASES)}
    out.update(
        step_ms=step * 1e3,
        step_min_ms=float(t.sum(axis=1).min()) * 1e3,
        tokens_per_s=tokens / step,
        mfu=flops / step / (peak_gflops * 1e9),
    )
    return out
