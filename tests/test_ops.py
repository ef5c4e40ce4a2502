"""Float64 gradient checks of every dense op, and the properties each op must have.

Every op is checked by `gradcheck.check_op`: L = sum(y * dy) for a random dy, central
differences against the hand-written backward, max rel error <= GRAD_TOL (1e-6).
`OP_CASES` is shared with test_mutation.py, which breaks each backward and shows that the same
check then fails.
"""

import math

import numpy as np
import pytest
from conftest import EPS, GRAD_TOL, asarray, assert_allclose, assert_array_equal, rand, to_numpy, xp

from minimoe import backend, gradcheck
from minimoe.ops import (
    activation,
    attention,
    balance,
    dropout,
    embedding,
    experts,
    ffn,
    linear,
    loss,
    norm,
    router,
)

# ---------------------------------------------------------------------------------------------
# The cases: name -> builder(rng) -> (forward, backward, inputs, wrt)
# forward(*inputs) -> (y, cache); backward(dy, cache) -> one gradient per input in wrt.
# ---------------------------------------------------------------------------------------------


def _linear(bias, shape):
    def build(rng):
        x, w = rand(rng, *shape, 4), rand(rng, 4, 5)
        if bias:
            return linear.linear_forward, linear.linear_backward, [x, w, rand(rng, 5)], None
        return (
            (lambda x, w: linear.linear_forward(x, w)),
            (lambda dy, c: linear.linear_backward(dy, c)[:2]),
            [x, w],
            None,
        )

    return build


def _embedding(rng):
    ids = asarray([[1, 3, 1, 0], [3, 3, 4, 1]])  # ids 1 and 3 repeat, id 2 is absent
    return embedding.embedding_forward, embedding.embedding_backward, [ids, rand(rng, 5, 3)], [1]


def _layernorm(rng):
    x, w, b = rand(rng, 2, 3, 6), 1.0 + rand(rng, 6, scale=0.5), rand(rng, 6)
    return norm.layernorm_forward, norm.layernorm_backward, [x, w, b], None


def _rmsnorm(rng):
    x, w = rand(rng, 2, 3, 6), 1.0 + rand(rng, 6, scale=0.5)
    return norm.rmsnorm_forward, norm.rmsnorm_backward, [x, w], None


def _gelu(approximate):
    def build(rng):
        x = np.concatenate([rng.standard_normal(12) * 2.0, np.linspace(-6.0, 6.0, 13)])  # both erf branches
        x = asarray(x)
        return (lambda x: activation.gelu_forward(x, approximate)), activation.gelu_backward, [x], None

    return build


def _silu(rng):
    return activation.silu_forward, activation.silu_backward, [rand(rng, 3, 5, scale=3.0)], None


def _swiglu(rng):
    return activation.swiglu_forward, activation.swiglu_backward, [rand(rng, 3, 5), rand(rng, 3, 5)], None


def _softmax(axis):
    def build(rng):
        fwd = lambda x: activation.softmax_forward(x, axis)
        return fwd, activation.softmax_backward, [rand(rng, 3, 4, 5, scale=2.0)], None

    return build


def _cross_entropy(rng):
    targets = asarray([[2, 0, -1, 6], [6, -1, 1, 1]])  # two positions ignored
    fwd = lambda z: loss.cross_entropy_forward(z, targets)
    return fwd, loss.cross_entropy_backward, [rand(rng, 2, 4, 7, scale=2.0)], None


def _dropout(rng):
    # a fresh Generator with the same seed on every call: the same mask in every forward
    fwd = lambda x: dropout.dropout_forward(x, 0.3, backend.make_rng(7))
    return fwd, dropout.dropout_backward, [rand(rng, 4, 6)], None


def _rope(offset):
    def build(rng):
        cos, sin = attention.rope_tables(5, 6, offset=offset, xp=xp(), dtype="float64")
        return (
            (lambda x: attention.rope_forward(x, cos, sin)),
            attention.rope_backward,
            [rand(rng, 2, 3, 5, 6)],
            None,
        )

    return build


def _attention(H, Hkv, Tq, Tk):
    def build(rng):
        q, k, v = rand(rng, 2, H, Tq, 4), rand(rng, 2, Hkv, Tk, 4), rand(rng, 2, Hkv, Tk, 4)
        return attention.causal_attention_forward, attention.causal_attention_backward, [q, k, v], None

    return build


def _gelu_mlp(approximate, bias):
    def build(rng):
        x, w1, w2 = rand(rng, 2, 3, 4), rand(rng, 4, 6), rand(rng, 6, 4)
        if bias:
            fwd = lambda x, w1, b1, w2, b2: ffn.gelu_mlp_forward(x, w1, b1, w2, b2, approximate)
            return fwd, ffn.gelu_mlp_backward, [x, w1, rand(rng, 6), w2, rand(rng, 4)], None
        fwd = lambda x, w1, w2: ffn.gelu_mlp_forward(x, w1, None, w2, None, approximate)

        def bwd(dy, cache):
            dx, dw1, db1, dw2, db2 = ffn.gelu_mlp_backward(dy, cache)
            assert db1 is None and db2 is None
            return dx, dw1, dw2

        return fwd, bwd, [x, w1, w2], None

    return build


def _swiglu_mlp(rng):
    x, w1, w3, w2 = rand(rng, 2, 3, 4), rand(rng, 4, 6), rand(rng, 4, 6), rand(rng, 6, 4)
    return ffn.swiglu_mlp_forward, ffn.swiglu_mlp_backward, [x, w1, w3, w2], None


OP_CASES = {
    "linear_bias_3d": _linear(True, (2, 3)),
    "linear_nobias_3d": _linear(False, (2, 3)),
    "linear_bias_2d": _linear(True, (3,)),
    "embedding_repeats": _embedding,
    "layernorm": _layernorm,
    "rmsnorm": _rmsnorm,
    "gelu_tanh": _gelu("tanh"),
    "gelu_exact": _gelu("none"),
    "silu": _silu,
    "swiglu": _swiglu,
    "softmax_last": _softmax(-1),
    "softmax_axis1": _softmax(1),
    "cross_entropy_ignore": _cross_entropy,
    "dropout": _dropout,
    "rope": _rope(0),
    "rope_offset": _rope(3),
    "attention_mha": _attention(4, 4, 5, 5),
    "attention_gqa": _attention(4, 2, 5, 5),
    "attention_mqa": _attention(4, 1, 5, 5),
    "attention_mha_kvcache": _attention(4, 4, 3, 7),
    "attention_gqa_kvcache": _attention(4, 2, 3, 7),
    "attention_mqa_kvcache": _attention(4, 1, 1, 6),
    "gelu_mlp_bias": _gelu_mlp("tanh", True),
    "gelu_mlp_exact_nobias": _gelu_mlp("none", False),
    "swiglu_mlp": _swiglu_mlp,
}


def build_case(name, seed=0):
    fwd, bwd, inputs, wrt = OP_CASES[name](np.random.default_rng(seed))
    return fwd, bwd, inputs, list(range(len(inputs))) if wrt is None else wrt


@pytest.mark.parametrize("name", list(OP_CASES))
def test_gradcheck_op(name):
    fwd, bwd, inputs, wrt = build_case(name)
    errors = gradcheck.check_op(fwd, bwd, inputs, wrt=wrt, eps=EPS)
    assert sorted(errors) == wrt
    assert max(errors.values()) <= GRAD_TOL, f"{name}: rel errors {errors}"


def test_every_public_op_pair_has_a_case():
    # every *_backward exported by minimoe.ops (dense families) is exercised above
    import minimoe.ops as ops

    covered = set(
        """linear embedding layernorm rmsnorm gelu silu swiglu softmax cross_entropy dropout rope
        causal_attention gelu_mlp swiglu_mlp""".split()
    )
    exported = {n[: -len("_backward")] for n in dir(ops) if n.endswith("_backward")}
    assert exported <= covered, f"ops without a gradient-check case: {exported - covered}"


def _long_plain_tuples(cache, where="cache"):
    """Paths inside a cache to tuples of more than two entries that are not NamedTuples (shapes,
    tuples of ints, are fine)."""
    if not isinstance(cache, tuple) or all(isinstance(v, int) for v in cache):
        return []
    bad = [] if hasattr(cache, "_fields") or len(cache) <= 2 else [where]
    names = getattr(cache, "_fields", range(len(cache)))
    for name, field in zip(names, cache):
        bad += _long_plain_tuples(field, f"{where}.{name}")
    return bad


def _moe_op_caches():
    """name -> cache of the MoE ops (router, balance, experts), from one small routing."""
    rng = np.random.default_rng(0)
    N, C, E, K = 6, 4, 3, 2
    x, logits = rand(rng, N, C), rand(rng, N, E)
    gates, idx, c_topk = router.softmax_topk_forward(logits, K)
    _, _, c_sig = router.sigmoid_bias_topk_forward(logits, xp().zeros(E), K)
    probs, _ = router.router_probs_forward(logits, "softmax")
    x_sorted, offsets, _, c_disp = experts.dispatch_forward(x, idx, E, 3)
    w = {"w1": rand(rng, E, C, 5), "w3": rand(rng, E, C, 5), "w2": rand(rng, E, 5, C)}
    y_sorted, c_exp = experts.experts_forward(x_sorted, offsets, w)
    return {
        "softmax_topk": c_topk,
        "sigmoid_bias_topk": c_sig,
        "load_balancing": balance.load_balancing_loss_forward(probs, idx, E)[1],
        "z_loss": balance.z_loss_forward(logits)[1],
        "dispatch": c_disp,
        "experts": c_exp,
        "combine": experts.combine_forward(y_sorted, gates, c_disp)[1],
    }


def test_caches_of_more_than_two_entries_are_named_tuples():
    # a backward reads its cache by field name (cache.probs), never by position: a long plain
    # tuple would let a reordered forward silently feed the wrong array to its backward
    caches = {name: build_case(name)[0](*build_case(name)[2])[1] for name in OP_CASES}
    caches.update(_moe_op_caches())
    bad = {n: _long_plain_tuples(c) for n, c in caches.items()}
    assert not any(bad.values()), {n: b for n, b in bad.items() if b}
    assert type(caches["attention_gqa"]).__name__ == "AttentionCache"
    assert caches["attention_gqa"].probs.shape == (2, 4, 5, 5)  # (B, H, Tq, Tk), per query head


# ---------------------------------------------------------------------------------------------
# Embedding: repeated ids accumulate
# ---------------------------------------------------------------------------------------------


def test_embedding_grad_accumulates_repeats(rng):
    ids = np.array([[1, 3, 1, 0], [3, 3, 4, 1]])
    w = rand(rng, 5, 3)
    y, cache = embedding.embedding_forward(asarray(ids), w)
    assert_array_equal(y, to_numpy(w)[ids])
    dy = rand(rng, *y.shape)
    dw, dy = to_numpy(embedding.embedding_backward(dy, cache)), to_numpy(dy)
    expected = np.zeros_like(dw)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            expected[ids[b, t]] += dy[b, t]
    assert_allclose(dw, expected, rtol=0, atol=1e-14)
    assert np.all(dw[2] == 0.0)  # id 2 never appears
    assert_allclose(dw[3], dy[0, 1] + dy[1, 0] + dy[1, 1], rtol=1e-14)  # three uses of id 3


# ---------------------------------------------------------------------------------------------
# Activations: forward values
# ---------------------------------------------------------------------------------------------


def test_gelu_exact_forward_matches_math_erf():
    x = np.linspace(-8.0, 8.0, 801)
    y, _ = activation.gelu_forward(asarray(x), "none")
    expected = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    assert_allclose(y, expected, rtol=1e-13, atol=1e-15)


def test_gelu_tanh_forward_matches_formula():
    x = np.linspace(-8.0, 8.0, 801)
    y, _ = activation.gelu_forward(asarray(x), "tanh")
    c = math.sqrt(2.0 / math.pi)
    expected = np.array([0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v**3))) for v in x])
    assert_allclose(y, expected, rtol=1e-13, atol=1e-15)
    # the two GELUs differ, but by little (the tanh form approximates Phi to ~1e-3)
    exact, _ = activation.gelu_forward(asarray(x), "none")
    assert 0 < np.abs(to_numpy(y - exact)).max() < 1e-2


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        activation.gelu_forward(xp().zeros(3), "sigmoid")


def test_silu_and_softmax_values(rng):
    x = rand(rng, 4, 5, scale=3.0)
    y, _ = activation.silu_forward(x)
    p, _ = activation.softmax_forward(x + 1000.0)  # stable: no overflow for large logits
    x = to_numpy(x)
    assert_allclose(y, x / (1.0 + np.exp(-x)), rtol=1e-14)
    assert_allclose(p, np.exp(x) / np.exp(x).sum(-1, keepdims=True), rtol=1e-12)
    assert_allclose(p.sum(-1), 1.0, rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------


def test_cross_entropy_matches_direct_computation(rng):
    logits = rand(rng, 2, 4, 7, scale=2.0)
    targets = np.array([[2, 0, -1, 6], [6, -1, 1, 1]])
    got, _ = loss.cross_entropy_forward(logits, asarray(targets))
    logits = to_numpy(logits)
    terms = []
    for b in range(2):
        for t in range(4):
            if targets[b, t] != -1:
                p = np.exp(logits[b, t]) / np.exp(logits[b, t]).sum()
                terms.append(-math.log(p[targets[b, t]]))
    assert len(terms) == 6
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-13)


def test_cross_entropy_custom_ignore_index_and_large_logits(rng):
    logits = rand(rng, 3, 5) + 800.0  # a naive exp would overflow
    got, _ = loss.cross_entropy_forward(logits, asarray([4, 2, 1]), ignore_index=2)
    z = to_numpy(logits) - 800.0
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert float(got) == pytest.approx(-(lp[0, 4] + lp[2, 1]) / 2, rel=1e-12)


def test_cross_entropy_all_ignored_is_zero_with_zero_grad(rng):
    logits = rand(rng, 2, 3, 5)
    loss_value, cache = loss.cross_entropy_forward(logits, xp().full((2, 3), -1))
    assert float(loss_value) == 0.0
    d = loss.cross_entropy_backward(1.0, cache)
    assert d.shape == logits.shape and np.all(to_numpy(d) == 0.0)


def test_cross_entropy_rejects_mismatched_targets(rng):
    with pytest.raises(ValueError, match="targets"):
        loss.cross_entropy_forward(rand(rng, 2, 3, 5), xp().zeros((2, 4), dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


def test_dropout_same_seed_same_mask_and_different_seed_differs(rng):
    x = rand(rng, 50, 40)
    y1, m1 = dropout.dropout_forward(x, 0.25, backend.make_rng(3))
    y2, m2 = dropout.dropout_forward(x, 0.25, backend.make_rng(3))
    y3, _ = dropout.dropout_forward(x, 0.25, backend.make_rng(4))
    assert_array_equal(y1, y2)
    assert_array_equal(m1, m2)
    x, y1, m1 = to_numpy(x), to_numpy(y1), to_numpy(m1)
    assert not np.array_equal(y1, to_numpy(y3))
    # survivors are scaled by 1/(1-p); the rest are exactly zero
    kept = m1 != 0
    assert_allclose(y1[kept], x[kept] / 0.75, rtol=1e-15)
    assert np.all(y1[~kept] == 0.0)


def test_dropout_identity_when_off(rng):
    x = rand(rng, 6, 7)
    for p, training in ((0.0, True), (0.5, False)):
        y, cache = dropout.dropout_forward(x, p, backend.make_rng(0), training=training)
        assert_array_equal(y, x)
        dy = rand(rng, 6, 7)
        assert_array_equal(dropout.dropout_backward(dy, cache), dy)


def test_dropout_expectation_and_drop_rate():
    # E[y] = x: with n = 200k and p = 0.3, the mean of y has std sqrt(p/(1-p)/n) ~ 1.5e-3
    x = xp().full(200_000, 2.0)
    y, _ = dropout.dropout_forward(x, 0.3, backend.make_rng(11))
    y = to_numpy(y)
    assert abs(y.mean() - 2.0) < 0.02
    assert abs((y == 0).mean() - 0.3) < 0.01


def test_dropout_backward_uses_forward_mask(rng):
    x = rand(rng, 30, 30)
    y, cache = dropout.dropout_forward(x, 0.4, backend.make_rng(5))
    dy = rand(rng, 30, 30)
    dx, dy, y = (to_numpy(a) for a in (dropout.dropout_backward(dy, cache), dy, y))
    assert_array_equal(dx == 0, y == 0)
    assert_allclose(dx[y != 0], dy[y != 0] / 0.6, rtol=1e-15)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_invalid_p(p):
    with pytest.raises(ValueError, match="dropout p"):
        dropout.dropout_forward(xp().ones(3), p, backend.make_rng(0))


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------


def test_rope_preserves_norms(rng):
    cos, sin = attention.rope_tables(9, 8, xp=xp(), dtype="float64")
    x = rand(rng, 2, 3, 9, 8)
    y, _ = attention.rope_forward(x, cos, sin)
    x, y = to_numpy(x), to_numpy(y)
    assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    # each rotated pair (x1_i, x2_i) keeps its own length too
    pair = lambda a: a[..., :4] ** 2 + a[..., 4:] ** 2
    assert_allclose(pair(y), pair(x), rtol=1e-12)
    assert not np.allclose(y[:, :, 1:], x[:, :, 1:])  # positions > 0 are actually rotated
    assert_allclose(y[:, :, 0], x[:, :, 0], rtol=1e-15)  # position 0: angle 0


def test_rope_dot_product_depends_only_on_relative_position(rng):
    D, T = 8, 12
    cos, sin = attention.rope_tables(T, D, xp=xp(), dtype="float64")
    q, k = rng.standard_normal(D), rng.standard_normal(D)

    def at(v, pos):  # v placed at position pos, rotated
        x = np.zeros((1, 1, T, D))
        x[0, 0, pos] = v
        return to_numpy(attention.rope_forward(asarray(x), cos, sin)[0][0, 0, pos])

    dots = [at(q, m) @ at(k, m - 3) for m in (3, 5, 8, 11)]
    assert_allclose(dots, dots[0], rtol=1e-12)
    assert abs(at(q, 5) @ at(k, 1) - dots[0]) > 1e-6  # a different offset gives a different score


def test_rope_tables_offset_and_odd_size():
    cos, sin = attention.rope_tables(6, 4, xp=xp(), dtype="float64")
    cos3, sin3 = attention.rope_tables(3, 4, offset=3, xp=xp(), dtype="float64")
    assert_array_equal(cos[3:], cos3)
    assert_array_equal(sin[3:], sin3)
    with pytest.raises(ValueError, match="even head size"):
        attention.rope_tables(4, 5, xp=xp())


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def _naive_attention(q, k, v):
    """Loop reference: query head h reads key/value head h // (H / Hkv); query i sits at
    position Tk - Tq + i and sees keys 0 .. Tk - Tq + i."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    y = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // (H // Hkv)], v[b, h // (H // Hkv)]
            for i in range(Tq):
                n = Tk - Tq + i + 1
                s = kh[:n] @ q[b, h, i] / math.sqrt(D)
                p = np.exp(s - s.max())
                y[b, h, i] = (p / p.sum()) @ vh[:n]
    return y


@pytest.mark.parametrize(
    "H,Hkv,Tq,Tk", [(4, 4, 5, 5), (4, 2, 5, 5), (4, 1, 5, 5), (4, 2, 2, 6), (2, 1, 1, 4)]
)
def test_attention_matches_loop_reference(rng, H, Hkv, Tq, Tk):
    q, k, v = rand(rng, 2, H, Tq, 4), rand(rng, 2, Hkv, Tk, 4), rand(rng, 2, Hkv, Tk, 4)
    y, _ = attention.causal_attention_forward(q, k, v)
    assert_allclose(y, _naive_attention(*(to_numpy(a) for a in (q, k, v))), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_attention_is_causal(rng, Hkv):
    B, H, T, D = 2, 4, 6, 4
    q, k, v = rand(rng, B, H, T, D), rand(rng, B, Hkv, T, D), rand(rng, B, Hkv, T, D)
    y, _ = attention.causal_attention_forward(q, k, v)
    for t in range(T - 1):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        q2[:, :, t + 1 :] += 5.0
        k2[:, :, t + 1 :] = rand(rng, B, Hkv, T - t - 1, D)
        v2[:, :, t + 1 :] = rand(rng, B, Hkv, T - t - 1, D)
        y2, _ = attention.causal_attention_forward(q2, k2, v2)
        assert_allclose(y2[:, :, : t + 1], y[:, :, : t + 1], rtol=0, atol=1e-13)
        assert not np.allclose(to_numpy(y2[:, :, t + 1 :]), to_numpy(y[:, :, t + 1 :]))


# ---------------------------------------------------------------------------------------------
# Feed-forward networks against their definitions
# ---------------------------------------------------------------------------------------------


def test_ffn_values(rng):
    x, w1, w3, w2 = rand(rng, 2, 3, 4), rand(rng, 4, 6), rand(rng, 4, 6), rand(rng, 6, 4)
    b1, b2 = rand(rng, 6), rand(rng, 4)
    y_swiglu, _ = ffn.swiglu_mlp_forward(x, w1, w3, w2)
    y, _ = ffn.gelu_mlp_forward(x, w1, b1, w2, b2)
    x, w1, w3, w2, b1, b2 = (to_numpy(a) for a in (x, w1, w3, w2, b1, b2))
    g = x @ w1
    assert_allclose(y_swiglu, (g / (1.0 + np.exp(-g)) * (x @ w3)) @ w2, rtol=1e-12)
    h = x @ w1 + b1
    gelu = 0.5 * h * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    assert_allclose(y, gelu @ w2 + b2, rtol=1e-12)
