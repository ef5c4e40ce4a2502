"""One training step of minimoe on CuPy against its PyTorch twin on CUDA, same weights.

Used by scripts/gpu_check.py; needs CuPy and a CUDA build of PyTorch (`device="cpu"` puts the
twin on the CPU, which only `gpu_check.py --fake` does: minimoe then runs on the fake CuPy). The torch model is
minimoe/bench/torch_twin.py; it starts from minimoe's weights and trains on the same batch.
Each step is timed with a device synchronisation at its end, steps of the two alternate, and
the medians are kept.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's minimoe

import torch  # noqa: E402

import minimoe  # noqa: E402
from minimoe import backend  # noqa: E402
from minimoe.bench.torch_twin import TorchGPT  # noqa: E402


def compare(
    preset: str, batch_size: int, overrides: dict, iters: int = 20, warmup: int = 5, device="cuda"
) -> dict:
    """Median step times (ms) of minimoe on CuPy and of the torch twin on `device`, and their ratio."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PyTorch has no CUDA device here")
    import cupy

    before = backend.get_backend()
    backend.set_backend("cupy")
    config = minimoe.get_preset(preset, vocab_size=256, **overrides)
    model = minimoe.GPT(config, seed=0)
    opt = minimoe.AdamW(model.params)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (batch_size, config.block_size))
    tgt = rng.integers(0, config.vocab_size, (batch_size, config.block_size))

    ref = TorchGPT.from_minimoe(model).to(device)
    topt = ref.make_optimizer()
    tidx, ttgt = torch.from_numpy(idx).to(device), torch.from_numpy(tgt).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step_minimoe():
        t0 = time.perf_counter()
        model.forward(idx, tgt)  # host ids: range-checked on the host, moved to the device once
        model.backward()
        opt.step(model.grads)
        cupy.cuda.Device().synchronize()
        return time.perf_counter() - t0

    def step_torch():
        t0 = time.perf_counter()
        _, loss = ref(tidx, ttgt)
        loss.backward()
        topt.step()
        topt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    for _ in range(warmup):
        step_minimoe()
        step_torch()
    a, b = [], []
    for _ in range(iters):
        a.append(step_minimoe())
        b.append(step_torch())
    backend.set_backend(before)
    ma, mb = float(np.median(a)) * 1e3, float(np.median(b)) * 1e3
    return {
        "preset": preset,
        "batch_size": batch_size,
        **overrides,
        "device": device,
        "minimoe_ms": ma,
        "torch_ms": mb,
        "ratio": ma / mb,
    }


if __name__ == "__main__":
    print(compare("mixtral", 12, {}))
