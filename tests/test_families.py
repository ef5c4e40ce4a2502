"""The pieces of the real MoE families (issue 14), without torch: float64 gradient checks of every
new op, layer variant and whole-model combination, what each one promises, and the Config errors.

    QK-norm (whole projection: OLMoE; per head: Qwen3-MoE), head_dim independent of C/H, biases on
    q/k/v only (Qwen2), Granite's muP multipliers, gated shared experts (Qwen2-MoE), sigmoid routing
    without renormalisation, group-limited routing and routed_scaling_factor (DeepSeek-V3), the
    router logit bias and ReLU experts (Switch), router jitter (Switch, Mixtral).
Parity with transformers is tests/test_hf_families.py. Top-k selections are piecewise constant:
each check that crosses a router asserts (through `margins`) that no deciding score lies near
another, so a finite-difference step cannot change a selection.
"""

import math

import numpy as np
import pytest
from conftest import BROKEN_TOL, EPS, GRAD_TOL, array_equal, asarray, assert_allclose, rand, to_numpy, xp
from test_moe import moe_layer_gradcheck

from minimoe import GPT, Config, backend, count_params, get_preset
from minimoe.errors import ConfigError
from minimoe.gradcheck import check_model, check_op, rel_error
from minimoe.layers import attention, moe
from minimoe.ops import activation, experts, ffn, gate, router
from minimoe.ops.attention import rope_tables
from minimoe.sample import generate

MARGIN = 1e-3  # smallest allowed gap between scores that decide a selection (>> EPS)


@pytest.fixture
def margins(monkeypatch):
    """Record, for every top-k selection made during a test, the smallest gap between the scores
    (and group scores) that decide it; yields the list of those gaps."""
    gaps = []

    def gap(values, k):  # smallest gap among each row's k + 1 best (finite) values
        top = -np.sort(-to_numpy(values), axis=-1)[..., : k + 1]
        d = -np.diff(top, axis=-1)
        if np.isfinite(d).any():
            gaps.append(float(d[np.isfinite(d)].min()))

    softmax_topk, group_topk = router.softmax_topk_forward, router.group_limited_topk

    def softmax_recorded(logits, k, renormalize=True):
        gap(logits, k)
        return softmax_topk(logits, k, renormalize)

    def group_recorded(scores, k, n_group=1, topk_group=1):
        seen = to_numpy(scores)
        if n_group > 1:  # the 2 best of each group, the best groups, then the experts among them
            grouped = seen.reshape(seen.shape[0], n_group, -1)
            gap(grouped, 2)
            group_score = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)
            gap(group_score, topk_group)
            best = np.argsort(-group_score, axis=-1)[:, :topk_group]
            keep = np.zeros_like(group_score, dtype=bool)
            np.put_along_axis(keep, best, True, axis=-1)
            scores_seen = np.where(np.repeat(keep, grouped.shape[-1], axis=-1), seen, -np.inf)
        else:
            scores_seen = seen
        gap(scores_seen, k)
        return group_topk(scores, k, n_group, topk_group)

    monkeypatch.setattr(router, "softmax_topk_forward", softmax_recorded)
    monkeypatch.setattr(router, "group_limited_topk", group_recorded)
    return gaps


# ------------------------------------------------------------------------------------------------
# ops: ReLU, the ReLU MLP and ReLU experts, the sigmoid gate, jitter, the sigmoid router variants
# ------------------------------------------------------------------------------------------------


def _away_from_zero(rng, *shape):
    """Entries of magnitude in [0.2, 1.2]: no finite-difference step crosses ReLU's kink."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.2, 1.2, size=shape)


def test_relu_gradient_and_values(rng):
    x = _away_from_zero(rng, 4, 5)
    d = asarray(x)
    assert check_op(activation.relu_forward, activation.relu_backward, [d], eps=EPS)[0] <= GRAD_TOL
    y, _ = activation.relu_forward(d)
    assert array_equal(y, np.where(x > 0, x, 0.0))
    assert array_equal(activation.relu_backward(xp().ones_like(d), activation.relu_forward(d)[1]), x > 0)


@pytest.mark.parametrize("biases", [True, False])
def test_relu_mlp_gradients(rng, biases):
    C, F = 5, 7
    x, w1, w2 = rand(rng, 3, C), rand(rng, C, F, scale=0.5), rand(rng, F, C, scale=0.5)
    b1, b2 = (rand(rng, F), rand(rng, C)) if biases else (None, None)
    h = x @ w1 + (0 if b1 is None else b1)
    assert float(abs(h).min()) > 1e-3  # the pre-activations are away from the kink
    if biases:
        err = check_op(ffn.relu_mlp_forward, ffn.relu_mlp_backward, [x, w1, b1, w2, b2], eps=EPS)
    else:
        fwd = lambda x, w1, w2: ffn.relu_mlp_forward(x, w1, None, w2, None)  # noqa: E731
        bwd = lambda dy, c: tuple(g for g in ffn.relu_mlp_backward(dy, c) if g is not None)  # noqa: E731
        err = check_op(fwd, bwd, [x, w1, w2], eps=EPS)
    assert max(err.values()) <= GRAD_TOL, err
    y, _ = ffn.relu_mlp_forward(x, w1, b1, w2, b2)
    assert_allclose(y, xp().maximum(h, 0) @ w2 + (0 if b2 is None else b2), rtol=1e-13)


def test_relu_experts_gradients_with_an_empty_expert(rng):
    E, C, F, M = 3, 4, 5, 7
    offsets = [0, 3, 3, 7]  # expert 1 receives nothing
    w1, w2, xs = rand(rng, E, C, F, scale=0.6), rand(rng, E, F, C, scale=0.6), rand(rng, M, C)

    def fwd(xs, w1, w2):
        return experts.experts_forward(xs, offsets, {"w1": w1, "w2": w2}, "relu")

    def bwd(dy, cache):
        dx, dw = experts.experts_backward(dy, cache)
        return dx, dw["w1"], dw["w2"]

    assert max(check_op(fwd, bwd, [xs, w1, w2], eps=EPS).values()) <= GRAD_TOL
    y, _ = fwd(xs, w1, w2)
    assert_allclose(y[3:], xp().maximum(xs[3:] @ w1[2], 0) @ w2[2], rtol=1e-13)


def test_sigmoid_gate_gradients_and_values(rng):
    v, z = rand(rng, 6, 4), rand(rng, 6, 1)
    err = check_op(gate.sigmoid_gate_forward, gate.sigmoid_gate_backward, [v, z], eps=EPS)
    assert max(err.values()) <= GRAD_TOL, err
    y, _ = gate.sigmoid_gate_forward(v, z)
    assert_allclose(y, v / (1 + xp().exp(-z)), rtol=1e-14)  # one scalar per token (row)


def test_jitter_gradient_and_values(rng):
    x, u = rand(rng, 5, 3), asarray(rng.uniform(0.9, 1.1, (5, 3)))
    assert (
        check_op(lambda x: router.jitter_forward(x, u), router.jitter_backward, [x], eps=EPS)[0] <= GRAD_TOL
    )
    assert array_equal(router.jitter_forward(x, u)[0], x * u)


def _separated(rng, n, e, gap=0.3):
    """(n, e) logits, each row a shuffled ladder with steps of `gap` plus a row offset."""
    return (
        rng.permuted(np.tile(np.arange(e) * gap, (n, 1)), axis=1)
        - e * gap / 2
        + 0.2 * rng.standard_normal((n, 1))
    )


def _gates(forward):
    def f(*args):
        g, _, cache = forward(*args)
        return g, cache

    return f


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2)])
def test_sigmoid_router_variant_gradients(rng, margins, renormalize, n_group, topk_group):
    E, K = 8, 3
    logits, bias = (
        asarray(_separated(rng, 9, E)),
        asarray(rng.permutation(E) * 0.002),
    )  # small: keeps the gaps
    fwd = _gates(lambda lg: router.sigmoid_bias_topk_forward(lg, bias, K, renormalize, n_group, topk_group))
    err = check_op(fwd, router.sigmoid_bias_topk_backward, [logits], eps=EPS)
    assert err[0] <= GRAD_TOL and min(margins) > MARGIN


def test_sigmoid_router_without_renormalisation_gates_are_the_sigmoids(rng):
    logits, bias = rand(rng, 6, 5), rand(rng, 5, scale=0.3)
    g, idx, _ = router.sigmoid_bias_topk_forward(logits, bias, 2, renormalize=False)
    g_renorm, idx2, _ = router.sigmoid_bias_topk_forward(logits, bias, 2)
    g, idx, logits, bias = (to_numpy(a) for a in (g, idx, logits, bias))
    s = 1 / (1 + np.exp(-logits))
    assert_allclose(g, np.take_along_axis(s, idx, axis=-1), rtol=1e-14)  # unbiased scores ...
    assert array_equal(idx, np.argsort(-(s + bias), axis=-1, kind="stable")[:, :2])  # ... biased choice
    assert array_equal(idx, idx2)
    assert_allclose(g_renorm, g / g.sum(-1, keepdims=True), rtol=1e-14)
    assert np.abs(g.sum(-1) - 1).min() > 1e-3  # not renormalised: the gates do not sum to 1


def _group_limited_by_hand(scores, k, n_group, topk_group):
    """DeepSeek-V3's selection written per token with Python loops, for comparison."""
    out = []
    for row in scores:
        groups = row.reshape(n_group, -1)
        group_score = [sorted(g)[-1] + sorted(g)[-2] for g in groups]
        best = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for e in range(len(row)) if e // groups.shape[1] in best]
        out.append(sorted(allowed, key=lambda e: -row[e])[:k])
    return np.array(out)


@pytest.mark.parametrize("n_group, topk_group, k", [(4, 2, 3), (4, 1, 2), (2, 1, 4), (8, 3, 3)])
def test_group_limited_topk_matches_a_loop_by_hand(rng, n_group, topk_group, k):
    scores = rng.uniform(size=(20, 16))
    idx = to_numpy(router.group_limited_topk(asarray(scores), k, n_group, topk_group))
    assert array_equal(idx, _group_limited_by_hand(scores, k, n_group, topk_group))
    # the experts chosen lie in at most topk_group groups, and the limit really binds sometimes
    assert all(len(set(row // (16 // n_group))) <= topk_group for row in idx)
    assert not array_equal(idx, router.group_limited_topk(asarray(scores), k))


def _new_op_cases(rng):
    """name -> (forward, backward, inputs) of the new ops, for the broken-backward test."""
    logits, bias = asarray(_separated(rng, 6, 8)), asarray(rng.permutation(8) * 0.002)
    H, Hkv, D = 2, 1, 3
    u = asarray(rng.uniform(0.9, 1.1, (4, 3)))
    return {
        "relu_mlp": (ffn.relu_mlp_forward, ffn.relu_mlp_backward,
                     [rand(rng, 3, 4), rand(rng, 4, 5), rand(rng, 5), rand(rng, 5, 4), rand(rng, 4)]),
        "sigmoid_gate": (gate.sigmoid_gate_forward, gate.sigmoid_gate_backward, [rand(rng, 5, 4), rand(rng, 5, 1)]),
        "jitter": (lambda x: router.jitter_forward(x, u), router.jitter_backward, [rand(rng, 4, 3)]),
        "sigmoid_router_plain_groups": (
            _gates(lambda lg: router.sigmoid_bias_topk_forward(lg, bias, 3, False, 4, 2)),
            router.sigmoid_bias_topk_backward, [logits]),
        "qk_norm_head": (
            lambda qkv, wq, wk: attention.qk_norm_forward(qkv, attention.QKNorm(True, wq, wk, 1e-6), H, Hkv, D),
            lambda dy, c: attention.qk_norm_backward(dy, c, H, Hkv, D),
            [rand(rng, 2, 3, (H + 2 * Hkv) * D), rand(rng, D), rand(rng, D)]),
    }  # fmt: skip


@pytest.mark.parametrize(
    "name", ["relu_mlp", "sigmoid_gate", "jitter", "sigmoid_router_plain_groups", "qk_norm_head"]
)
def test_a_broken_backward_of_a_new_op_is_caught(name):
    fwd, bwd, inputs = _new_op_cases(np.random.default_rng(4))[name]
    assert max(check_op(fwd, bwd, inputs, eps=EPS).values()) <= GRAD_TOL
    for position in range(len(inputs)):

        def broken(dy, cache, position=position):  # one gradient 1% too large
            grads = bwd(dy, cache)
            grads = list(grads) if isinstance(grads, tuple) else [grads]
            grads[position] = grads[position] * 1.01
            return tuple(grads) if len(grads) > 1 else grads[0]

        assert check_op(fwd, broken, inputs, eps=EPS)[position] > BROKEN_TOL, (name, position)


# ------------------------------------------------------------------------------------------------
# the attention block: QK-norm, head_dim, the attention multiplier
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("H, Hkv, D", [(4, 2, 3), (2, 2, 4), (3, 1, 2)])
def test_qk_norm_gradients(rng, per_head, H, Hkv, D):
    qkv = rand(rng, 2, 3, (H + 2 * Hkv) * D)
    wq, wk = rand(rng, D if per_head else H * D), rand(rng, D if per_head else Hkv * D)

    def fwd(qkv, wq, wk):
        return attention.qk_norm_forward(qkv, attention.QKNorm(per_head, wq, wk, 1e-6), H, Hkv, D)

    bwd = lambda dy, c: attention.qk_norm_backward(dy, c, H, Hkv, D)  # noqa: E731
    err = check_op(fwd, bwd, [qkv, wq, wk], eps=EPS)
    assert max(err.values()) <= GRAD_TOL, err
    out, _ = attention.qk_norm_forward(
        qkv, attention.QKNorm(per_head, wq * 0 + 1, wk * 0 + 1, 1e-14), H, Hkv, D
    )
    q = out[..., : H * D].reshape(2, 3, H, D) if per_head else out[..., : H * D]
    assert_allclose((q**2).mean(-1), 1.0, rtol=1e-12)  # unit RMS over what it normalises
    assert array_equal(out[..., (H + Hkv) * D :], qkv[..., (H + Hkv) * D :])  # v untouched


@pytest.mark.parametrize("per_head", [False, True, None])
def test_attention_with_qk_norm_head_dim_and_multiplier_gradients(rng, per_head):
    B, T, C, H, Hkv, D = 2, 5, 6, 4, 2, 4  # H * D = 16 != C = 6
    rope = rope_tables(T, D, xp=xp(), dtype="float64")
    x, wqkv, bqkv = (
        rand(rng, B, T, C),
        rand(rng, C, (H + 2 * Hkv) * D, scale=0.5),
        rand(rng, (H + 2 * Hkv) * D),
    )
    wo = rand(rng, H * D, C, scale=0.5)
    wq, wk = rand(rng, D if per_head else H * D), rand(rng, D if per_head else Hkv * D)
    q_scale = 0.3 * math.sqrt(D)

    def fwd(x, wqkv, bqkv, wo, wq, wk):
        qk = None if per_head is None else attention.QKNorm(per_head, wq, wk, 1e-5)
        return attention.self_attention_forward(x, wqkv, bqkv, wo, None, H, Hkv, rope, None, qk, q_scale)

    def bwd(dy, cache):
        dx, dwqkv, dbqkv, dwo, dbo, *dqk = attention.self_attention_backward(dy, cache)
        assert dbo is None and len(dqk) == (0 if per_head is None else 2)
        return (dx, dwqkv, dbqkv, dwo, *dqk)

    wrt = [0, 1, 2, 3] if per_head is None else None
    err = check_op(fwd, bwd, [x, wqkv, bqkv, wo, wq, wk], wrt=wrt, eps=EPS)
    assert max(err.values()) <= GRAD_TOL, err


def test_attention_multiplier_none_is_one_over_sqrt_d():
    c = Config(
        flavour="llama", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, head_dim=6, init_std=0.5
    )
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    a = GPT(c, seed=1, dtype="float64").forward(idx)[0]
    b = GPT(c.replace(attention_multiplier=1 / math.sqrt(6)), seed=1, dtype="float64").forward(idx)[0]
    d = GPT(c.replace(attention_multiplier=0.5), seed=1, dtype="float64").forward(idx)[0]
    assert rel_error(a, b) < 1e-14 and rel_error(a, d) > 1e-3


def test_head_dim_shapes_and_counts():
    c = Config(flavour="llama", vocab_size=11, n_layer=2, n_head=4, n_kv_head=2, n_embd=8, head_dim=6,
               qk_norm="head", qkv_bias=True)  # fmt: skip
    p = GPT(c).params
    assert p["blocks.0.attn.wqkv"].shape == (8, (4 + 2 * 2) * 6) and p["blocks.0.attn.wo"].shape == (24, 8)
    assert p["blocks.0.attn.bqkv"].shape == (48,) and "blocks.0.attn.bo" not in p  # q/k/v biases only
    assert p["blocks.1.attn.q_norm.w"].shape == p["blocks.1.attn.k_norm.w"].shape == (6,)
    full = GPT(c.replace(qk_norm="full")).params
    assert full["blocks.0.attn.q_norm.w"].shape == (24,) and full["blocks.0.attn.k_norm.w"].shape == (12,)


# ------------------------------------------------------------------------------------------------
# the MoE layer: router logit bias, jitter, routed scaling, groups, gated shared experts, ReLU
# ------------------------------------------------------------------------------------------------

LAYER = dict(flavour="llama", n_layer=1, n_embd=6, n_head=1, vocab_size=5, block_size=8, n_experts=8,
             top_k=2, expert_hidden=3, init_std=0.5, aux_loss_coef=0.3, z_loss_coef=0.2)  # fmt: skip


MOE_VARIANTS = {
    "switch-bias-relu-capacity": dict(top_k=1, renormalize=False, router_logit_bias=True, activation="relu",
                                      capacity_factor=1.0),
    "jitter-router-scope": dict(router_jitter=0.2),
    "jitter-moe-scope-shared": dict(router_jitter=0.2, jitter_scope="moe", n_shared_experts=1),
    "qwen2-gated-shared": dict(renormalize=False, n_shared_experts=1, shared_hidden=4, shared_gate=True),
    "deepseek-v3-router": dict(router="sigmoid_bias", renormalize=True, n_group=4, topk_group=2, top_k=3,
                               routed_scaling_factor=2.5, n_shared_experts=2, shared_hidden=2),
    "sigmoid-no-renorm-scaled": dict(router="sigmoid_bias", renormalize=False, routed_scaling_factor=1.7),
    "softmax-scaled-noisy": dict(router="noisy", routed_scaling_factor=0.6, router_jitter=0.1),
}  # fmt: skip


# seeds whose routing keeps every deciding gap above MARGIN (others may put two scores within 1e-3)
SEEDS = {"deepseek-v3-router": 10, "deepseek-v3-mla": 6}


@pytest.mark.parametrize("name", sorted(MOE_VARIANTS))
def test_moe_layer_variant_gradients(name, margins):
    c = Config(**{**LAYER, **MOE_VARIANTS[name]})
    training = c.router_jitter > 0 or c.router == "noisy"
    errors, _, cache, stats = moe_layer_gradcheck(
        c, SEEDS.get(name, 3), training, bias="random", perturb=("router.b", "shared_gate.w")
    )
    assert max(errors.values()) <= GRAD_TOL, errors
    assert min(margins) > MARGIN
    assert (cache.jitter is not None) == (c.router_jitter > 0)
    if c.capacity_factor:
        assert stats["dropped_fraction"] > 0


def test_jitter_acts_only_in_training_and_within_its_range():
    c = Config(**{**LAYER, "router_jitter": 0.1, "jitter_scope": "moe"})
    rng = np.random.default_rng(0)
    p = {k: asarray(v) for k, v in moe.init_params(c, "m.", rng, 0.5, 0.5).items()}
    h = asarray(rng.standard_normal((2, 3, 6)))
    plain = moe.moe_forward(c.replace(router_jitter=0.0), h, p, {}, "m.", None, True)[0]
    assert array_equal(moe.moe_forward(c, h, p, {}, "m.", backend.make_rng(1), False)[0], plain)
    y, cache, _ = moe.moe_forward(c, h, p, {}, "m.", backend.make_rng(1), True)
    u = to_numpy(cache.jitter)
    assert 0.9 <= u.min() and u.max() <= 1.1 and u.std() > 0.02
    assert not np.allclose(to_numpy(y), to_numpy(plain))


def test_routed_scaling_factor_scales_the_gates_only():
    c = Config(**{**LAYER, "router": "sigmoid_bias", "renormalize": False})
    rng = np.random.default_rng(1)
    p = {k: asarray(v) for k, v in moe.init_params(c, "m.", rng, 0.5, 0.5).items()}
    buf = {"m.router_bias": xp().zeros(8)}
    h = asarray(rng.standard_normal((1, 5, 6)))
    _, _, st1 = moe.moe_forward(c, h, p, buf, "m.", None, False)
    _, _, st2 = moe.moe_forward(c.replace(routed_scaling_factor=2.5), h, p, buf, "m.", None, False)
    assert array_equal(st1["expert_idx"], st2["expert_idx"])
    assert_allclose(st2["gates"], 2.5 * st1["gates"], rtol=1e-15)


def test_shared_gate_scales_the_shared_expert_per_token():
    c = Config(**{**LAYER, "n_shared_experts": 1, "shared_hidden": 4})
    rng = np.random.default_rng(2)
    p = {k: asarray(v) for k, v in moe.init_params(c.replace(shared_gate=True), "m.", rng, 0.5, 0.5).items()}
    h = asarray(rng.standard_normal((1, 4, 6)))
    ungated = {k: v for k, v in p.items() if "shared_gate" not in k}
    routed_only = {k: v for k, v in ungated.items() if ".shared." not in k}
    y_ungated = moe.moe_forward(c, h, ungated, {}, "m.", None, False)[0]
    y_routed = moe.moe_forward(c.replace(n_shared_experts=0), h, routed_only, {}, "m.", None, False)[0]
    y_gated = moe.moe_forward(c.replace(shared_gate=True), h, p, {}, "m.", None, False)[0]
    g = 1 / (1 + xp().exp(-(h @ p["m.shared_gate.w"])))  # (1, 4, 1): one scalar per token
    assert_allclose(y_gated, y_routed + g * (y_ungated - y_routed), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# whole models: every family's combination of features, gradient-checked end to end
# ------------------------------------------------------------------------------------------------

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=8, ffn_hidden=12, init_std=0.5,
            aux_loss_coef=0.1, z_loss_coef=0.1)  # fmt: skip
FAMILIES = {
    "olmoe": dict(flavour="llama", n_kv_head=2, qk_norm="full", n_experts=4, top_k=2, expert_hidden=6,
                  renormalize=False),
    "qwen3-moe": dict(flavour="llama", n_kv_head=2, head_dim=6, qk_norm="head", n_experts=4, top_k=2,
                      expert_hidden=6, first_dense=1),
    "qwen2-moe": dict(flavour="llama", qkv_bias=True, n_experts=4, top_k=2, expert_hidden=6, renormalize=False,
                      n_shared_experts=1, shared_hidden=5, shared_gate=True, moe_every=2),
    "granite-shared": dict(flavour="llama", n_kv_head=2, tie_embeddings=True, bias=True, n_experts=4, top_k=2,
                           expert_hidden=6, n_shared_experts=1, shared_hidden=4, embedding_multiplier=3.0,
                           attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.5),
    "deepseek-v3-router": dict(flavour="llama", n_experts=8, top_k=3, expert_hidden=4, router="sigmoid_bias",
                               renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                               n_shared_experts=1, first_dense=1, aux_loss_coef=0.0),
    "deepseek-v3-mla": dict(flavour="llama", attention="mla", q_lora_rank=4, kv_lora_rank=6, qk_nope_head_dim=2,
                            qk_rope_head_dim=4, v_head_dim=3, n_experts=8, top_k=3, expert_hidden=4,
                            router="sigmoid_bias", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                            n_shared_experts=1, first_dense=1, aux_loss_coef=0.0),
    "switch-relu": dict(flavour="gpt2", activation="relu", n_experts=4, top_k=1, expert_hidden=10,
                        renormalize=False, router_logit_bias=True, capacity_factor=1.0, moe_every=2),
}  # fmt: skip


def family_model(name, seed=3):
    model = GPT(Config(**{**TINY, **FAMILIES[name]}), seed=seed, dtype="float64")
    rng = np.random.default_rng(seed)
    for k, v in model.params.items():  # nonzero biases and gains that differ from 1
        if k.endswith(("bqkv", ".bo", "router.b", "norm.w", ".b1", ".b2")):
            v[...] = asarray(rng.standard_normal(v.shape) * 0.3 + (1.0 if k.endswith("norm.w") else 0.0))
    for b in model.buffers.values():  # a trained selection bias is not zero
        b[...] = asarray(rng.standard_normal(b.shape) * 0.05)
    return model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_whole_family_model_gradients(name, margins):
    model = family_model(name, seed=SEEDS.get(name, 3))
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    errors = check_model(model, idx, np.roll(idx, -1, axis=1), eps=EPS, max_entries=16)
    assert set(errors) == set(model.params)
    assert max(errors.values()) <= GRAD_TOL, {k: v for k, v in errors.items() if v > GRAD_TOL}
    assert min(margins) > MARGIN
    assert count_params(model.config)["total"] == model.num_params()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_generation_with_the_kv_cache_equals_recomputation(name):
    model = family_model(name, seed=5)
    model.config.capacity_factor = 0.0  # capacity drops depend on the batch: a cache decodes 1 token
    prompt = [1, 5, 2]
    kw = dict(max_new_tokens=10, temperature=0.0)
    assert generate(model, prompt, use_cache=True, **kw) == generate(model, prompt, use_cache=False, **kw)


def test_multipliers_scale_what_they_say():
    base = Config(**{**TINY, "flavour": "llama"})
    idx = np.random.default_rng(0).integers(0, 11, (1, 6))
    ref = GPT(base, seed=2, dtype="float64").forward(idx)[0]
    halved = GPT(base.replace(logits_scaling=2.0), seed=2, dtype="float64").forward(idx)[0]
    assert_allclose(halved, ref / 2, rtol=1e-14)
    # with RMSNorm everywhere, scaling the embedding and every branch by the same factor changes
    # the residual stream's scale only: the logits stay the same (up to the norms' eps)
    both = GPT(base.replace(embedding_multiplier=8.0, residual_multiplier=8.0, norm_eps=1e-12), seed=2,
               dtype="float64").forward(idx)[0]  # fmt: skip
    assert rel_error(both, GPT(base.replace(norm_eps=1e-12), seed=2, dtype="float64").forward(idx)[0]) < 1e-9
    one = GPT(base.replace(residual_multiplier=8.0), seed=2, dtype="float64").forward(idx)[0]
    assert rel_error(one, ref) > 1e-2


# ------------------------------------------------------------------------------------------------
# Config errors name the field
# ------------------------------------------------------------------------------------------------

MOE = dict(flavour="llama", n_experts=8, top_k=2)
BAD = [
    (dict(qk_norm="layer"), "qk_norm"),
    (dict(head_dim=0), "head_dim"),
    (dict(flavour="llama", head_dim=5), "head_dim"),  # RoPE needs an even head size
    (dict(n_embd=10, n_head=4), "n_embd"),  # without head_dim, C must split into heads
    (dict(embedding_multiplier=0.0), "embedding_multiplier"),
    (dict(residual_multiplier=-1.0), "residual_multiplier"),
    (dict(logits_scaling=0.0), "logits_scaling"),
    (dict(attention_multiplier=0.0), "attention_multiplier"),
    (dict(MOE, n_group=4, topk_group=2), "n_group"),  # groups need the sigmoid router
    (dict(MOE, router="sigmoid_bias", n_group=3), "n_group"),  # 3 does not divide 8
    (dict(MOE, router="sigmoid_bias", n_group=8), "n_group"),  # groups of one expert
    (dict(MOE, router="sigmoid_bias", n_group=4, topk_group=5), "topk_group"),
    (dict(MOE, router="sigmoid_bias", top_k=3, n_group=4, topk_group=1), "topk_group"),  # 1 group of 2 < 3
    (dict(MOE, shared_gate=True), "shared_gate"),  # no shared expert to gate
    (dict(MOE, routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(MOE, router_jitter=1.0), "router_jitter"),
    (dict(MOE, router_jitter=0.1, jitter_scope="experts"), "jitter_scope"),
]


@pytest.mark.parametrize("kw, field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_unsupported_combinations_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"Config\.{field}\b") as e:
        Config(**kw)
    assert "\n" not in str(e.value)


def test_head_dim_lifts_the_divisibility_of_n_embd():
    c = Config(flavour="llama", n_embd=10, n_head=4, head_dim=8)
    assert c.head_size == 8 and GPT(c).params["blocks.0.attn.wo"].shape == (32, 10)


def test_qkv_bias_defaults_to_bias():
    assert Config(flavour="gpt2").qkv_bias and not Config(flavour="llama").qkv_bias
    assert Config(flavour="llama", qkv_bias=True).qkv_bias


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, extra",
    [
        ("olmoe", 4 * (128 * 64 + 2 * 128)),  # router, QK-norm gains
        ("qwen-moe", 4 * (128 * 32 + 128 + 3 * 128)),  # router, shared gate, q/k/v biases
        ("deepseek-v3", 3 * 128 * 32 - 4 * (65536 - 63488 - 2 * 64)),  # 3 routers; MLA is 1,920 smaller
    ],
    ids=["olmoe", "qwen-moe", "deepseek-v3"],
)
def test_family_toy_presets_match_dense_in_active_parameters(name, extra):
    dense = count_params(get_preset("dense"))["active"]
    n = count_params(get_preset(name))
    assert n["active"] - dense == extra
    assert abs(n["active"] - dense) / dense < 0.035 and n["total"] > 2.5 * dense


@pytest.fixture
def fake_cupy_backend():
    """The fake CuPy of tests/fake_cupy.py installed (host/device mixing raises); restored afterwards."""
    import fake_cupy

    from minimoe import backend

    name, dtype = backend.get_backend(), backend.get_default_dtype()
    try:
        with fake_cupy.installed():
            yield backend
    finally:
        backend.set_backend(name)
        backend.set_default_dtype(dtype)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_step_and_generation_on_fake_cupy_match_numpy(fake_cupy_backend, name):
    """A training step (router jitter on) and cached generation run on the (fake) GPU without a
    hidden host/device copy, and give numpy's numbers."""
    backend = fake_cupy_backend
    cfg = Config(
        **{**TINY, **FAMILIES[name], "router_jitter": 0.05 if FAMILIES[name].get("n_experts") else 0.0}
    )
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    out = {}
    for on in ("numpy", "cupy"):
        backend.set_backend(on)
        model = GPT(cfg, seed=2)  # float32, training mode: the jitter is drawn on the device
        logits, loss = model.forward(idx, np.roll(idx, -1, axis=1))
        model.backward()
        tokens = generate(model, [1, 2, 3], 6, temperature=0.0)
        out[on] = {"logits": backend.to_numpy(logits), "loss": backend.to_numpy(loss), "tokens": tokens}
        out[on].update({k: backend.to_numpy(g) for k, g in model.grads.items()})
    for k, want in out["numpy"].items():
        assert_allclose(out["cupy"][k], want, rtol=1e-4, atol=1e-6, err_msg=k)
