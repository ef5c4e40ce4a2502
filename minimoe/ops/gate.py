"""A scalar gate per token on a branch's output: Qwen2-MoE's gated shared expert.

    y = v * sigmoid(z)          v (N, C) the branch output, z (N, 1) = x W_gate the gate logit

Qwen1.5-MoE / Qwen2-MoE (Qwen team 2024; transformers' Qwen2MoeSparseMoeBlock) scale their
always-on shared expert by this learned gate, so each token decides how much of the shared
expert it takes; DeepSeekMoE adds its shared experts ungated.
Legend: N tokens, C channels.
"""

from typing import Any, NamedTuple

from minimoe.ops.activation import sigmoid


class SigmoidGateCache(NamedTuple):
    v: Any  # (N, C) the gated branch output
    g: Any  # (N, 1) sigmoid(z)


def sigmoid_gate_forward(v, z):
    """v (N, C), z (N, 1) -> y (N, C) = v * sigmoid(z), cache."""
    g = sigmoid(z)
    return v * g, SigmoidGateCache(v, g)


def sigmoid_gate_backward(dy, cache):
    """dy (N, C) -> dv (N, C), dz (N, 1).
    dv = dy * g;   dz = sum_C(dy * v) * g (1 - g)   (sigmoid' = g (1 - g))."""
    g = cache.g
    dz = (dy * cache.v).sum(axis=-1, keepdims=True) * g * (1.0 - g)
    return dy * g, dz
