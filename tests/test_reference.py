"""Every fast op equals its plain `*_reference` twin, and every twin passes its own gradient check.

The twins in minimoe/ops are the formula written as a learner would write it; the fast versions
compute the same function in place, in chunks, by sorting, .... Here, in float64 on random
inputs of several shapes (and the edge cases each op has: repeated ids, ignored targets, grouped
and multi-query heads, a key/value cache with Tq < Tk, capacity drops), we check
  - forward outputs agree to REL (1e-12, max-norm relative error);
  - backward gradients agree to REL, given the same dy;
  - the caches are interchangeable: each backward, fed the OTHER forward's cache, gives the
    same gradients (the cache fields mean the same thing in both);
  - the reference pair passes `gradcheck.check_op` (so the twin is itself proven, not just
    equal to something).
"""

import warnings

import numpy as np
import pytest
from conftest import (
    EPS,
    GRAD_TOL,
    TEST_BACKEND,
    asarray,
    assert_allclose,
    assert_array_equal,
    rand,
    to_numpy,
    xp,
)

from minimoe import gradcheck
from minimoe.gradcheck import rel_error
from minimoe.ops import activation, attention, embedding, experts, loss, norm

REL = 1e-12  # fast vs reference, float64 (round-off of a different evaluation order)


def _grads(g):
    return g if isinstance(g, tuple) else (g,)


# ---------------------------------------------------------------------------------------------
# The cases: name -> builder(rng) -> Case
# ---------------------------------------------------------------------------------------------


class Case:
    """fast/ref: (forward, backward); inputs: the forward's arguments; wrt: the positions of the
    inputs that the backward returns gradients for (None: all of them)."""

    def __init__(self, fast, ref, inputs, wrt=None):
        self.fast, self.ref, self.inputs = fast, ref, inputs
        self.wrt = list(range(len(inputs))) if wrt is None else wrt


def _gelu(approximate, shape):
    def build(rng):
        x = rand(rng, *shape, scale=2.0)
        x.reshape(-1)[:3] = (-30.0, 0.0, 30.0)  # saturated tanh / erf, and zero
        return Case(
            ((lambda x: activation.gelu_forward(x, approximate)), activation.gelu_backward),
            (
                (lambda x: activation.gelu_forward_reference(x, approximate)),
                activation.gelu_backward_reference,
            ),
            [x],
        )

    return build


def _silu(shape):
    def build(rng):
        return Case(
            (activation.silu_forward, activation.silu_backward),
            (activation.silu_forward_reference, activation.silu_backward_reference),
            [rand(rng, *shape, scale=3.0)],
        )

    return build


def _layernorm(shape):
    def build(rng):
        C = shape[-1]
        return Case(
            (norm.layernorm_forward, norm.layernorm_backward),
            (norm.layernorm_forward_reference, norm.layernorm_backward_reference),
            [rand(rng, *shape, scale=2.0) + 1.5, 1.0 + rand(rng, C, scale=0.5), rand(rng, C)],
        )

    return build


def _rmsnorm(shape):
    def build(rng):
        return Case(
            (norm.rmsnorm_forward, norm.rmsnorm_backward),
            (norm.rmsnorm_forward_reference, norm.rmsnorm_backward_reference),
            [rand(rng, *shape, scale=2.0), 1.0 + rand(rng, shape[-1], scale=0.5)],
        )

    return build


def _embedding(ids, V=6, C=3):
    def build(rng):
        return Case(
            (embedding.embedding_forward, embedding.embedding_backward),
            (embedding.embedding_forward, embedding.embedding_backward_reference),
            [asarray(ids), rand(rng, V, C)],
            wrt=[1],
        )

    return build


def _cross_entropy(targets, V=7, ignore_index=-1):
    def build(rng):
        t = asarray(targets)
        return Case(
            ((lambda z: loss.cross_entropy_forward(z, t, ignore_index)), loss.cross_entropy_backward),
            (
                (lambda z: loss.cross_entropy_forward_reference(z, t, ignore_index)),
                loss.cross_entropy_backward_reference,
            ),
            [rand(rng, *t.shape, V, scale=2.0)],
        )

    return build


def _rope(B, H, T, D, offset):
    def build(rng):
        cos, sin = attention.rope_tables(T, D, offset=offset, xp=xp(), dtype="float64")
        return Case(
            ((lambda x: attention.rope_forward(x, cos, sin)), attention.rope_backward),
            ((lambda x: attention.rope_forward_reference(x, cos, sin)), attention.rope_backward_reference),
            [rand(rng, B, H, T, D)],
        )

    return build


def _attention(B, H, Hkv, Tq, Tk, D):
    def build(rng):
        q, k, v = rand(rng, B, H, Tq, D), rand(rng, B, Hkv, Tk, D), rand(rng, B, Hkv, Tk, D)
        return Case(
            (attention.causal_attention_forward, attention.causal_attention_backward),
            (attention.causal_attention_forward_reference, attention.causal_attention_backward_reference),
            [q, k, v],
        )

    return build


CASES = {
    "gelu_tanh_1d": _gelu("tanh", (13,)),
    "gelu_tanh_3d": _gelu("tanh", (2, 3, 5)),
    "gelu_exact_1d": _gelu("none", (13,)),
    "gelu_exact_3d": _gelu("none", (2, 3, 5)),
    "silu_2d": _silu((4, 6)),
    "silu_3d": _silu((2, 3, 5)),
    "layernorm_2d": _layernorm((5, 8)),
    "layernorm_3d": _layernorm((2, 3, 6)),
    "layernorm_c3": _layernorm((4, 3)),  # (C = 2 is degenerate: xhat = +-1, dx ~ 0)
    "rmsnorm_2d": _rmsnorm((5, 8)),
    "rmsnorm_3d": _rmsnorm((2, 3, 6)),
    "rmsnorm_c1": _rmsnorm((3, 1)),
    "embedding_repeats": _embedding([[1, 3, 1, 0], [3, 3, 5, 1]]),  # 1 and 3 repeat; 2, 4 unused
    "embedding_all_same": _embedding([[4, 4, 4], [4, 4, 4]]),
    "embedding_one_token": _embedding([[2]]),
    "cross_entropy_ignore": _cross_entropy([[2, 0, -1, 6], [6, -1, 1, 1]]),
    "cross_entropy_none_ignored_2d": _cross_entropy([[0, 1, 2], [3, 4, 5]]),
    "cross_entropy_all_ignored": _cross_entropy([[-1, -1], [-1, -1]]),
    "cross_entropy_ignore_index_2": _cross_entropy([4, 2, 1, 2, 0], ignore_index=2),
    "rope": _rope(2, 3, 5, 6, 0),
    "rope_offset": _rope(2, 3, 5, 6, 7),
    "rope_d2_one_position": _rope(1, 2, 1, 2, 3),
    "attention_mha": _attention(2, 4, 4, 5, 5, 4),
    "attention_gqa": _attention(2, 4, 2, 5, 5, 4),
    "attention_mqa": _attention(2, 4, 1, 5, 5, 4),
    "attention_mha_kvcache": _attention(2, 2, 2, 3, 7, 4),
    "attention_gqa_kvcache": _attention(3, 6, 2, 2, 6, 2),
    "attention_mqa_decode_one": _attention(1, 4, 1, 1, 6, 8),
    "attention_one_position": _attention(2, 2, 1, 1, 1, 3),
}


def _run(pair, inputs, dy=None, seed=0):
    """forward, then backward with dy (drawn once from y's shape when None): y, cache, grads, dy."""
    fwd, bwd = pair
    y, cache = fwd(*inputs)
    if dy is None:
        dy = asarray(np.random.default_rng(seed).standard_normal(y.shape))
    return y, cache, _grads(bwd(dy, cache)), dy


@pytest.mark.parametrize("name", list(CASES))
def test_fast_equals_reference(name):
    case = CASES[name](np.random.default_rng(0))
    y_ref, c_ref, g_ref, dy = _run(case.ref, case.inputs)
    y_fast, c_fast, g_fast, _ = _run(case.fast, case.inputs, dy)
    assert y_fast.shape == y_ref.shape
    assert rel_error(y_fast, y_ref) <= REL, f"{name}: forward differs by {rel_error(y_fast, y_ref):.1e}"
    assert len(g_fast) == len(g_ref) == len(case.wrt)
    for i, (a, b) in enumerate(zip(g_fast, g_ref)):
        assert a.shape == b.shape == case.inputs[case.wrt[i]].shape
        assert rel_error(a, b) <= REL, f"{name}: gradient {i} differs by {rel_error(a, b):.1e}"
    # the same cache fields mean the same thing: each backward accepts the other forward's cache
    for bwd, cache in ((case.fast[1], c_ref), (case.ref[1], c_fast)):
        for a, b in zip(_grads(bwd(dy, cache)), g_ref):
            assert rel_error(a, b) <= REL, f"{name}: backward on the other twin's cache differs"


@pytest.mark.parametrize("name", list(CASES))
def test_reference_passes_gradient_check(name):
    case = CASES[name](np.random.default_rng(1))
    errors = gradcheck.check_op(*case.ref, case.inputs, wrt=case.wrt, eps=EPS)
    assert sorted(errors) == case.wrt
    assert max(errors.values()) <= GRAD_TOL, f"{name}: rel errors {errors}"


def test_a_wrong_reference_would_be_caught():
    # the equality test has teeth: a reference missing the variance path differs from the fast op
    case = CASES["layernorm_3d"](np.random.default_rng(0))

    def wrong_backward(dy, cache):
        dx, dw, db = norm.layernorm_backward_reference(dy, cache)
        g = dy * cache.w
        return cache.rstd * (g - g.mean(axis=-1, keepdims=True)), dw, db

    _, _, g_fast, dy = _run(case.fast, case.inputs)
    _, _, g_wrong, _ = _run((case.ref[0], wrong_backward), case.inputs, dy)
    assert rel_error(g_fast[0], g_wrong[0]) > 1e-3


# ---------------------------------------------------------------------------------------------
# Ops with extra structure: the sigmoid, attention in batch chunks and on strided views,
# and the MoE dispatch / combine
# ---------------------------------------------------------------------------------------------


def test_sigmoid_equals_reference_and_is_silent_where_the_reference_overflows():
    x = asarray(
        np.concatenate([np.linspace(-30.0, 30.0, 61), np.random.default_rng(0).standard_normal(50) * 5])
    )
    assert rel_error(activation.sigmoid(x), activation.sigmoid_reference(x)) <= REL
    big = asarray([-1000.0, -750.0, 0.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast sigmoid must not warn ...
        assert_array_equal(activation.sigmoid(big), [0.0, 0.0, 0.5, 1.0])
    if TEST_BACKEND == "cupy":  # CuPy never warns about floating-point overflow
        assert_array_equal(activation.sigmoid_reference(big), [0.0, 0.0, 0.5, 1.0])
        return
    with pytest.warns(RuntimeWarning, match="overflow"):  # ... where the plain formula does
        assert_array_equal(activation.sigmoid_reference(big), [0.0, 0.0, 0.5, 1.0])


def test_attention_in_several_batch_chunks_on_strided_inputs(monkeypatch):
    # one batch row per chunk, and q, k, v that are strided views (as in the model and the KV
    # cache): the fast path must still equal the reference
    monkeypatch.setattr(attention, "_CHUNK_BYTES", 1)
    assert len(attention._batch_chunks(3, 100)) == 3
    rng = np.random.default_rng(2)
    B, H, Hkv, Tq, Tk, D = 3, 4, 2, 3, 5, 4
    qk = rand(rng, B, H + Hkv, Tq, D)
    q = qk[:, :H]  # not contiguous
    k = rand(rng, B, Hkv, Tk + 2, D)[:, :, :Tk]  # a filled prefix of a longer cache
    v = rand(rng, B, Hkv, Tk + 2, D)[:, :, :Tk]
    assert not q.flags.c_contiguous and not k.flags.c_contiguous
    case = Case(
        (attention.causal_attention_forward, attention.causal_attention_backward),
        (attention.causal_attention_forward_reference, attention.causal_attention_backward_reference),
        [q, k, v],
    )
    y_ref, _, g_ref, dy = _run(case.ref, case.inputs)
    y_fast, _, g_fast, _ = _run(case.fast, case.inputs, dy)
    assert rel_error(y_fast, y_ref) <= REL
    assert all(rel_error(a, b) <= REL for a, b in zip(g_fast, g_ref))


def test_attention_reference_is_causal():
    rng = np.random.default_rng(3)
    q, k, v = rand(rng, 1, 2, 4, 3), rand(rng, 1, 1, 6, 3), rand(rng, 1, 1, 6, 3)
    y, cache = attention.causal_attention_forward_reference(q, k, v)
    p = to_numpy(cache.probs)  # query i sits at position 2 + i and sees keys 0 .. 2 + i
    for i in range(4):
        assert np.all(p[..., i, 3 + i :] == 0.0) and np.all(p[..., i, : 3 + i] > 0.0)
    assert_allclose(p.sum(-1), 1.0, rtol=1e-14)


N, C = 10, 5

DISPATCH_CASES = {  # name -> (E, K, capacity); the routing is drawn at random
    "dropless_k2": (4, 2, None),
    "capacity_drops_k2": (4, 2, 3),
    "capacity_1_k3": (5, 3, 1),
    "dropless_k1": (3, 1, None),
    "capacity_drops_k1_unused_expert": (6, 1, 2),
}


def _routing(E, K, seed):
    rng = np.random.default_rng(seed)
    if K == 1:  # skewed: some experts get many tokens, the last ones none
        idx = rng.integers(0, max(1, E - 2), (N, 1))
    else:
        idx = np.stack([rng.permutation(E)[:K] for _ in range(N)])
    return asarray(idx), asarray(rng.uniform(0.2, 1.0, (N, K))), asarray(rng.standard_normal((N, C)))


@pytest.mark.parametrize("name", list(DISPATCH_CASES))
def test_dispatch_and_combine_equal_their_references(name):
    E, K, capacity = DISPATCH_CASES[name]
    idx, gates, x = _routing(E, K, seed=len(name))
    xs_f, offs_f, counts_f, c_f = experts.dispatch_forward(x, idx, E, capacity)
    xs_r, offs_r, counts_r, c_r = experts.dispatch_forward_reference(x, idx, E, capacity)
    assert offs_f == offs_r and counts_f.tolist() == counts_r.tolist()
    assert_array_equal(xs_f, xs_r)  # the same rows in the same order
    for field in ("order", "token", "slot_pos"):
        assert_array_equal(getattr(c_f, field), getattr(c_r, field), err_msg=field)
    assert (c_f.M, c_f.N, c_f.K) == (c_r.M, c_r.N, c_r.K)
    if capacity is not None:
        assert c_f.M < N * K  # these cases really drop slots

    rng = np.random.default_rng(4)
    y_sorted = asarray(rng.standard_normal(xs_f.shape))
    y_f, cc_f = experts.combine_forward(y_sorted, gates, c_f)
    y_r, cc_r = experts.combine_forward_reference(y_sorted, gates, c_r)
    assert rel_error(y_f, y_r) <= REL
    dy = asarray(rng.standard_normal(y_f.shape))
    for a, b in zip(experts.combine_backward(dy, cc_f), experts.combine_backward_reference(dy, cc_r)):
        assert a.shape == b.shape and rel_error(a, b) <= REL
    dxs = asarray(rng.standard_normal(xs_f.shape))
    dx_f, dx_r = experts.dispatch_backward(dxs, c_f), experts.dispatch_backward_reference(dxs, c_r)
    assert dx_f.shape == dx_r.shape == x.shape and rel_error(dx_f, dx_r) <= REL
    # the cache of either twin serves either backward
    assert rel_error(experts.dispatch_backward_reference(dxs, c_f), dx_f) <= REL
    assert (
        rel_error(experts.combine_backward(dy, cc_r)[1], experts.combine_backward_reference(dy, cc_f)[1])
        <= REL
    )


@pytest.mark.parametrize("name", list(DISPATCH_CASES))
def test_dispatch_combine_reference_passes_gradient_check(name):
    E, K, capacity = DISPATCH_CASES[name]
    idx, gates, x = _routing(E, K, seed=len(name))
    w = asarray(np.random.default_rng(5).standard_normal((C, C)) * 0.5)  # a stand-in for the experts

    def forward(x, gates):  # x, gates -> dispatch -> rows @ w -> combine -> y (N, C)
        xs, _, _, c_disp = experts.dispatch_forward_reference(x, idx, E, capacity)
        y, c_comb = experts.combine_forward_reference(xs @ w, gates, c_disp)
        return y, c_comb

    def backward(dy, cache):
        dys, dgates = experts.combine_backward_reference(dy, cache)
        return experts.dispatch_backward_reference(dys @ w.T, cache.dispatch), dgates

    errors = gradcheck.check_op(forward, backward, [x, gates], eps=EPS)
    assert max(errors.values()) <= GRAD_TOL, errors
