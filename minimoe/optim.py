"""AdamW, global-norm gradient clipping, and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import functools
import math

from minimoe import backend
from minimoe.ops import parallel

EMBEDDING_NAMES = ("wte", "wpe")


def default_decay(name: str, p, decay_embeddings: bool = False) -> bool:
    """Which parameters get weight decay: matrices (2-D and up), except the embeddings unless
    asked. Norm gains and biases (1-D) are never decayed: shrinking them towards zero has no
    regularising meaning (a LayerNorm gain of 0 silences the layer)."""
    if p.ndim < 2:
        return False
    return decay_embeddings or name not in EMBEDDING_NAMES


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Algorithm 2).

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
        p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)     (wd only where decay applies)
    The decay is applied to the weights directly, not added to the gradient (which is what makes
    it "decoupled": Adam's per-parameter scaling does not touch it).
    Updates the arrays of `params` in place, so a model holding them sees the new values.
    """

    def __init__(
        self,
        params: dict,
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        decay_embeddings=False,
        decay=None,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must each be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not eps > 0:  # eps = 0 turns a parameter whose gradient is always 0 into 0/0 = NaN
            raise ValueError(f"eps must be > 0, got {eps}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        decay = decay or (lambda n, p: default_decay(n, p, decay_embeddings))
        self.decay = {n: bool(decay(n, p)) for n, p in params.items()}
        self.m = {n: backend.xp_of(p).zeros_like(p) for n, p in params.items()}
        self.v = {n: backend.xp_of(p).zeros_like(p) for n, p in params.items()}
        self.t = 0
        self._groups = {}  # workers -> the parameter names of each task of step(), see _groups_for
        self._buffers = {}  # scratch space for step(), see _scratch

    def step(self, grads: dict, lr=None):
        """One update with `grads` (same keys as params); `lr` overrides the default for this step."""
        # python floats keep float32 arrays in float32 (a numpy float64 scalar would promote them)
        lr = float(self.lr if lr is None else lr)
        b1, b2 = float(self.betas[0]), float(self.betas[1])
        self.t += 1
        bc1 = 1.0 - b1**self.t
        bc2 = 1.0 - b2**self.t
        step_size = lr / bc1
        # The parameters are independent: with workers (ops/parallel.py) a few groups of them are
        # updated side by side, each group with its own scratch buffer; the numbers are the same.
        groups = self._groups_for(parallel.workers())
        parallel.run(
            [
                functools.partial(self._update, names, i, grads, lr, b1, b2, step_size, bc2)
                for i, names in enumerate(groups)
            ]
        )

    def _update(self, names, group, grads, lr, b1, b2, step_size, bc2):
        """The update of the parameters `names`, with scratch buffer number `group`."""
        for n in names:
            g = grads.get(n)
            if g is None:
                continue
            p = self.params[n]
            xp = backend.xp_of(p)
            m, v = self.m[n], self.v[n]
            # the same formulas as above, in place, with one scratch buffer `tmp` reused by every
            # parameter of the group: no temporaries of the parameter's size are allocated
            tmp = self._scratch(p, group, names)
            m *= b1
            xp.multiply(g, 1.0 - b1, out=tmp)
            m += tmp
            v *= b2
            xp.multiply(g, g, out=tmp)
            tmp *= 1.0 - b2
            v += tmp
            if self.decay[n] and self.weight_decay:
                p *= 1.0 - lr * self.weight_decay
            xp.divide(v, bc2, out=tmp)
            xp.sqrt(tmp, out=tmp)
            tmp += self.eps  # tmp = sqrt(v_hat) + eps
            xp.divide(m, tmp, out=tmp)
            tmp *= step_size
            p -= tmp

    def _groups_for(self, workers: int) -> list:
        """The parameter names split into min(workers, #params) groups of about equal size (the
        largest parameter first, each to the smallest group so far): one group without workers."""
        if workers not in self._groups:
            k = max(1, min(workers, len(self.params)))
            groups, sizes = [[] for _ in range(k)], [0] * k
            for n in sorted(self.params, key=lambda n: -self.params[n].size):
                i = sizes.index(min(sizes))
                groups[i].append(n)
                sizes[i] += self.params[n].size
            self._groups[workers] = groups
        return self._groups[workers]

    def _scratch(self, p, group, names):
        """A work array of p's shape and dtype, a view of one buffer per group sized for the
        group's largest parameter."""
        key = (backend.xp_of(p).__name__, p.dtype.str, group)
        buf = self._buffers.get(key)
        if buf is None or buf.size < p.size:
            biggest = max(self.params[n].size for n in names)
            buf = self._buffers[key] = backend.xp_of(p).empty(biggest, dtype=p.dtype)
        return buf[: p.size].reshape(p.shape)

    def state_dict(self) -> dict:
        """Arrays and numbers that restore this optimizer exactly (for checkpoints)."""
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict):
        xp = backend.get_xp()
        self.t = int(state["t"])
        for n in self.params:
            self.m[n][...] = xp.asarray(state["m"][n])
            self.v[n][...] = xp.asarray(state["v"][n])


def clip_grad_norm(grads: dict, max_norm: float):
    """Scale all gradients together so that their global L2 norm is at most max_norm.

    Returns the norm before clipping as a 0-d array (no host sync on a GPU). The scaling is
    done unconditionally with factor min(1, max_norm / norm) to avoid a data-dependent branch.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    arrays = [g for g in grads.values() if g is not None]
    if not arrays:
        raise ValueError("clip_grad_norm got no gradients; run model.backward() first")
    xp = backend.xp_of(arrays[0])
    # each gradient's sum of squares (in float64) on the workers (ops/parallel.py), added in order
    total = xp.sqrt(sum(parallel.run([functools.partial(_sum_of_squares, g) for g in arrays])))
    scale = xp.minimum(1.0, max_norm / (total + 1e-6))
    for g in arrays:
        g *= scale.astype(g.dtype)
    return total


def _sum_of_squares(g):
    """sum(g^2) in float64, a 0-d array."""
    return (g.astype(backend.xp_of(g).float64) ** 2).sum()


def cosine_lr(
    step: int, max_lr: float, warmup_iters: int, max_iters: int, min_lr: float | None = None
) -> float:
    """Learning rate at `step` (0-based): linear warmup from max_lr/warmup to max_lr over
    `warmup_iters` steps, then a half cosine from max_lr down to min_lr at `max_iters`, then
    min_lr (default max_lr / 10, as in Chinchilla-style schedules)."""
    if min_lr is None:
        min_lr = max_lr / 10
    for name, value in (("step", step), ("warmup_iters", warmup_iters), ("max_iters", max_iters)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if max_lr < 0 or not 0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr = {min_lr}, max_lr = {max_lr}")
    if warmup_iters > 0 and step < warmup_iters:
        return max_lr * (step + 1) / warmup_iters
    if step >= max_iters:
        return min_lr
    span = max(1, max_iters - warmup_iters)
    progress = (step - warmup_iters) / span
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
