"""The Mixture-of-Experts layer: dispatch/combine and experts (ops/experts.py), the layer (layers/moe.py)
and whole MoE GPTs: float64 gradient checks, routing semantics, and balancing during training.

Top-k selection and capacity dropping are piecewise constant in the router logits. A
finite-difference check is valid only if no score that decides the selection (or the order of
the chosen K) lies within the step of another; `router_margin` records the smallest such gap
seen during a check and every check asserts it is far larger than the step. Capacity drops
depend on the chosen experts alone, so the same margin also keeps every capacity edge fixed.
Legend: B batch, T time, C channels, N tokens, E experts, K experts per token, F expert hidden.
"""

import math

import numpy as np
import pytest
from conftest import asarray, assert_allclose, assert_array_equal, to_numpy, xp

from minimoe import GPT, AdamW, backend, data, get_preset
from minimoe.config import Config
from minimoe.gradcheck import check_gradients, check_model, check_op
from minimoe.layers import moe
from minimoe.ops import experts, router
from minimoe.ops.activation import sigmoid
from minimoe.tokenizer import CharTokenizer

EPS = 1e-5  # finite-difference step
TOL = 1e-6  # max relative error accepted
MARGIN = 1e-3  # smallest allowed gap between deciding router scores (>> EPS * typical input)


@pytest.fixture
def router_margin(monkeypatch):
    """Wrap the top-k routers so every call records the smallest gap among each token's K+1
    best selection scores (logits, or sigmoid scores + bias); yields a list of those gaps."""
    gaps = []

    def record(scores, k):
        top = -np.sort(-to_numpy(scores), axis=-1)[:, : k + 1]
        if top.shape[1] > 1:
            gaps.append(float(-np.diff(top, axis=-1).min()))

    softmax_topk, sigmoid_bias_topk = router.softmax_topk_forward, router.sigmoid_bias_topk_forward

    def softmax_topk_recorded(logits, k, renormalize=True):
        record(logits, k)
        return softmax_topk(logits, k, renormalize)

    def sigmoid_bias_topk_recorded(logits, bias, k, *variant):  # variant: renormalize, n_group, topk_group
        record(sigmoid(logits) + bias, k)
        return sigmoid_bias_topk(logits, bias, k, *variant)

    monkeypatch.setattr(router, "softmax_topk_forward", softmax_topk_recorded)
    monkeypatch.setattr(router, "sigmoid_bias_topk_forward", sigmoid_bias_topk_recorded)
    return gaps


# ------------------------------------------------------------------------------------------------
# dispatch, combine, experts
# ------------------------------------------------------------------------------------------------

N, C, E, K = 10, 5, 4, 2


def _routing(seed, n=N, e=E, k=K):
    """Random distinct experts per token (n, k) and positive gates (n, k)."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(n)])
    return asarray(idx), asarray(rng.uniform(0.2, 1.0, (n, k))), asarray(rng.standard_normal((n, C)))


@pytest.mark.parametrize("capacity", [None, 3])
def test_combine_gradients_wrt_y_sorted_and_gates(capacity):
    idx, gates, x = _routing(0)
    x_sorted, offsets, counts, c_disp = experts.dispatch_forward(x, idx, E, capacity)
    assert (offsets[-1] < N * K) == (capacity is not None)  # capacity mode really drops here
    y_sorted = asarray(np.random.default_rng(1).standard_normal(x_sorted.shape))
    err = check_op(
        lambda ys, g: experts.combine_forward(ys, g, c_disp),
        experts.combine_backward,
        [y_sorted, gates],
        eps=EPS,
    )
    assert err[0] <= TOL and err[1] <= TOL


@pytest.mark.parametrize("capacity", [None, 3])
def test_dispatch_backward_through_dispatch_then_combine(capacity):
    idx, gates, x = _routing(2)

    def forward(x):  # x (N, C) -> x_sorted -> y (N, C), gates fixed
        x_sorted, _, _, c_disp = experts.dispatch_forward(x, idx, E, capacity)
        return experts.combine_forward(x_sorted, gates, c_disp)

    def backward(dy, cache):
        dx_sorted, _ = experts.combine_backward(dy, cache)
        return experts.dispatch_backward(dx_sorted, cache[2])

    assert check_op(forward, backward, [x], eps=EPS)[0] <= TOL


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "gelu_exact"])
def test_experts_gradients_with_an_empty_expert(activation):
    rng = np.random.default_rng(3)
    F, M = 3, 9
    offsets = [0, 4, 4, 7, 9]  # expert 1 receives no tokens
    names = ["w1", "w3", "w2"] if activation == "swiglu" else ["w1", "w2"]
    shapes = {"w1": (E, C, F), "w3": (E, C, F), "w2": (E, F, C)}
    ws = [asarray(rng.standard_normal(shapes[n]) * 0.7) for n in names]
    x_sorted = asarray(rng.standard_normal((M, C)))

    def forward(xs, *w):
        return experts.experts_forward(xs, offsets, dict(zip(names, w)), activation)

    def backward(dy, cache):
        dx, dw = experts.experts_backward(dy, cache)
        return (dx, *[dw[n] for n in names])

    err = check_op(forward, backward, [x_sorted, *ws], eps=EPS)
    assert max(err.values()) <= TOL, err
    _, dw = experts.experts_backward(xp().ones((M, C)), forward(x_sorted, *ws)[1])
    for n in names:
        assert_array_equal(dw[n][1], 0.0)  # the idle expert learns nothing
        assert float(abs(dw[n][0]).max()) > 0


def test_identity_experts_reproduce_gated_sum():
    idx, gates, x = _routing(4)
    x_sorted, offsets, counts, c_disp = experts.dispatch_forward(x, idx, E)
    y, _ = experts.combine_forward(x_sorted, gates, c_disp)  # identity experts: y_sorted = x_sorted
    idx, counts, x_sorted = to_numpy(idx), to_numpy(counts), to_numpy(x_sorted)
    assert_array_equal(counts, np.bincount(idx.ravel(), minlength=E))
    assert offsets == [0, *np.cumsum(counts).tolist()]
    # slices are grouped by expert: every row of expert e's slice is a token that chose e
    for e in range(E):
        for row in x_sorted[offsets[e] : offsets[e + 1]]:
            n = int(np.flatnonzero((to_numpy(x) == row).all(axis=1))[0])
            assert e in idx[n]
    assert_allclose(y, gates.sum(axis=1, keepdims=True) * x, rtol=1e-13)


def test_capacity_keeps_exactly_the_documented_slots():
    # 6 tokens, top-2 of 3 experts, capacity_for(6, 2, 3, 0.5) = ceil(0.5 * 12 / 3) = 2 slots each.
    idx = np.array([[2, 1], [0, 2], [0, 1], [1, 0], [1, 0], [0, 1]])
    capacity = experts.capacity_for(6, 2, 3, 0.5)
    assert capacity == 2
    # Slots in dispatch order (choice rank major, earlier tokens first), by expert:
    #   expert 0: (1,0) (2,0) (5,0) (3,1) (4,1)  -> keeps (1,0) (2,0): token 5's FIRST choice loses
    #             to earlier tokens' first choices
    #   expert 1: (3,0) (4,0) (0,1) (2,1) (5,1)  -> keeps (3,0) (4,0): later tokens' first choices
    #             beat token 0's second choice
    #   expert 2: (0,0) (1,1)                    -> keeps both
    kept = np.array([[1, 0], [1, 1], [1, 0], [1, 0], [1, 0], [0, 0]], dtype=bool)
    x = np.arange(6.0)[:, None] * np.ones((1, 2)) + 1.0  # token n's row is all n + 1
    x_sorted, offsets, counts, c_disp = experts.dispatch_forward(asarray(x), asarray(idx), 3, capacity)
    assert_array_equal(counts, [5, 5, 2])  # before drops
    assert offsets == [0, 2, 4, 6]
    assert_array_equal(x_sorted[:, 0], np.array([1, 2, 3, 4, 0, 1]) + 1.0)
    gates = np.random.default_rng(5).uniform(0.2, 1.0, idx.shape)
    y, c_comb = experts.combine_forward(x_sorted, asarray(gates), c_disp)  # identity experts
    assert_allclose(y, (gates * kept).sum(axis=1, keepdims=True) * x, rtol=1e-13)
    assert_array_equal(y[5], 0.0)  # token 5 lost both slots: no expert output at all
    # dropped slots get no gate gradient, and token 5 no gradient through the experts
    _, dgates = experts.combine_backward(xp().ones_like(y), c_comb)
    assert ((to_numpy(dgates) != 0) == kept).all()
    assert_array_equal(experts.dispatch_backward(xp().ones_like(x_sorted), c_disp)[5], 0.0)


def test_capacity_for():
    assert experts.capacity_for(12, 1, 8, 0.0) is None  # dropless
    assert experts.capacity_for(12, 1, 8, 1.25) == 2  # ceil(1.875)
    assert experts.capacity_for(4096, 2, 8, 1.0) == 1024
    assert experts.capacity_for(1, 1, 64, 0.1) == 1  # never below one slot


def test_capacity_for_is_the_exact_ceiling():
    # ceil(1.1 * 100 * 1 / 10) = 11, but 1.1 * 100 = 110.00000000000001 in floating point
    assert experts.capacity_for(100, 1, 10, 1.1) == 11


# ------------------------------------------------------------------------------------------------
# the MoE layer
# ------------------------------------------------------------------------------------------------


def _layer_config(**kw):
    base = dict(
        flavour="llama",
        n_layer=1,
        n_embd=6,
        n_head=1,
        vocab_size=5,
        block_size=8,
        n_experts=5,
        top_k=2,
        expert_hidden=3,
        init_std=0.5,
        aux_loss_coef=0.3,
        z_loss_coef=0.2,
    )
    return Config(**{**base, **kw})


def moe_layer_gradcheck(c, seed, training=False, bias=None, perturb=("router.w_noise",)):
    """Check d/d(h and every parameter) of L = sum(y * dy) + aux_coef * aux + z_coef * z for one
    MoE layer built from Config c; returns (errors, grads, cache, stats). Also used by
    test_families.py.

    perturb: parameters (by name ending) drawn at random instead of their initial value, so that
    a parameter initialised to zero still has its gradient tested; bias: the sigmoid router's
    selection bias (E,), or "random" to draw one."""
    rng = np.random.default_rng(seed)
    pre = "moe."
    p = moe.init_params(c, pre, rng, c.init_std, c.init_std / math.sqrt(2))
    for name in p:
        if name.endswith(perturb):
            p[name] = rng.standard_normal(p[name].shape) * 0.5
    p = {k: asarray(v) for k, v in p.items()}
    if isinstance(bias, str) and bias == "random":
        bias = rng.standard_normal(c.n_experts) * 0.05 if c.router == "sigmoid_bias" else None
    buffers = {pre + "router_bias": asarray(bias)} if bias is not None else {}
    h, dy = asarray(rng.standard_normal((2, 4, c.n_embd))), asarray(rng.standard_normal((2, 4, c.n_embd)))

    def run():  # a fresh, identically seeded rng each call: the same router noise every time
        return moe.moe_forward(c, h, p, buffers, pre, backend.make_rng(7), training)

    def loss():
        y, _, st = run()
        return float((y * dy).sum() + c.aux_loss_coef * st["aux_loss"] + c.z_loss_coef * st["z_loss"])

    y, cache, stats = run()
    grads = {}
    grads["h"] = moe.moe_backward(c, dy, cache, pre, grads)
    assert set(grads) == set(p) | {"h"}
    return check_gradients(loss, {"h": h, **p}, grads, eps=EPS), grads, cache, stats


@pytest.mark.parametrize(
    "kw",
    [
        dict(router="softmax", renormalize=True, n_shared_experts=2, shared_hidden=2),
        dict(router="softmax", renormalize=False, top_k=3, n_shared_experts=1),
        dict(router="softmax", renormalize=False, top_k=1, capacity_factor=1.0),
        dict(router="sigmoid_bias", top_k=2, n_shared_experts=1, capacity_factor=1.0),
        dict(router="softmax", activation="gelu", n_shared_experts=1),
    ],
    ids=["shared-renorm", "shared-k3-plain", "switch-capacity", "sigmoid-bias-capacity", "gelu"],
)
def test_moe_layer_gradients(kw, router_margin):
    c = _layer_config(**kw)
    bias = np.array([0.1, -0.2, 0.05, 0.3, -0.1]) if c.router == "sigmoid_bias" else None
    errors, _, _, stats = moe_layer_gradcheck(c, seed=11, bias=bias)
    assert max(errors.values()) <= TOL, errors
    assert min(router_margin) > MARGIN
    if c.capacity_factor:
        assert stats["dropped_fraction"] > 0


def test_moe_layer_gradients_noisy_router_in_training(router_margin):
    c = _layer_config(router="noisy", n_shared_experts=1)
    errors, grads, _, _ = moe_layer_gradcheck(c, seed=12, training=True)
    assert max(errors.values()) <= TOL, errors
    assert min(router_margin) > MARGIN
    assert float(abs(grads["moe.router.w_noise"]).max()) > 1e-3  # the noise scale is being learned


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_noisy_router_honours_renormalize_false(training, router_margin):
    # renormalize=False: the gates are the chosen experts' probabilities under the full softmax of
    # the (noisy) logits, so with K < E they sum to less than 1; their gradient is a different
    # function from the renormalised one, and must pass the check too
    c = _layer_config(router="noisy", renormalize=False, n_shared_experts=1)
    errors, grads, _, stats = moe_layer_gradcheck(c, seed=13, training=training)
    assert max(errors.values()) <= TOL, errors
    assert min(router_margin) > MARGIN
    assert float(stats["gates"].sum(axis=-1).max()) < 1.0 - 1e-3


def test_noisy_router_gates_without_renormalisation_are_the_softmax_probabilities():
    h = np.random.default_rng(0).standard_normal((2, 4, 6))
    gates = {}
    for renorm in (True, False):
        c = _layer_config(router="noisy", renormalize=renorm)  # n_embd = 6
        p = moe.init_params(c, "moe.", np.random.default_rng(1), 0.5, 0.5)
        dev = {k: asarray(v) for k, v in p.items()}
        _, _, st = moe.moe_forward(c, asarray(h), dev, {}, "moe.", None, False)  # evaluation: no noise
        logits = h.reshape(-1, c.n_embd) @ p["moe.router.w"]
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        chosen = np.take_along_axis(probs, to_numpy(st["expert_idx"]), axis=-1)
        gates[renorm] = to_numpy(st["gates"])
        expected = chosen / chosen.sum(axis=-1, keepdims=True) if renorm else chosen
        assert_allclose(st["gates"], expected, rtol=1e-12)
    assert_allclose(gates[True].sum(axis=-1), 1.0, rtol=1e-12)
    assert gates[False].sum(axis=-1).max() < 1.0 - 1e-3


def test_token_with_every_slot_dropped_gets_zero_from_the_layer():
    # 4 tokens that all prefer expert 0; capacity_for(4, 1, 2, 0.5) = 1 slot per expert
    c = _layer_config(n_embd=4, n_experts=2, top_k=1, renormalize=False, capacity_factor=0.5)
    rng = np.random.default_rng(0)
    p = moe.init_params(c, "moe.", rng, 0.5, 0.5)
    p["moe.router.w"] = np.zeros((4, 2))
    p["moe.router.w"][0, 0] = 5.0
    h = rng.standard_normal((1, 4, 4))
    h[..., 0] = 1.0  # logits [5, 0] for every token
    p = {k: asarray(v) for k, v in p.items()}
    y, _, stats = moe.moe_forward(c, asarray(h), p, {}, "moe.", None, False)
    assert_array_equal(stats["expert_idx"][:, 0], 0)
    assert_array_equal(stats["tokens_per_expert"], [4, 0])
    assert stats["dropped_fraction"] == 0.75
    assert float(abs(y[0, 0]).max()) > 0  # the first token keeps its slot ...
    assert_array_equal(y[0, 1:], 0.0)  # ... the other three pass on the residual alone


# ------------------------------------------------------------------------------------------------
# whole MoE GPTs
# ------------------------------------------------------------------------------------------------

TINY = dict(n_layer=2, n_embd=8, n_head=2, block_size=6, vocab_size=11, init_std=0.5)
TINY_MOE = dict(expert_hidden=4, shared_hidden=4, aux_loss_coef=0.1, z_loss_coef=0.05)


def tiny(name, **kw):
    """A preset's structure at gradient-check size (both auxiliary losses switched on)."""
    extra = dict(ffn_hidden=12) if name == "dense" else TINY_MOE
    return get_preset(name, **{**TINY, **extra, **kw})


def _batch(c, seed=0, B=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, c.vocab_size, (B, c.block_size)), rng.integers(0, c.vocab_size, (B, c.block_size))


@pytest.mark.parametrize(
    "name, kw",
    [
        ("dense", {}),
        ("mixtral", {}),
        ("switch", {}),
        ("deepseek", {}),
        ("gpt4-rumoured", {}),
        ("mixtral", dict(router="noisy")),
        ("mixtral", dict(n_layer=4, moe_every=2)),
        ("mixtral", dict(n_layer=3, first_dense=1, n_shared_experts=1)),
        ("mixtral", dict(flavour="gpt2")),
    ],
    ids=[
        "dense",
        "mixtral",
        "switch",
        "deepseek",
        "gpt4-rumoured",
        "noisy-eval",
        "moe_every2",
        "first_dense1",
        "gpt2-flavour-gelu-experts",
    ],
)
def test_whole_model_gradients(name, kw, router_margin):
    c = tiny(name, **kw)
    model = GPT(c, seed=3, dtype="float64")
    if c.router == "sigmoid_bias":
        for b in model.buffers.values():  # a nonzero selection bias, as after some training
            b[...] = asarray(np.random.default_rng(5).standard_normal(b.shape) * 0.1)
    idx, targets = _batch(c)
    errors = check_model(model, idx, targets, eps=EPS, max_entries=24)
    assert set(errors) == set(model.params)
    assert max(errors.values()) <= TOL, {k: v for k, v in errors.items() if v > TOL}
    layers = model.stats["layers"]
    assert [st["layer"] for st in layers] == [i for i in range(c.n_layer) if c.is_moe_block(i)]
    if c.n_experts:
        assert min(router_margin) > MARGIN
        assert float(model.stats["aux_loss"]) > 0 and float(model.stats["z_loss"]) > 0
    if name == "switch":
        assert all(st["dropped_fraction"] > 0 for st in layers)  # capacity drops are exercised
    if c.router == "noisy":  # eval mode: no noise, so the noise projection gets exactly no gradient
        for st in layers:
            assert_array_equal(model.grads[f"blocks.{st['layer']}.moe.router.w_noise"], 0.0)


def test_layouts_place_moe_blocks_as_documented():
    every2 = GPT(tiny("mixtral", n_layer=4, moe_every=2))
    assert [i for i in range(4) if f"blocks.{i}.moe.router.w" in every2.params] == [1, 3]
    assert [i for i in range(4) if f"blocks.{i}.mlp.w1" in every2.params] == [0, 2]
    first = GPT(tiny("mixtral", n_layer=3, first_dense=1))
    assert [i for i in range(3) if f"blocks.{i}.moe.router.w" in first.params] == [1, 2]


def test_k1_renormalised_router_gets_no_gradient_from_the_lm_loss():
    grads = {}
    for renorm in (True, False):
        c = tiny("mixtral", top_k=1, renormalize=renorm, aux_loss_coef=0.0, z_loss_coef=0.0)
        model = GPT(c, seed=1, dtype="float64")
        model.forward(*_batch(c))
        grads[renorm] = model.backward()
    for i in range(2):
        assert_array_equal(grads[True][f"blocks.{i}.moe.router.w"], 0.0)  # gate == 1
        assert float(abs(grads[False][f"blocks.{i}.moe.router.w"]).max()) > 1e-4  # gate == p


def test_dropped_tokens_pass_through_on_the_residual(monkeypatch):
    # Switch (top-1) with a tight capacity: a dropped slot is a dropped token, and the MoE
    # layer's output for it is exactly zero, so the block adds nothing to its residual stream.
    c = tiny("switch", capacity_factor=0.5, aux_loss_coef=0.0, z_loss_coef=0.0)
    outputs = []
    forward = moe.moe_forward

    def recorded(*args):
        y, cache, st = forward(*args)
        outputs.append((y, st))
        return y, cache, st

    monkeypatch.setattr(moe, "moe_forward", recorded)
    model = GPT(c, seed=0, dtype="float64")
    model.forward(*_batch(c, B=3))
    assert len(outputs) == 2
    for y, st in outputs:
        N = y.shape[0] * y.shape[1]
        zero_rows = int((np.abs(to_numpy(y).reshape(N, -1)).max(axis=1) == 0).sum())
        assert st["dropped_fraction"] > 0
        assert zero_rows == round(st["dropped_fraction"] * N)


def test_deepseek_bias_is_a_buffer_not_a_parameter():
    c = tiny("deepseek", aux_loss_coef=0.0)
    model = GPT(c, seed=0, dtype="float64")
    bias_names = [f"blocks.{i}.moe.router_bias" for i in range(c.n_layer)]
    assert sorted(model.buffers) == bias_names
    assert not any("bias" in k for k in model.params)
    idx, targets = _batch(c)
    model.forward(idx, targets)
    grads = model.backward()
    assert list(grads) == list(model.params)  # no gradient for the bias
    opt = AdamW(model.params, lr=0.1)
    assert not set(opt.m) & set(model.buffers)  # AdamW never sees it
    before = {k: v.copy() for k, v in model.buffers.items()}
    opt.step(grads)
    for k in bias_names:
        assert_array_equal(model.buffers[k], before[k])


def test_deepseek_bias_selects_experts_but_does_not_change_the_output_of_a_selection():
    c = tiny("deepseek", aux_loss_coef=0.0)
    model = GPT(c, seed=0, dtype="float64")
    idx, targets = _batch(c)
    _, loss0 = model.forward(idx, targets)
    sel0 = [st["expert_idx"].copy() for st in model.stats["layers"]]
    for b in model.buffers.values():  # the same shift for every expert: same choice, same gates
        b += 0.25
    _, loss1 = model.forward(idx, targets)
    for st, s0 in zip(model.stats["layers"], sel0):
        assert_array_equal(st["expert_idx"], s0)
    assert float(loss1) == float(loss0)
    for b in model.buffers.values():  # a large bias on expert 5 puts it first for every token
        b[5] += 10.0
    model.forward(idx, targets)
    for st in model.stats["layers"]:
        assert_array_equal(st["expert_idx"][:, 0], 5)


def test_update_router_biases_moves_towards_balance():
    c = tiny("deepseek", aux_loss_coef=0.0, bias_update_rate=0.02)
    model = GPT(c, seed=0, dtype="float64")
    idx, targets = _batch(c, B=4)
    name = "blocks.0.moe.router_bias"
    model.buffers[name][3] = 0.5  # expert 3 overloaded: every token picks it
    model.forward(idx, targets)
    load = to_numpy(model.stats["layers"][0]["tokens_per_expert"]).astype(float)
    assert load[3] == load.max() > load.mean()
    before = model.buffers[name].copy()
    model.update_router_biases()
    step = to_numpy(model.buffers[name] - before)
    assert_allclose(step, 0.02 * np.sign(load.mean() - load), atol=1e-15)
    assert step[3] < 0 and (step[load < load.mean()] > 0).all()
    # repeated, the nudges spread the load: expert 3's share falls and the spread narrows
    for _ in range(40):
        model.forward(idx, targets)
        model.update_router_biases()
    model.forward(idx, targets)
    new_load = to_numpy(model.stats["layers"][0]["tokens_per_expert"]).astype(float)
    assert new_load[3] < load[3] and new_load.max() - new_load.min() < load.max() - load.min()


# ------------------------------------------------------------------------------------------------
# balancing during training (see docs/moe.md for the setup and the band)
# ------------------------------------------------------------------------------------------------


def _train_shares(aux_loss_coef, seed=0, steps=150):
    """Train a shrunk `mixtral` preset on characters of the builtin corpus; return each MoE
    layer's mean share of the N*K assignments per expert over the last 20 steps, (layers, E)."""
    text = data.builtin_corpus()[:60_000]
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text))
    c = get_preset(
        "mixtral",
        n_layer=2,
        n_embd=64,
        n_head=4,
        block_size=32,
        vocab_size=tok.vocab_size,
        expert_hidden=128,
        aux_loss_coef=aux_loss_coef,
        z_loss_coef=0.0,
    )
    model = GPT(c, seed=seed)
    opt = AdamW(model.params, lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(steps):
        x, y = data.get_batch(ids, 8, 32, rng)
        model.forward(x, y)
        opt.step(model.backward())
        shares.append(
            [
                to_numpy(st["tokens_per_expert"] / st["tokens_per_expert"].sum())
                for st in model.stats["layers"]
            ]
        )
    return np.mean(shares[-20:], axis=0)


def test_balancing_loss_keeps_experts_loaded_and_its_absence_collapses():
    E = 8
    balanced = _train_shares(aux_loss_coef=0.1)
    assert balanced.shape == (2, E)
    assert balanced.min() > 0.5 / E and balanced.max() < 2.0 / E, balanced * E
    collapsed = _train_shares(aux_loss_coef=0.0)
    assert collapsed.max() > 2.0 / E and collapsed.min() < 0.25 / E, collapsed * E
