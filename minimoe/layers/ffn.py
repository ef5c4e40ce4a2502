"""The dense feed-forward network of a block, as a Config describes it.

    GELU MLP (GPT-2, activation "gelu" / "gelu_exact"):  y = GELU(x W1 + b1) W2 + b2
    SwiGLU (Llama, activation "swiglu"):                  y = (SiLU(x W1) * (x W3)) W2
    ReLU MLP (T5, Switch, activation "relu"):             y = ReLU(x W1 + b1) W2 + b2
    x (..., C) -> y (..., C);  W1, W3 (C, F), W2 (F, C), b1 (F,), b2 (C,) when config.bias

Weights are read from the model's flat dict under a prefix: `pre + "w1"` etc. with pre
"blocks.i.mlp." for a dense block, or "blocks.i.moe.shared." for DeepSeekMoE's always-on shared
experts (S experts of width F_s are one FFN of width S * F_s: their hidden units sit side by side).
The math is in ops/ffn.py; this layer picks the variant and names the weights.
"""

from __future__ import annotations

import numpy

from minimoe.config import Config
from minimoe.ops import ffn as ops_ffn


def init_ffn_params(c: Config, pre: str, F: int, rng, std: float, std_out: float) -> dict:
    """Host float64 weights of one FFN of hidden width F: N(0, std) for W1 and W3, N(0, std_out)
    for W2 (it writes into the residual stream), zero biases. Drawn from rng in the order
    W1, W3, W2, so a seed gives the same weights as it always has."""
    C = c.n_embd
    if c.activation == "swiglu":
        return {
            pre + "w1": rng.standard_normal((C, F)) * std,
            pre + "w3": rng.standard_normal((C, F)) * std,
            pre + "w2": rng.standard_normal((F, C)) * std_out,
        }
    p = {pre + "w1": rng.standard_normal((C, F)) * std}
    if c.bias:
        p[pre + "b1"] = numpy.zeros(F)
    p[pre + "w2"] = rng.standard_normal((F, C)) * std_out
    if c.bias:
        p[pre + "b2"] = numpy.zeros(C)
    return p


def ffn_forward(c: Config, x, p: dict, pre: str):
    """x (..., C) -> y (..., C), cache. The FFN of config `c` with weights p[pre + ...]."""
    if c.activation == "swiglu":
        return ops_ffn.swiglu_mlp_forward(x, p[pre + "w1"], p[pre + "w3"], p[pre + "w2"])
    if c.activation == "relu":
        return ops_ffn.relu_mlp_forward(x, p[pre + "w1"], p.get(pre + "b1"), p[pre + "w2"], p.get(pre + "b2"))
    approximate = "tanh" if c.activation == "gelu" else "none"
    return ops_ffn.gelu_mlp_forward(
        x, p[pre + "w1"], p.get(pre + "b1"), p[pre + "w2"], p.get(pre + "b2"), approximate
    )


def ffn_backward(c: Config, dy, cache, pre: str, grads: dict):
    """dy (..., C) -> dx (..., C); writes the gradients of the weights into grads[pre + ...]."""
    if c.activation == "swiglu":
        dx, grads[pre + "w1"], grads[pre + "w3"], grads[pre + "w2"] = ops_ffn.swiglu_mlp_backward(dy, cache)
        return dx
    backward = ops_ffn.relu_mlp_backward if c.activation == "relu" else ops_ffn.gelu_mlp_backward
    dx, dw1, db1, dw2, db2 = backward(dy, cache)
    grads[pre + "w1"], grads[pre + "w2"] = dw1, dw2
    if db1 is not None:
        grads[pre + "b1"], grads[pre + "b2"] = db1, db2
    return dx
