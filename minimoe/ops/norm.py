"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (Llama, Mixtral), over the last axis C.

Each comes first as `*_reference`, the formula written plainly; the fast version below it
computes the same numbers (a test checks them equal in float64).
"""

from typing import Any, NamedTuple

from minimoe import backend


class NormCache(NamedTuple):
    xhat: Any  # (..., C) the normalised input, before the gain w (and bias b)
    rstd: Any  # (..., 1) 1 / sqrt(var + eps) for LayerNorm, 1 / sqrt(mean(x^2) + eps) for RMSNorm
    w: Any  # (C,) the gain


def _sum_leading(a):
    """(..., C) -> (C,): the sum over every leading position."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0)


# ---------------------------------------------------------------------------------------------
# LayerNorm (Ba et al. 2016)
# ---------------------------------------------------------------------------------------------


def layernorm_forward_reference(x, w, b, eps=1e-5):
    """(..., C) -> (..., C).  y = (x - mean) / sqrt(var + eps) * w + b, the plain twin of
    `layernorm_forward` (mean and var over C)."""
    xp = backend.xp_of(x)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = (x - mean) * rstd
    return xhat * w + b, NormCache(xhat, rstd, w)


def layernorm_backward_reference(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,), db (C,), the plain twin of `layernorm_backward`:
    g = dy * w,  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw = sum dy * xhat,  db = sum dy."""
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    g = dy * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, _sum_leading(dy * xhat), _sum_leading(dy)


def _rowdot(a, b):
    """(..., C), (..., C) -> (..., 1): sum over C of a * b, without an (..., C) temporary."""
    return backend.xp_of(a).einsum("...c,...c->...", a, b)[..., None]


def layernorm_forward(x, w, b, eps=1e-5):
    """(..., C) -> (..., C).  y = (x - mean) / sqrt(var + eps) * w + b  (Ba et al. 2016)."""
    # Fast twin of layernorm_forward_reference: the variance as an einsum row dot, xhat in place.
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
    return y, NormCache(xhat, rstd, w)


def layernorm_backward(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,), db (C,).

    With g = dy * w (the gradient at xhat) and means taken over C:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    (the two subtracted terms are the paths through the mean and through the variance).
    """
    # Fast twin of layernorm_backward_reference: an einsum row dot, then dx in place.
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
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


# ---------------------------------------------------------------------------------------------
# RMSNorm (Zhang & Sennrich 2019)
# ---------------------------------------------------------------------------------------------


def rmsnorm_forward_reference(x, w, eps=1e-5):
    """(..., C) -> (..., C).  y = x / sqrt(mean(x^2) + eps) * w, the plain twin of `rmsnorm_forward`."""
    xp = backend.xp_of(x)
    rstd = 1.0 / xp.sqrt((x**2).mean(axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    return xhat * w, NormCache(xhat, rstd, w)


def rmsnorm_backward_reference(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,), the plain twin of `rmsnorm_backward`:
    g = dy * w,  dx = rstd * (g - xhat * mean(g * xhat)),  dw = sum dy * xhat."""
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    g = dy * w
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, _sum_leading(dy * xhat)


def rmsnorm_forward(x, w, eps=1e-5):
    """(..., C) -> (..., C).  y = x / sqrt(mean(x^2) + eps) * w  (Zhang & Sennrich 2019)."""
    # Fast twin of rmsnorm_forward_reference: mean(x^2) as an einsum row dot (no x^2 temporary).
    xp = backend.xp_of(x)
    C = x.shape[-1]
    rstd = 1.0 / xp.sqrt(_rowdot(x, x) / C + eps)
    xhat = x * rstd
    return xhat * w, NormCache(xhat, rstd, w)


def rmsnorm_backward(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,).

    With g = dy * w:  dx = rstd * (g - xhat * mean(g * xhat))   (no mean to subtract).
    """
    # Fast twin of rmsnorm_backward_reference: an einsum row dot, then dx in place.
    xhat, rstd, w = cache.xhat, cache.rstd, cache.w
    C = w.shape[0]
    xp = backend.xp_of(dy)
    g = dy * w
    dx = xhat * (_rowdot(g, xhat) / C)  # then in place: dx = rstd * (g - xhat * mean(g * xhat))
    xp.subtract(g, dx, out=dx)
    dx *= rstd
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)
    return dx, dw
