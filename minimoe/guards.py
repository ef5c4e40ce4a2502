"""Guards around a training run: a step with a non-finite loss or gradient is skipped, and a run
that keeps making them stops before it saves anything broken; a loss far above a uniform guess is
flagged; sizes whose memory cannot fit on this machine are refused before anything is allocated.

    guard = DivergenceGuard(max_bad_steps=3, vocab_size=V)
    if guard.step_ok(loss, grad_norm):   # one host copy of one bool per step
        optimizer.step(...)
    check_fits(training_bytes(config, B, "float32"), "training ...", OptionError, "use a smaller ...")

Divergence, in plain words: an update computed from a NaN/inf loss or gradient would make every
parameter NaN, so it is not applied. `max_bad_steps` such steps in a row mean the run cannot
recover on its own: it stops (exit status 3 at the command line) and the last checkpoint stays.
"""

from __future__ import annotations

import math
import os

import numpy

from minimoe import backend
from minimoe.errors import OptionError
from minimoe.presets import count_params


class Diverged(Exception):
    """Training stopped: too many steps in a row had a non-finite loss or gradient norm, or the
    parameters became non-finite. Not a UserError: the command line reports it with exit status 3.
    """


def global_norm(grads: dict):
    """sqrt(sum of squares of every gradient), in float64, as a 0-d array (no host copy)."""
    arrays = [g for g in grads.values() if g is not None]
    xp = backend.xp_of(arrays[0])
    return xp.sqrt(sum((g.astype(xp.float64) ** 2).sum() for g in arrays))


class DivergenceGuard:
    """Counts steps whose loss or gradient norm is not finite; see the module docstring.

    chance = ln V is the loss of a uniform guess over the V tokens, which an untrained model
    starts near and a learning one stays below. A mean training loss above WARN_FACTOR * ln V
    means the updates are making the model worse than guessing: training is diverging.
    """

    WARN_FACTOR = 2.0

    def __init__(self, max_bad_steps: int, vocab_size: int):
        self.limit = max_bad_steps
        self.in_row = 0  # consecutive skipped steps
        self.skipped = 0  # skipped steps since the last metrics record
        self.chance = math.log(vocab_size) if vocab_size > 1 else 0.0
        self.warned = False
        self.last = (math.nan, math.nan)

    def step_ok(self, loss, norm) -> bool:
        """Whether this step's loss and gradient norm (0-d arrays) are finite: one host copy."""
        xp = backend.xp_of(loss)
        pair = backend.to_numpy(xp.stack([loss.astype(xp.float64), norm.astype(xp.float64)]))
        if numpy.isfinite(pair).all():
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        self.last = (float(pair[0]), float(pair[1]))
        return False

    def skipped_line(self, step: int) -> str:
        """The line that reports skipped step `step`; raises Diverged at the limit."""
        loss, norm = self.last
        line = (
            f"step {step}: loss {loss:.4g}, gradient norm {norm:.4g}: not finite, update skipped "
            f"({self.in_row} in a row; the run stops at {self.limit}, --max-bad-steps)"
        )
        if self.in_row >= self.limit:
            raise Diverged(
                f"stopped at step {step}: {self.in_row} steps in a row had a non-finite loss or gradient "
                "norm (the model diverged; try a lower --lr or --grad-clip 1)"
            )
        return line

    def loss_warning(self, rec: dict) -> str | None:
        """A warning, once per session, when a record's mean loss is far above a uniform guess."""
        loss = rec.get("train_loss_avg")
        if self.warned or loss is None or not self.chance or loss <= self.WARN_FACTOR * self.chance:
            return None
        self.warned = True
        return (
            f"warning: step {rec['step']}: train loss {loss:.4g} is over {self.WARN_FACTOR:g}x the loss of a "
            f"uniform guess (ln V = {self.chance:.3f}): training is diverging; lower --lr (now {rec['lr']:.3g})"
        )


# ------------------------------------------------------------------------------------- memory
ARRAY_OVERHEAD = 112  # bytes of bookkeeping per NumPy array object, whatever its size
ARRAYS_PER_LAYER = 8  # at least: norms, attention and MLP weights of one block


def param_count(c) -> int:
    """presets.count_params(c)["total"], or a lower bound when n_layer is so large that counting
    layer by layer would itself take too long: every block holds at least the attention's
    query and output projections (2 C^2 weights)."""
    if c.n_layer > 1_000_000:
        return c.n_layer * 2 * c.n_embd**2 + c.vocab_size * c.n_embd
    return count_params(c)["total"]


def weights_bytes(c, dtype: str, copies: int = 1) -> int:
    """Bytes of `copies` copies of the parameters, plus the arrays' own bookkeeping."""
    return (
        copies * param_count(c) * numpy.dtype(dtype).itemsize + c.n_layer * ARRAYS_PER_LAYER * ARRAY_OVERHEAD
    )


def activation_bytes(c, batch_size: int, dtype: str) -> int:
    """Bytes that one training step keeps for its backward, counting only the largest arrays (B
    batch, T block size, N = B T tokens): per block the attention probabilities (B, H, T, T),
    about ten (N, C) arrays and the feed-forward's hidden (N, 3F) (MoE: (N, K (3F + C)) and (N, E)
    router arrays); the gradient of one block's probabilities; the logits, their probabilities and
    their gradient (N, V)."""
    B, T, C = batch_size, c.block_size, c.n_embd
    N, scores = B * T, batch_size * c.n_head * c.block_size**2
    ffn = N * 3 * c.ffn_hidden
    if c.n_experts:
        ffn = max(ffn, N * c.top_k * (3 * c.expert_hidden + C) + 2 * N * c.n_experts)
    per_layer = scores + 10 * N * C + ffn
    return numpy.dtype(dtype).itemsize * (c.n_layer * per_layer + scores + 3 * N * c.vocab_size)


def training_bytes(c, batch_size: int, dtype: str) -> tuple[int, int]:
    """(weights, activations): parameters, gradients and AdamW's two moments (4 copies), and
    activation_bytes. Both count less than training allocates, never more."""
    return weights_bytes(c, dtype, copies=4), activation_bytes(c, batch_size, dtype)


def memory_limit() -> int | None:
    """The bytes this process may use: the machine's physical memory (os.sysconf, Linux and
    macOS), or a container's cgroup limit when that is lower; None when neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read(64).strip()
            if text.isdigit():
                limits.append(int(text))
        except OSError:
            pass
    limits = [n for n in limits if n > 0]
    return min(limits) if limits else None


def gib(n: float) -> str:
    """Bytes as a short size: 3.2e9 -> '2.98 GiB'."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**10:.3g} KiB"


def check_fits(parts: dict, what: str, error, fix: str) -> None:
    """Raise error(...) when the bytes in `parts` ({name: bytes}) add up to more than
    memory_limit(); the message gives the estimate, its parts and what the machine has."""
    have = memory_limit()
    need = sum(parts.values())
    if have is None or need <= have:
        return
    detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items())
    raise error(
        f"{what} needs about {gib(need)} of memory ({detail}), more than this machine's {gib(have)}; {fix}"
    )


def check_training_memory(config, batch_size: int, dtype: str) -> None:
    """OptionError when training `config` with this batch needs more memory than this machine has."""
    weights, activations = training_bytes(config, batch_size, dtype)
    what = f"training a {param_count(config):,}-parameter model with --batch-size {batch_size} and --block-size {config.block_size}"
    fix = "use a smaller --batch-size, --block-size, --n-embd, --n-layer or --n-experts"
    check_fits({"weights and AdamW state": weights, "activations": activations}, what, OptionError, fix)
