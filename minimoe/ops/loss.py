"""Cross-entropy over logits, the language-modelling loss."""

from minimoe import backend


def cross_entropy_forward(logits, targets, ignore_index=-1):
    """logits (..., V), targets (...) integer -> loss (0-d array), the mean over counted tokens of
    -log softmax(logits)[target].

    Positions whose target equals `ignore_index` are not counted (neither in the sum nor in the
    mean's denominator). If every position is ignored the loss is 0 and so is its gradient.
    Computed stably: log softmax(z)_i = z_i - m - log sum_j exp(z_j - m), m = max_j z_j.
    """
    xp = backend.xp_of(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    if t.shape[0] != z.shape[0]:
        raise ValueError(f"targets must have shape {logits.shape[:-1]} to match logits, got {targets.shape}")
    valid = t != ignore_index
    safe_t = xp.where(valid, t, 0)
    m = z.max(axis=-1, keepdims=True)
    e = z - m
    xp.exp(e, out=e)  # in place: (N, V) is the largest array of the loss
    sumexp = e.sum(axis=-1, keepdims=True)
    logp_t = xp.take_along_axis(z, safe_t[:, None], axis=-1) - m - xp.log(sumexp)
    n = valid.sum()
    denom = xp.maximum(n, 1).astype(logits.dtype)
    loss = -(logp_t[:, 0] * valid).sum() / denom
    probs = e
    probs /= sumexp
    return loss, (probs, safe_t, valid, denom, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dloss (scalar) -> dlogits (..., V).

    d(-log softmax(z)_t)/dz = softmax(z) - onehot(t); averaged over the counted tokens, and zero
    for ignored ones.
    """
    probs, safe_t, valid, denom, shape = cache
    xp = backend.xp_of(probs)
    d = probs.copy()
    rows = xp.arange(d.shape[0])
    d[rows, safe_t] -= 1.0
    d *= (valid * (dloss / denom))[:, None].astype(d.dtype)
    return d.reshape(shape)
