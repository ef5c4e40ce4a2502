"""Position-wise feed-forward networks (the transformer's MLP), built from the ops above.

GELU MLP (GPT-2):  y = GELU(x W1 + b1) W2 + b2           W1 (C, F), W2 (F, C)
ReLU MLP (T5, Switch Transformer):  y = ReLU(x W1 + b1) W2 + b2
SwiGLU (Llama):    y = (SiLU(x W1) * (x W3)) W2           W1, W3 (C, F), W2 (F, C)
The same functions serve dense blocks and DeepSeekMoE's always-on shared experts.
"""

from typing import Any, NamedTuple

from minimoe.ops.activation import (
    gelu_backward,
    gelu_forward,
    relu_backward,
    relu_forward,
    swiglu_backward,
    swiglu_forward,
)
from minimoe.ops.linear import linear_backward, linear_forward


class GeluMlpCache(NamedTuple):
    fc1: tuple  # the cache of h = x W1 + b1
    gelu: tuple  # the cache of a = GELU(h)
    fc2: tuple  # the cache of y = a W2 + b2


def gelu_mlp_forward(x, w1, b1, w2, b2, approximate="tanh"):
    """(..., C) -> (..., C)."""
    h, c1 = linear_forward(x, w1, b1)
    a, ca = gelu_forward(h, approximate)
    y, c2 = linear_forward(a, w2, b2)
    return y, GeluMlpCache(c1, ca, c2)


def gelu_mlp_backward(dy, cache):
    """dy (..., C) -> dx, dw1, db1, dw2, db2 (biases None when absent)."""
    da, dw2, db2 = linear_backward(dy, cache.fc2)
    dh = gelu_backward(da, cache.gelu)
    dx, dw1, db1 = linear_backward(dh, cache.fc1)
    return dx, dw1, db1, dw2, db2


class ReluMlpCache(NamedTuple):
    fc1: tuple  # the cache of h = x W1 + b1
    relu: Any  # the mask h > 0
    fc2: tuple  # the cache of y = a W2 + b2


def relu_mlp_forward(x, w1, b1, w2, b2):
    """(..., C) -> (..., C).  y = ReLU(x W1 + b1) W2 + b2, biases optional (None)."""
    h, c1 = linear_forward(x, w1, b1)
    a, mask = relu_forward(h)
    y, c2 = linear_forward(a, w2, b2)
    return y, ReluMlpCache(c1, mask, c2)


def relu_mlp_backward(dy, cache):
    """dy (..., C) -> dx, dw1, db1, dw2, db2 (biases None when absent)."""
    da, dw2, db2 = linear_backward(dy, cache.fc2)
    dh = relu_backward(da, cache.relu)
    dx, dw1, db1 = linear_backward(dh, cache.fc1)
    return dx, dw1, db1, dw2, db2


class SwigluMlpCache(NamedTuple):
    gate: tuple  # the cache of g = x W1
    up: tuple  # the cache of u = x W3
    swiglu: tuple  # the cache of a = SiLU(g) * u
    down: tuple  # the cache of y = a W2


def swiglu_mlp_forward(x, w1, w3, w2):
    """(..., C) -> (..., C)."""
    g, c1 = linear_forward(x, w1)
    u, c3 = linear_forward(x, w3)
    a, ca = swiglu_forward(g, u)
    y, c2 = linear_forward(a, w2)
    return y, SwigluMlpCache(c1, c3, ca, c2)


def swiglu_mlp_backward(dy, cache):
    """dy (..., C) -> dx, dw1, dw3, dw2."""
    da, dw2, _ = linear_backward(dy, cache.down)
    dg, du = swiglu_backward(da, cache.swiglu)
    dx1, dw1, _ = linear_backward(dg, cache.gate)
    dx3, dw3, _ = linear_backward(du, cache.up)
    return dx1 + dx3, dw1, dw3, dw2
