"""Elementwise activations and softmax, each a forward/backward pair. Shapes are unchanged.

Each op whose fast version no longer reads as its formula (GELU, the sigmoid, SiLU) comes first as
`*_reference`: the plain NumPy expression of the formula, same signature, same outputs (a test
checks them equal in float64). The fast version below it computes the same numbers in place.
"""

import math
from typing import Any, NamedTuple

from minimoe import backend

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_VALID = ("tanh", "none")

# ---------------------------------------------------------------------------------------------
# GELU(x) = x * Phi(x), Phi the standard normal CDF (Hendrycks & Gimpel 2016)
# ---------------------------------------------------------------------------------------------


class GeluCache(NamedTuple):
    x: Any  # (...) the input
    t_or_cdf: Any  # (...) t = tanh(sqrt(2/pi) (x + 0.044715 x^3)) for "tanh", Phi(x) for "none"
    approximate: str  # "tanh" or "none"


def gelu_forward_reference(x, approximate="tanh"):
    """(...) -> (...).  GELU(x) = x * Phi(x), the plain twin of `gelu_forward`:
    "tanh":  Phi(x) ~ (1 + t) / 2,  t = tanh(sqrt(2/pi) (x + 0.044715 x^3));
    "none":  Phi(x) = (1 + erf(x / sqrt(2))) / 2."""
    xp = backend.xp_of(x)
    if approximate == "tanh":
        t = xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))
        return 0.5 * x * (1.0 + t), GeluCache(x, t, approximate)
    if approximate == "none":
        cdf = 0.5 * (1.0 + backend.erf(x / math.sqrt(2.0)))
        return x * cdf, GeluCache(x, cdf, approximate)
    raise ValueError(f"gelu approximate must be one of {_GELU_VALID}, got {approximate!r}")


def gelu_backward_reference(dy, cache):
    """dy -> dx, the plain twin of `gelu_backward`:
    "tanh":  dx = dy * ((1 + t)/2 + x/2 (1 - t^2) du/dx),  du/dx = sqrt(2/pi) (1 + 3*0.044715 x^2);
    "none":  dx = dy * (Phi(x) + x phi(x)),  phi(x) = exp(-x^2/2) / sqrt(2 pi)."""
    x = cache.x
    xp = backend.xp_of(x)
    if cache.approximate == "tanh":
        t = cache.t_or_cdf
        du_dx = math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x**2)  # u = sqrt(2/pi) (x + 0.044715 x^3)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t**2) * du_dx)
    pdf = xp.exp(-0.5 * x**2) / math.sqrt(2.0 * math.pi)
    return dy * (cache.t_or_cdf + x * pdf)


def gelu_forward(x, approximate="tanh"):
    """(...) -> (...).  GELU(x) = x * Phi(x), Phi the standard normal CDF (Hendrycks & Gimpel 2016).

    approximate="tanh" (GPT-2's `gelu_new`): Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2.
    approximate="none": Phi(x) = (1 + erf(x / sqrt(2))) / 2, exactly.
    """
    # Fast twin of gelu_forward_reference: in place on one buffer (large temporaries cost more than
    # the arithmetic on them).
    xp = backend.xp_of(x)
    if approximate == "tanh":
        # t = tanh(sqrt(2/pi) * x * (1 + 0.044715 x^2))
        t = x * x
        t *= 0.044715
        t += 1.0
        t *= x
        t *= _SQRT_2_OVER_PI
        xp.tanh(t, out=t)
        y = t + 1.0
        y *= x
        y *= 0.5
        return y, GeluCache(x, t, approximate)
    if approximate == "none":
        phi_cdf = backend.erf(x * (1.0 / math.sqrt(2.0)))
        phi_cdf += 1.0
        phi_cdf *= 0.5
        return x * phi_cdf, GeluCache(x, phi_cdf, approximate)
    raise ValueError(f"gelu approximate must be one of {_GELU_VALID}, got {approximate!r}")


def gelu_backward(dy, cache):
    """dy -> dx.
    tanh: d/dx = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3*0.044715 x^2)
    exact: d/dx = Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi).
    """
    # Fast twin of gelu_backward_reference: the same formula, in place in two buffers.
    x = cache.x
    xp = backend.xp_of(x)
    if cache.approximate == "tanh":
        t = cache.t_or_cdf
        d = x * x
        d *= 3 * 0.044715 * _SQRT_2_OVER_PI
        d += _SQRT_2_OVER_PI  # du/dx
        d *= x
        u = t * t
        xp.subtract(1.0, u, out=u)  # 1 - t^2
        d *= u
        d += t
        d += 1.0
        d *= 0.5
        d *= dy
        return d
    d = x * x
    d *= -0.5
    xp.exp(d, out=d)
    d *= _INV_SQRT_2PI
    d *= x
    d += cache.t_or_cdf
    d *= dy
    return d


# ---------------------------------------------------------------------------------------------
# sigmoid, SiLU (swish) and SwiGLU
# ---------------------------------------------------------------------------------------------


def sigmoid_reference(x):
    """(...) -> (...).  sigmoid(x) = 1 / (1 + exp(-x)), as written (the plain twin of `sigmoid`;
    numpy warns when exp(-x) overflows, for x < -709 in float64)."""
    return 1.0 / (1.0 + backend.xp_of(x).exp(-x))


def sigmoid(x):
    """Numerically stable logistic function 1 / (1 + exp(-x)), elementwise. (...) -> (...).

    exp(-x) overflows to inf for very negative x (x < -88 in float32) and 1 / (1 + inf) = 0:
    the right limit, and the true value there is below the smallest normal float anyway. So we
    silence the overflow warning instead of branching.
    """
    # Fast twin of sigmoid_reference: four passes over one buffer, no `where` (whose
    # data-dependent branch is several times slower on large arrays) and no temporaries.
    xp = backend.xp_of(x)
    with backend.ignore_overflow():
        s = xp.negative(x)
        xp.exp(s, out=s)
    s += 1.0
    xp.reciprocal(s, out=s)
    return s


def silu_forward_reference(x):
    """(...) -> (...).  SiLU(x) = x * sigmoid(x), the plain twin of `silu_forward`; cache (y, s)."""
    s = sigmoid_reference(x)
    y = x * s
    return y, (y, s)


def silu_backward_reference(dy, cache):
    """dy -> dx = dy * (s + y (1 - s)),  s = sigmoid(x), y = x s: the plain twin of `silu_backward`."""
    y, s = cache
    return dy * (s + y * (1.0 - s))


def silu_forward(x):
    """(...) -> (...).  SiLU(x) = x * sigmoid(x)  (a.k.a. swish; Elfwing et al. 2017).
    The cache keeps the output y and s = sigmoid(x), not x: the backward needs only those."""
    s = sigmoid(x)
    y = x * s
    return y, (y, s)


def silu_backward(dy, cache):
    """dy -> dx.  d/dx [x s(x)] = s + x s (1 - s) = s + y (1 - s),  y = x s."""
    # Fast twin of silu_backward_reference: the same formula in place in one buffer.
    y, s = cache
    xp = backend.xp_of(y)
    d = xp.subtract(1.0, s)
    d *= y
    d += s
    d *= dy
    return d


class SwigluCache(NamedTuple):
    silu_a: Any  # (...) SiLU(a)
    b: Any  # (...) the up projection
    silu: tuple  # the cache of SiLU(a): (SiLU(a), sigmoid(a))


def swiglu_forward(a, b):
    """a, b (...) -> (...).  SwiGLU(a, b) = SiLU(a) * b  (Shazeer 2020, 'GLU variants'):
    a is the gate projection x W1, b the up projection x W3."""
    sa, silu_cache = silu_forward(a)
    return sa * b, SwigluCache(sa, b, silu_cache)


def swiglu_backward(dy, cache):
    """dy -> da, db.   da = dy * b * SiLU'(a),  db = dy * SiLU(a)."""
    return silu_backward(dy * cache.b, cache.silu), dy * cache.silu_a


# ---------------------------------------------------------------------------------------------
# ReLU (the T5 / Switch Transformer feed-forward activation)
# ---------------------------------------------------------------------------------------------


def relu_forward(x):
    """(...) -> (...).  ReLU(x) = max(x, 0)  (Nair & Hinton 2010); the cache is the mask x > 0."""
    xp = backend.xp_of(x)
    return xp.maximum(x, 0), x > 0


def relu_backward(dy, cache):
    """dy -> dx = dy where x > 0, else 0 (at x = 0 we take the derivative 0, as PyTorch does)."""
    return dy * cache


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------


def softmax_forward(x, axis=-1):
    """(...) -> (...), normalised along `axis`:  y_i = exp(x_i) / sum_j exp(x_j).
    Subtracting the max first (which cancels in the ratio) keeps exp from overflowing."""
    xp = backend.xp_of(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    return y, (y, axis)


def softmax_backward(dy, cache):
    """dy -> dx.  The softmax Jacobian is diag(y) - y y^T, so dx = y * (dy - sum(dy * y))."""
    y, axis = cache
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))
