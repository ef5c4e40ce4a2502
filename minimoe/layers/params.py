"""The parameters of a GPT: their names, shapes and initial values, block by block.

    init_params(config, seed)   name -> host float64 array, in the model's order (model.GPT uses it)
    param_shapes(config)        name -> shape, without drawing or storing a single weight

Each block's attention (layers/attention.py or layers/mla.py), dense FFN (layers/ffn.py) or MoE
layer (layers/moe.py) names and makes its own weights; this module puts them in order.
"""

from __future__ import annotations

import math

import numpy

from minimoe.config import Config
from minimoe.layers import attention, ffn, mla, moe


def init_params(config: Config, seed: int, rng=None) -> dict:
    """Host (numpy, float64) initial weights, so every backend starts from identical numbers.

    N(0, init_std) for matrices, with GPT-2's 1/sqrt(2 * n_layer) shrink on the projections that
    write into the residual stream (attn.wo, mlp.w2, experts' w2); ones for norm gains; zeros
    for biases. rng: where the normal draws come from (default: numpy's, seeded by `seed`).
    """
    c = config
    rng = numpy.random.default_rng(seed) if rng is None else rng
    C, V, F = c.n_embd, c.vocab_size, c.ffn_hidden
    std, std_out = c.init_std, c.init_std / math.sqrt(2 * c.n_layer)
    p = {}

    def normal(shape, s):
        return rng.standard_normal(shape) * s

    p["wte"] = normal((V, C), std)
    if c.pos_emb == "learned":
        p["wpe"] = normal((c.block_size, C), std)
    for i in range(c.n_layer):
        pre = f"blocks.{i}."
        p[pre + "ln1.w"] = numpy.ones(C)
        if c.norm == "layernorm":
            p[pre + "ln1.b"] = numpy.zeros(C)
        if c.attention == "mla":
            p.update(mla.init_params(c, pre + "attn.", rng, std, std_out))
        else:
            p.update(attention.init_params(c, pre + "attn.", rng, std, std_out))
        p[pre + "ln2.w"] = numpy.ones(C)
        if c.norm == "layernorm":
            p[pre + "ln2.b"] = numpy.zeros(C)
        if c.is_moe_block(i):
            p.update(moe.init_params(c, pre + "moe.", rng, std, std_out))
        else:
            p.update(ffn.init_ffn_params(c, pre + "mlp.", F, rng, std, std_out))
    p["ln_f.w"] = numpy.ones(C)
    if c.norm == "layernorm":
        p["ln_f.b"] = numpy.zeros(C)
    if not c.tie_embeddings:
        p["lm_head"] = normal((C, V), std)
    return p


class _Shape:
    """A weight's shape standing in for the weight: `param_shapes` draws nothing and stores nothing."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __mul__(self, _):
        return self


class _ShapeRng:
    def standard_normal(self, shape):
        return _Shape(shape)


def param_shapes(config: Config) -> dict:
    """{name: shape} of the parameters GPT(config) has, in its order, without allocating them
    (hf.load_pretrained fills a model of several GB from a checkpoint this way)."""
    return {k: tuple(v.shape) for k, v in init_params(config, 0, rng=_ShapeRng()).items()}
