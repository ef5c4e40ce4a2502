"""Elementwise activations and softmax, each a forward/backward pair. Shapes are unchanged."""

import math

from minimoe import backend

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_VALID = ("tanh", "none")


def gelu_forward(x, approximate="tanh"):
    """(...) -> (...).  GELU(x) = x * Phi(x), Phi the standard normal CDF (Hendrycks & Gimpel 2016).

    approximate="tanh" (GPT-2's `gelu_new`): Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2.
    approximate="none": Phi(x) = (1 + erf(x / sqrt(2))) / 2, exactly.
    """
    xp = backend.xp_of(x)
    if approximate == "tanh":
        t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        return 0.5 * x * (1.0 + t), (x, t, approximate)
    if approximate == "none":
        phi_cdf = 0.5 * (1.0 + backend.erf(x * (1.0 / math.sqrt(2.0))))
        return x * phi_cdf, (x, phi_cdf, approximate)
    raise ValueError(f"gelu approximate must be one of {_GELU_VALID}, got {approximate!r}")


def gelu_backward(dy, cache):
    """dy -> dx.
    tanh: d/dx = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3*0.044715 x^2)
    exact: d/dx = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi).
    """
    x, aux, approximate = cache
    xp = backend.xp_of(x)
    if approximate == "tanh":
        t = aux
        dudx = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dudx)
    phi_cdf = aux
    return dy * (phi_cdf + x * (_INV_SQRT_2PI * xp.exp(-0.5 * x * x)))


def sigmoid(x):
    """Numerically stable logistic function 1 / (1 + exp(-x)) (no overflow for large |x|)."""
    xp = backend.xp_of(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def silu_forward(x):
    """(...) -> (...).  SiLU(x) = x * sigmoid(x)  (a.k.a. swish; Elfwing et al. 2017)."""
    s = sigmoid(x)
    return x * s, (x, s)


def silu_backward(dy, cache):
    """dy -> dx.  d/dx [x s(x)] = s + x s (1 - s) = s (1 + x (1 - s))."""
    x, s = cache
    return dy * (s * (1.0 + x * (1.0 - s)))


def swiglu_forward(a, b):
    """a, b (...) -> (...).  SwiGLU(a, b) = SiLU(a) * b  (Shazeer 2020, 'GLU variants'):
    a is the gate projection x W1, b the up projection x W3."""
    sa, silu_cache = silu_forward(a)
    return sa * b, (sa, b, silu_cache)


def swiglu_backward(dy, cache):
    """dy -> da, db.   da = dy * b * SiLU'(a),  db = dy * SiLU(a)."""
    sa, b, silu_cache = cache
    return silu_backward(dy * b, silu_cache), dy * sa


def softmax_forward(x, axis=-1):
    """(...) -> (...), normalised along `axis`. Subtracting the max first keeps exp from overflowing."""
    xp = backend.xp_of(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    return y, (y, axis)


def softmax_backward(dy, cache):
    """dy -> dx.  The softmax Jacobian is diag(y) - y y^T, so dx = y * (dy - sum(dy * y))."""
    y, axis = cache
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))
