"""Cross-entropy over logits, the language-modelling loss.

It comes first as `*_reference`, the formula written plainly; the fast version below it computes
the same numbers (a test checks them equal in float64).
"""

from typing import Any, NamedTuple

from minimoe import backend


class CrossEntropyCache(NamedTuple):
    probs: Any  # (N, V) softmax(logits), N = every position
    safe_targets: Any  # (N,) the targets, with ignored positions set to 0 (any valid column)
    valid: Any  # (N,) bool, False where the target was ignore_index
    denom: Any  # 0-d, the number of counted positions (at least 1)
    shape: tuple  # the logits' shape (..., V)


def _flatten(logits, targets, ignore_index):
    """logits (..., V), targets (...) -> z (N, V), safe targets (N,), valid (N,) bool."""
    xp = backend.xp_of(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    if t.shape[0] != z.shape[0]:
        raise ValueError(f"targets must have shape {logits.shape[:-1]} to match logits, got {targets.shape}")
    valid = t != ignore_index
    return z, xp.where(valid, t, 0), valid


def cross_entropy_forward_reference(logits, targets, ignore_index=-1):
    """logits (..., V), targets (...) -> loss (0-d), the plain twin of `cross_entropy_forward`:
    loss = mean over counted positions of -log softmax(logits)[target]."""
    xp = backend.xp_of(logits)
    z, t, valid = _flatten(logits, targets, ignore_index)
    m = z.max(axis=-1, keepdims=True)
    logp = z - m - xp.log(xp.exp(z - m).sum(axis=-1, keepdims=True))  # log softmax, (N, V)
    nll = -logp[xp.arange(t.shape[0]), t]  # -log p(target) at each position
    denom = xp.maximum(valid.sum(), 1).astype(logits.dtype)
    loss = (nll * valid).sum() / denom
    return loss, CrossEntropyCache(xp.exp(logp), t, valid, denom, logits.shape)


def cross_entropy_backward_reference(dloss, cache):
    """dloss (scalar) -> dlogits (..., V), the plain twin of `cross_entropy_backward`:
    dlogits = dloss * (softmax(logits) - onehot(target)) / (counted positions), 0 where ignored."""
    xp = backend.xp_of(cache.probs)
    onehot = xp.eye(cache.probs.shape[-1], dtype=cache.probs.dtype)[cache.safe_targets]
    d = (cache.probs - onehot) * (cache.valid * (dloss / cache.denom))[:, None]
    return d.reshape(cache.shape)


def cross_entropy_forward(logits, targets, ignore_index=-1):
    """logits (..., V), targets (...) integer -> loss (0-d array), the mean over counted tokens of
    -log softmax(logits)[target].

    Positions whose target equals `ignore_index` are not counted (neither in the sum nor in the
    mean's denominator). If every position is ignored the loss is 0 and so is its gradient.
    Computed stably: log softmax(z)_i = z_i - m - log sum_j exp(z_j - m), m = max_j z_j.
    """
    # Fast twin of cross_entropy_forward_reference: exp and the normalisation in place in one
    # (N, V) buffer, the largest array of the loss; log p taken at the targets only.
    xp = backend.xp_of(logits)
    z, safe_t, valid = _flatten(logits, targets, ignore_index)
    m = z.max(axis=-1, keepdims=True)
    e = z - m
    xp.exp(e, out=e)
    sumexp = e.sum(axis=-1, keepdims=True)
    logp_t = xp.take_along_axis(z, safe_t[:, None], axis=-1) - m - xp.log(sumexp)
    n = valid.sum()
    denom = xp.maximum(n, 1).astype(logits.dtype)
    loss = -(logp_t[:, 0] * valid).sum() / denom
    probs = e
    probs /= sumexp
    return loss, CrossEntropyCache(probs, safe_t, valid, denom, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dloss (scalar) -> dlogits (..., V).

    d(-log softmax(z)_t)/dz = softmax(z) - onehot(t); averaged over the counted tokens, and zero
    for ignored ones.
    """
    # Fast twin of cross_entropy_backward_reference: subtracts 1 at the targets, no one-hot matrix.
    xp = backend.xp_of(cache.probs)
    d = cache.probs.copy()
    rows = xp.arange(d.shape[0])
    d[rows, cache.safe_targets] -= 1.0
    d *= (cache.valid * (dloss / cache.denom))[:, None].astype(d.dtype)
    return d.reshape(cache.shape)
