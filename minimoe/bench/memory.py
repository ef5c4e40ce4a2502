"""Peak memory of a few training steps, measured in a fresh process.

Each framework trains a few steps in a new Python process; we report the growth of that
process's peak resident set size (VmHWM in /proc/self/status on Linux, else getrusage's
ru_maxrss) over its size just after the imports: weights, gradients, optimizer state,
activations and temporaries, seen the same way for NumPy and PyTorch. For minimoe we also give
tracemalloc's peak (NumPy reports every array buffer to tracemalloc): the exact bytes of the
arrays alive at the worst moment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from minimoe.bench.timing import minimoe_step, torch_step
from minimoe.config import Config
from minimoe.threads import apply as apply_threads

# the folder holding the minimoe package that is running: the child process imports the same one
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def rss_bytes(field="VmHWM") -> int:
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
    config = Config.from_dict(spec["config"])
    if spec["threads"]:
        apply_threads(spec["threads"], config, spec["batch_size"] * config.block_size)
    if spec["kind"] == "torch":
        import torch

        torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    import tracemalloc

    before = rss_bytes("VmRSS")
    if spec["kind"] == "minimoe":
        tracemalloc.start()  # numpy reports its array buffers to tracemalloc
        step = minimoe_step(config, spec["batch_size"], spec["dtype"])
    else:
        step = torch_step(config, spec["batch_size"], spec["dtype"])
    for _ in range(spec["steps"]):
        step()
    traced = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else None
    out = {"rss_mb": (rss_bytes() - before) / 2**20, "traced_mb": traced and traced / 2**20}
    print(json.dumps(out))


def peak_memory(kind: str, config: Config, batch_size: int, dtype: str, threads, steps=3) -> dict:
    """{"rss_mb", "traced_mb"} of `kind` ("minimoe" or "torch") training `steps` steps, measured in
    a fresh subprocess (see the module docstring); {} where resource usage is not available."""
    try:
        import resource  # noqa: F401  (Unix only)
    except ImportError:
        return {}
    spec = dict(
        kind=kind, config=config.to_dict(), batch_size=batch_size, dtype=dtype, threads=threads, steps=steps
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = _PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = "import sys; from minimoe.bench.memory import memory_child; memory_child(sys.argv[1])"
    cmd = [sys.executable, "-c", code, json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"the {kind} memory measurement failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])
