"""Float64 gradient checks of the layers a block is made of (minimoe/layers/), and their properties.

    layers/ffn.py        the Config-driven dense FFN: GELU (tanh and exact, with and without
                         biases) and SwiGLU
    layers/attention.py  the attention block: MHA, GQA, MQA, with and without RoPE and biases;
                         causality, and the KV cache against full recomputation
The MoE layer (layers/moe.py) is checked in test_moe.py (every router, capacity, shared experts,
with the balancing and z-losses in the checked loss, and a guard on the router's top-k margin).

`LAYER_CASES` follows test_ops.OP_CASES (name -> builder(rng) -> (forward, backward, inputs, wrt))
and test_mutation.py breaks each of these backwards too, to show that the same check then fails.
"""

import numpy as np
import pytest
from conftest import (
    EPS,
    GRAD_TOL,
    asarray,
    assert_allclose,
    assert_array_equal,
    rand,
    tiny_config,
    to_numpy,
    xp,
)

from minimoe import gradcheck
from minimoe.layers import attention, ffn
from minimoe.ops.attention import rope_tables

# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------


def _ffn(flavour, **overrides):
    """The FFN of tiny_config(flavour, **overrides), checked in x and in every weight it owns."""

    def build(rng):
        c = tiny_config(flavour, **overrides)
        pre = "blocks.0.mlp."
        p = {k: asarray(v) for k, v in ffn.init_ffn_params(c, pre, c.ffn_hidden, rng, 0.5, 0.5).items()}
        for name in p:
            if name.endswith(("b1", "b2")):  # nonzero biases, so their gradient is really tested
                p[name] = rand(rng, *p[name].shape)
        names = list(p)

        def fwd(x, *weights):
            return ffn.ffn_forward(c, x, dict(zip(names, weights)), pre)

        def bwd(dy, cache):
            grads = {}
            dx = ffn.ffn_backward(c, dy, cache, pre, grads)
            assert sorted(grads) == sorted(names)  # a gradient for every weight, nothing else
            return (dx, *[grads[n] for n in names])

        return fwd, bwd, [rand(rng, 2, 3, c.n_embd), *p.values()], None

    return build


def _self_attention(H, Hkv, bias, use_rope):
    C, D, T = 8, 8 // H, 5

    def build(rng):
        rope = rope_tables(T, D, xp=xp(), dtype="float64") if use_rope else None
        x, wqkv, wo = (
            rand(rng, 2, T, C),
            rand(rng, C, (H + 2 * Hkv) * D, scale=0.5),
            rand(rng, H * D, C, scale=0.5),
        )
        if bias:
            bqkv, bo = rand(rng, (H + 2 * Hkv) * D), rand(rng, C)
            fwd = lambda x, wqkv, bqkv, wo, bo: attention.self_attention_forward(
                x, wqkv, bqkv, wo, bo, H, Hkv, rope
            )
            return fwd, attention.self_attention_backward, [x, wqkv, bqkv, wo, bo], None
        fwd = lambda x, wqkv, wo: attention.self_attention_forward(x, wqkv, None, wo, None, H, Hkv, rope)

        def bwd(dy, cache):
            dx, dwqkv, dbqkv, dwo, dbo = attention.self_attention_backward(dy, cache)
            assert dbqkv is None and dbo is None
            return dx, dwqkv, dwo

        return fwd, bwd, [x, wqkv, wo], None

    return build


LAYER_CASES = {
    "ffn_gelu_bias": _ffn("gpt2"),
    "ffn_gelu_exact_nobias": _ffn("gpt2", activation="gelu_exact", bias=False),
    "ffn_swiglu": _ffn("llama"),
    "ffn_swiglu_in_gpt2_with_bias_flag": _ffn("gpt2", activation="swiglu"),  # SwiGLU has no biases
    "self_attention_bias": _self_attention(4, 4, True, False),
    "self_attention_nobias": _self_attention(4, 4, False, False),
    "self_attention_rope_nobias": _self_attention(4, 4, False, True),
    "self_attention_rope_bias": _self_attention(2, 2, True, True),
    "self_attention_gqa_rope": _self_attention(4, 2, False, True),
    "self_attention_gqa_rope_bias": _self_attention(4, 2, True, True),
    "self_attention_mqa_bias": _self_attention(4, 1, True, False),
    "self_attention_mqa_rope": _self_attention(4, 1, False, True),
}


def build_case(name, seed=0):
    fwd, bwd, inputs, wrt = LAYER_CASES[name](np.random.default_rng(seed))
    return fwd, bwd, inputs, list(range(len(inputs))) if wrt is None else wrt


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_gradcheck_layer(name):
    fwd, bwd, inputs, wrt = build_case(name)
    errors = gradcheck.check_op(fwd, bwd, inputs, wrt=wrt, eps=EPS)
    assert sorted(errors) == wrt
    assert max(errors.values()) <= GRAD_TOL, f"{name}: rel errors {errors}"


# ---------------------------------------------------------------------------------------------
# The FFN: names and shapes follow the config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flavour, overrides, names",
    [
        ("gpt2", {}, ["w1", "b1", "w2", "b2"]),
        ("gpt2", dict(bias=False), ["w1", "w2"]),
        ("llama", {}, ["w1", "w3", "w2"]),
        ("llama", dict(bias=True), ["w1", "w3", "w2"]),
    ],
)
def test_ffn_params_follow_the_config(flavour, overrides, names):
    c = tiny_config(flavour, **overrides)
    F = 5
    p = ffn.init_ffn_params(c, "x.", F, np.random.default_rng(0), 0.5, 0.25)
    assert list(p) == ["x." + n for n in names]
    C = c.n_embd
    shapes = {"w1": (C, F), "w3": (C, F), "w2": (F, C), "b1": (F,), "b2": (C,)}
    assert {k: v.shape for k, v in p.items()} == {"x." + n: shapes[n] for n in names}
    # drawn in the order w1, (w3), w2 from the generator, biases zero: the same seed gives the
    # same weights as before the FFN moved to layers/
    rng = np.random.default_rng(0)
    for n in names:
        if n.startswith("b"):
            assert_array_equal(p["x." + n], 0.0)
        else:
            std = 0.25 if n == "w2" else 0.5  # std_out on the projection into the residual stream
            assert_array_equal(p["x." + n], rng.standard_normal(shapes[n]) * std)


def test_ffn_gelu_exact_and_tanh_differ():
    # the config's activation name picks the GELU formula: the two differ by ~1e-3, not 0
    rng = np.random.default_rng(0)
    x = rand(rng, 2, 3, 8, scale=2.0)
    ys = {}
    for act in ("gelu", "gelu_exact"):
        c = tiny_config("gpt2", activation=act)
        p = ffn.init_ffn_params(c, "m.", 12, np.random.default_rng(1), 0.5, 0.5)
        ys[act] = ffn.ffn_forward(c, x, {k: asarray(v) for k, v in p.items()}, "m.")[0]
    assert 1e-6 < np.abs(to_numpy(ys["gelu"] - ys["gelu_exact"])).max() < 0.1


# ---------------------------------------------------------------------------------------------
# The attention block: causal, and the KV cache gives what full recomputation gives
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rope", [False, True])
def test_self_attention_is_causal(rng, use_rope):
    B, T, C, H, Hkv = 2, 6, 8, 4, 2
    D = C // H
    rope = rope_tables(T, D, xp=xp(), dtype="float64") if use_rope else None
    x, wqkv, wo = rand(rng, B, T, C), rand(rng, C, (H + 2 * Hkv) * D), rand(rng, H * D, C)
    y, _ = attention.self_attention_forward(x, wqkv, None, wo, None, H, Hkv, rope)
    for t in range(T - 1):
        x2 = x.copy()
        x2[:, t + 1 :] = rand(rng, B, T - t - 1, C)
        y2, _ = attention.self_attention_forward(x2, wqkv, None, wo, None, H, Hkv, rope)
        assert_allclose(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-13)
        assert not np.allclose(to_numpy(y2[:, t + 1 :]), to_numpy(y[:, t + 1 :]))


@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_self_attention_kv_cache_equals_full_recomputation(rng, Hkv):
    B, T, C, H = 2, 7, 8, 4
    D = C // H
    cos, sin = rope_tables(T, D, xp=xp(), dtype="float64")
    x, wqkv, wo = rand(rng, B, T, C), rand(rng, C, (H + 2 * Hkv) * D), rand(rng, H * D, C)
    bqkv, bo = rand(rng, (H + 2 * Hkv) * D), rand(rng, C)
    full, _ = attention.self_attention_forward(x, wqkv, bqkv, wo, bo, H, Hkv, (cos, sin))
    cache = attention.KVCache(1, B, Hkv, T, D, xp=xp(), dtype="float64")
    parts = []
    for lo, hi in ((0, 3), (3, 4), (4, 7)):  # a prompt, then one token, then a chunk
        rope = (cos[lo:hi], sin[lo:hi])
        y, _ = attention.self_attention_forward(x[:, lo:hi], wqkv, bqkv, wo, bo, H, Hkv, rope, kv=(cache, 0))
        cache.pos += hi - lo
        parts.append(y)
    assert_allclose(xp().concatenate(parts, axis=1), full, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="KV cache"):
        attention.self_attention_forward(
            x[:, :1], wqkv, bqkv, wo, bo, H, Hkv, (cos[:1], sin[:1]), kv=(cache, 0)
        )


def test_self_attention_cache_fields_are_named():
    # the backward reads its cache by name; the shape fields say what the forward saw
    rng = np.random.default_rng(0)
    H, Hkv, D, T = 4, 2, 2, 5
    x, wqkv, wo = rand(rng, 3, T, 8), rand(rng, 8, (H + 2 * Hkv) * D), rand(rng, H * D, 8)
    _, cache = attention.self_attention_forward(x, wqkv, None, wo, None, H, Hkv)
    assert isinstance(cache, attention.SelfAttentionCache)
    assert (cache.B, cache.T, cache.H, cache.Hkv, cache.D) == (3, T, H, Hkv, D)
    assert cache.q_rope is None and cache.k_rope is None
