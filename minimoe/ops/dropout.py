"""Inverted dropout (Srivastava et al. 2014), seeded through a backend random Generator."""


def dropout_forward(x, p, rng, training=True):
    """(...) -> (...). Zero each element with probability p and scale the survivors by 1/(1-p),
    so the expected value is unchanged and evaluation needs no rescaling. Identity when p == 0
    or not training. `rng` is a Generator from `backend.make_rng` (numpy or cupy)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if p == 0.0 or not training:
        return x, None
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype) * (1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dy, cache):
    """dy -> dx = dy * mask (the same scaled mask as the forward); dy itself when it was off."""
    return dy if cache is None else dy * cache
