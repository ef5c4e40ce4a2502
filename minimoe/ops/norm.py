"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (Llama, Mixtral), over the last axis C."""

from minimoe import backend


def _rowdot(a, b):
    """(..., C), (..., C) -> (..., 1): sum over C of a * b, without an (..., C) temporary."""
    return backend.xp_of(a).einsum("...c,...c->...", a, b)[..., None]


def layernorm_forward(x, w, b, eps=1e-5):
    """(..., C) -> (..., C).  y = (x - mean) / sqrt(var + eps) * w + b  (Ba et al. 2016)."""
    xp = backend.xp_of(x)
    C = x.shape[-1]
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = _rowdot(xc, xc) / C
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = xc
    xhat *= rstd  # in place: xc is not needed again
    y = xhat * w
    y += b
    return y, (xhat, rstd, w)


def layernorm_backward(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,), db (C,).

    With g = dy * w (the gradient at xhat) and means taken over C:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    (the two subtracted terms are the paths through the mean and through the variance).
    """
    xhat, rstd, w = cache
    C = w.shape[0]
    g = dy * w
    gx = _rowdot(g, xhat) / C  # mean(g * xhat)
    dx = xhat * gx  # then in place: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    xp = backend.xp_of(dy)
    xp.subtract(g, dx, out=dx)
    dx -= g.mean(axis=-1, keepdims=True)
    dx *= rstd
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)
    db = dy.reshape(-1, C).sum(axis=0)
    return dx, dw, db


def rmsnorm_forward(x, w, eps=1e-5):
    """(..., C) -> (..., C).  y = x / sqrt(mean(x^2) + eps) * w  (Zhang & Sennrich 2019)."""
    xp = backend.xp_of(x)
    C = x.shape[-1]
    rstd = 1.0 / xp.sqrt(_rowdot(x, x) / C + eps)
    xhat = x * rstd
    return xhat * w, (xhat, rstd, w)


def rmsnorm_backward(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,).

    With g = dy * w:  dx = rstd * (g - xhat * mean(g * xhat))   (no mean to subtract).
    """
    xhat, rstd, w = cache
    C = w.shape[0]
    xp = backend.xp_of(dy)
    g = dy * w
    dx = xhat * (_rowdot(g, xhat) / C)  # then in place: dx = rstd * (g - xhat * mean(g * xhat))
    xp.subtract(g, dx, out=dx)
    dx *= rstd
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)
    return dx, dw
