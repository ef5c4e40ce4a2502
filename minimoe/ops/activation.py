"""Elementwise activations and softmax, each a forward/backward pair. Shapes are unchanged."""

import contextlib
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
        # in place on one buffer (large temporaries cost more than the arithmetic):
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
        return y, (x, t, approximate)
    if approximate == "none":
        phi_cdf = backend.erf(x * (1.0 / math.sqrt(2.0)))
        phi_cdf += 1.0
        phi_cdf *= 0.5
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
        # the same formula, evaluated in place in two buffers
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
    phi_cdf = aux
    d = x * x
    d *= -0.5
    xp.exp(d, out=d)
    d *= _INV_SQRT_2PI
    d *= x
    d += phi_cdf
    d *= dy
    return d


def sigmoid(x):
    """Numerically stable logistic function 1 / (1 + exp(-x)), elementwise.

    exp(-x) overflows to inf for very negative x (x < -88 in float32) and 1 / (1 + inf) = 0:
    the right limit, and the true value there is below the smallest normal float anyway. So we
    silence the overflow warning instead of branching: four passes over x, no `where` (whose
    data-dependent branch is several times slower on large arrays).
    """
    xp = backend.xp_of(x)
    with _ignore_overflow(xp):
        s = xp.negative(x)
        xp.exp(s, out=s)
    s += 1.0
    xp.reciprocal(s, out=s)
    return s


def _ignore_overflow(xp):
    """numpy.errstate(over="ignore"); CuPy raises no floating-point warnings, so nothing there."""
    errstate = getattr(xp, "errstate", None)
    return errstate(over="ignore") if errstate is not None else contextlib.nullcontext()


def silu_forward(x):
    """(...) -> (...).  SiLU(x) = x * sigmoid(x)  (a.k.a. swish; Elfwing et al. 2017).
    The cache keeps the output y and s = sigmoid(x), not x: the backward needs only those."""
    s = sigmoid(x)
    y = x * s
    return y, (y, s)


def silu_backward(dy, cache):
    """dy -> dx.  d/dx [x s(x)] = s + x s (1 - s) = s + y (1 - s),  y = x s."""
    y, s = cache
    xp = backend.xp_of(y)
    d = xp.subtract(1.0, s)  # evaluated in place in one buffer
    d *= y
    d += s
    d *= dy
    return d


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
