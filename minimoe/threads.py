"""How many threads minimoe computes with, chosen from the model size and the cores actually free.

    choice = threads.apply(None, config, tokens=B * T)    # the automatic choice, applied
    print(choice.describe())      # threads 2 (auto: 2 cores, 0.1 busy); experts side by side ...
    minimoe.set_threads(1)        # or `--threads 1` on train, sample and bench: the user decides

Why it matters. NumPy's matrix products run in a BLAS library (OpenBLAS in NumPy's wheels) that
by default starts one thread per core and splits every product among them; at the end of each
product the threads wait for each other, spinning. When other programs keep a core busy, one of
those threads is often not running, and every product waits for the scheduler to hand the core
back: with two busy neighbours on a 2-core machine the laptop-size training step went from about
0.1 s to 1-4 s (benchmarks/under_load.py). Using only the cores that are free avoids that.

The rule (`choose`):
    cores   = the CPUs this process may run on (os.sched_getaffinity), capped by a cgroup CPU
              quota (a container's --cpus), divided among the P ranks of an MPI launch
    busy    = how much of those CPUs other programs use right now: /proc/stat sampled over
              0.2 s (Linux). Not the load average: it lags by a minute, and it still counts a
              run of ours that just ended. Elsewhere the 1-minute load average, or 0.
    threads = max(1, floor(cores - busy + 0.25))    a core counts as free unless over a quarter
              of it is busy
How the threads are used depends on the size of the model's matrix products, measured by its
feed-forward input product, 2 x rows x C x F FLOPs, rows = the tokens of a step (B T), or for an
MoE layer the rows one expert gets on average (B T K / E):
    tiny  (< TINY_MATMUL_FLOPS, e.g. generation's one token at a time): 1 thread, without even
          looking at the load; handing work to another thread costs more than the work.
    small (< SMALL_MATMUL_FLOPS, e.g. the laptop-size experts, 12.6 MFLOP): BLAS gets 1 thread;
          an MoE layer runs whole experts side by side on `threads` Python threads instead, the
          causal attention its batch rows, AdamW its parameter groups (ops/parallel.py). A
          waiting thread sleeps rather than spins, and the threads meet twice per layer instead
          of after every product, so a neighbour that takes a core costs a share of the time,
          not a collapse. A dense model of this size uses 1 thread.
    large: BLAS gets `threads` threads; everything runs in order.
An explicit OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS) in the environment counts as the user's
`--threads`, as does minimoe.set_threads(n). On the GPU (CuPy) none of this matters much: the
host BLAS gets the same count, the experts run in order.

The BLAS thread count is set through threadpoolctl when it is installed (the maintained way,
an optional dependency), else through the C function of the OpenBLAS that NumPy loaded
(`blas_threads`); with neither, minimoe can only read OPENBLAS_NUM_THREADS before NumPy starts.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import time
from pathlib import Path
from typing import NamedTuple, Optional

from minimoe import backend, dist
from minimoe.config import Config
from minimoe.ops import parallel

# Below this, an MoE runs its experts side by side rather than giving BLAS the threads: the
# laptop-size expert (192 x 128 x 256, 12.6 MFLOP) is small, the laptop dense MLP (768 x 128 x
# 512, 100 MFLOP) is not. On two FREE cores BLAS is the faster of the two even here (1.3x over
# one thread against 1.1x, docs/speed.md), but the choice is made once, and a neighbour that
# arrives later costs BLAS's spinning threads 2.5-4x of the step, the experts a share of a core.
SMALL_MATMUL_FLOPS = 50e6
# Below this a product is over in microseconds (generation's single token, the lessons' toy
# models): handing work to another thread would cost more than the work itself.
TINY_MATMUL_FLOPS = 2e6
ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")

_threadpool_limits = []  # keeps a threadpoolctl limit alive for the life of the process


class Threads(NamedTuple):
    """A thread choice: `threads` cores in use, as `blas` BLAS threads and `workers` expert threads."""

    threads: int
    blas: int
    workers: int
    source: str  # "auto", "--threads" or the environment variable it came from
    cores: Optional[int] = None  # (auto only) CPUs this process may use
    busy: Optional[float] = None  # (auto only) how many of them other programs keep busy

    def describe(self) -> str:
        """One line for the start of a run, e.g. 'threads 2 (auto: 2 cores, 0.1 busy); ...'."""
        why = self.source
        if self.source == "auto" and self.cores is not None:
            why = f"auto: {self.cores} core{'s' if self.cores != 1 else ''}, {self.busy:.1f} busy with other work"
        how = f"BLAS {self.blas}"
        if self.workers > 1:
            how += f", {self.workers} experts side by side"
        return f"threads {self.threads} ({why}); {how}"


# --------------------------------------------------------------------------------- the machine
def cpu_cores() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cpu_times(cpus) -> tuple:
    """(busy, total) clock ticks of the given CPUs since boot, from /proc/stat."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m and int(m.group(1)) in cpus:
            # user nice system idle iowait irq softirq steal: idle and iowait are free time
            ticks = [int(v) for v in m.group(2).split()[:8]]
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def busy_cores(interval: float = 0.2) -> float:
    """How many of this process's CPUs other programs keep busy now (this process sleeps while
    it looks): the busy share of each CPU over `interval` seconds, summed."""
    try:
        cpus = os.sched_getaffinity(0)
        b0, t0 = _cpu_times(cpus)
        time.sleep(interval)
        b1, t1 = _cpu_times(cpus)
        if t1 > t0:
            return len(cpus) * (b1 - b0) / (t1 - t0)
    except (AttributeError, OSError, ValueError):
        pass
    try:  # not Linux: the 1-minute load average, scaled to the CPUs we may use
        return os.getloadavg()[0] * cpu_cores() / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return 0.0


# --------------------------------------------------------------------------------- the rule
def matmul_flops(config: Config, tokens: int) -> float:
    """FLOPs of the model's typical matrix product: the feed-forward input product, 2 rows C F,
    with rows = tokens for a dense model and tokens K / E (one expert's share) for an MoE."""
    c = config
    if c.n_experts:
        return 2.0 * tokens * c.top_k / c.n_experts * c.n_embd * c.expert_hidden
    return 2.0 * tokens * c.n_embd * c.ffn_hidden


def _size(config: Optional[Config], tokens: Optional[int]) -> str:
    """'tiny', 'small' or 'large': the model's products (see the module docstring); 'large' unknown."""
    if config is None or tokens is None:
        return "large"
    flops = matmul_flops(config, tokens)
    return "tiny" if flops < TINY_MATMUL_FLOPS else "small" if flops < SMALL_MATMUL_FLOPS else "large"


def split_threads(n: int, config: Optional[Config] = None, tokens: Optional[int] = None, source="auto"):
    """How n threads are used: by the experts side by side (an MoE with small products on the
    CPU), else by BLAS."""
    side_by_side = config is not None and config.n_experts and backend.get_backend() == "numpy"
    if n > 1 and side_by_side and _size(config, tokens) != "large":
        return Threads(n, 1, min(n, config.n_experts), source)
    return Threads(n, n, 1, source)


def choose(config: Optional[Config] = None, tokens: Optional[int] = None, interval: float = 0.2) -> Threads:
    """The automatic choice (see the module docstring): the free cores, used as the size says."""
    for var in ENV_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) >= 1:
            return split_threads(int(value), config, tokens, source=var)
    # P ranks of an MPI launch (all on this machine, as far as we can tell) share its cores
    cores, size = max(1, cpu_cores() // dist.launched()[0]), _size(config, tokens)
    if cores == 1 or size == "tiny" or (size == "small" and not config.n_experts):
        return Threads(1, 1, 1, "auto", cores, 0.0)  # one thread whatever the load: no need to look
    busy = min(float(cores), busy_cores(interval))
    n = max(1, math.floor(cores - busy + 0.25))
    return split_threads(n, config, tokens)._replace(cores=cores, busy=busy)


def apply(requested: Optional[int], config: Optional[Config] = None, tokens: Optional[int] = None) -> Threads:
    """Set the threads: `requested` (the user's --threads) or, when None, the automatic choice."""
    choice = (
        choose(config, tokens) if requested is None else split_threads(requested, config, tokens, "--threads")
    )
    blas_threads(choice.blas)
    parallel.set_workers(choice.workers)
    return choice


def set_threads(n: int, config: Optional[Config] = None, tokens: Optional[int] = None) -> Threads:
    """Use n threads from now on (minimoe.set_threads). With the model's config and the tokens of
    a step (B T) the size rule decides whether BLAS or the experts use them; without, BLAS does."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be an integer >= 1, got {n!r}")
    return apply(n, config, tokens)


# --------------------------------------------------------------------------------- the BLAS
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


def blas_threads(n: Optional[int] = None) -> Optional[int]:
    """NumPy's BLAS thread count; with n, first set it to n. None when it cannot be told."""
    try:
        import threadpoolctl  # optional: the maintained way to do this
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        if n is not None:
            _threadpool_limits[:] = [threadpoolctl.threadpool_limits(n, user_api="blas")]
        counts = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
        return counts[0] if counts else None
    funcs = _openblas_functions()
    if funcs is None:
        return None
    get, put = funcs
    if n is not None:
        put(ctypes.c_int(n))
    return int(get())
