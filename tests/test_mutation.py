"""The gradient checks can fail: a deliberately wrong backward is caught.

For every op case of test_ops.py and layer case of test_layers.py we break one returned gradient at a time (scale it by 1.01, or
flip the sign of one element) and for many ops we also drop or change one term of the
derivation (the mistakes people make). The same `check_op` must then report a max rel error
above BROKEN_TOL (1e-3), three orders of magnitude above what a correct backward gets.
Finally, one op's backward inside the model is monkeypatched and `check_model` must fail.
"""

import math

import numpy as np
import pytest
from conftest import BROKEN_TOL, EPS, GRAD_TOL, asarray, tiny_model, xp
from test_layers import LAYER_CASES
from test_ops import OP_CASES

from minimoe import gradcheck
from minimoe.layers import attention as attention_layer
from minimoe.ops import activation, attention, dropout, embedding, ffn, linear, loss, norm

CASES = {**OP_CASES, **LAYER_CASES}


def build_case(name, seed=0):
    fwd, bwd, inputs, wrt = CASES[name](np.random.default_rng(seed))
    return fwd, bwd, inputs, list(range(len(inputs))) if wrt is None else wrt


def _break(bwd, position, how):
    """bwd with its `position`-th gradient scaled by 1.01 or with one element's sign flipped."""

    def wrong(dy, cache):
        grads = bwd(dy, cache)
        single = not isinstance(grads, tuple)
        grads = list((grads,) if single else grads)
        g = grads[position].copy()
        if how == "scale":
            g *= 1.01
        else:  # flip the largest entry, so the change cannot hide in a near-zero element
            i = int(abs(g).argmax())
            g.reshape(-1)[i] *= -1.0
        grads[position] = g
        return g if single else tuple(grads)

    return wrong


def _all_breaks():
    for name in CASES:
        _, _, _, wrt = build_case(name)
        for position in range(len(wrt)):
            for how in ("scale", "flip"):
                yield name, position, how


@pytest.mark.parametrize("name,position,how", list(_all_breaks()))
def test_broken_gradient_is_caught(name, position, how):
    fwd, bwd, inputs, wrt = build_case(name)
    errors = gradcheck.check_op(fwd, _break(bwd, position, how), inputs, wrt=wrt, eps=EPS)
    assert errors[wrt[position]] > BROKEN_TOL, f"{name}: {how} of gradient {position} not caught: {errors}"
    # the gradients we did not touch still pass: the failure points at the broken one
    others = [e for i, e in errors.items() if i != wrt[position]]
    assert all(e <= GRAD_TOL for e in others)


# ---------------------------------------------------------------------------------------------
# Wrong derivations: one term dropped or changed (each wrong backward takes the real cache)
# ---------------------------------------------------------------------------------------------


def _mean(a):
    return a.mean(axis=-1, keepdims=True)


def layernorm_without_mean_term(dy, cache):
    xhat, rstd, w = cache
    dx, dw, db = norm.layernorm_backward(dy, cache)
    g = dy * w
    return rstd * (g - xhat * _mean(g * xhat)), dw, db


def layernorm_without_variance_term(dy, cache):
    xhat, rstd, w = cache
    dx, dw, db = norm.layernorm_backward(dy, cache)
    g = dy * w
    return rstd * (g - _mean(g)), dw, db


def rmsnorm_without_xhat_term(dy, cache):
    xhat, rstd, w = cache
    _, dw = norm.rmsnorm_backward(dy, cache)
    return rstd * dy * w, dw


def gelu_tanh_without_tanh_derivative(dy, cache):
    x, t, _ = cache
    return dy * 0.5 * (1.0 + t)


def gelu_exact_cdf_only(dy, cache):
    x, phi_cdf, _ = cache
    return dy * phi_cdf


def silu_sigmoid_only(dy, cache):
    x, s = cache
    return dy * s


def swiglu_without_silu_derivative(dy, cache):
    sa, b, (x, s) = cache
    return dy * b * s, dy * sa


def softmax_without_jacobian_correction(dy, cache):
    y, axis = cache
    return y * dy


def cross_entropy_without_onehot(dloss, cache):
    probs, safe_t, valid, denom, shape = cache
    return (probs * (valid * (dloss / denom))[:, None]).reshape(shape)


def cross_entropy_counts_ignored(dloss, cache):
    probs, safe_t, valid, denom, shape = cache
    d = probs.copy()
    d[xp().arange(d.shape[0]), safe_t] -= 1.0
    return (d * (dloss / denom)).reshape(shape)


def cross_entropy_mean_over_all(dloss, cache):
    probs, safe_t, valid, denom, shape = cache
    return loss.cross_entropy_backward(dloss, cache) * (float(denom) / len(valid))


def embedding_fancy_index_assign(dy, cache):
    ids, (V, C) = cache
    dw = xp().zeros((V, C))
    dw[ids.reshape(-1)] += dy.reshape(-1, C)  # buffered: repeated ids keep only one update
    return dw


def dropout_ignoring_mask(dy, cache):
    return dy


def dropout_unscaled_mask(dy, cache):
    return dy * (cache != 0)


def rope_rotating_forward(dy, cache):
    cos, sin = cache
    return attention.rope_forward(dy, cos, sin)[0]  # rotates by +angle instead of -angle


def attention_without_scale_on_dq(dy, cache):
    dq, dk, dv = attention.causal_attention_backward(dy, cache)
    qg, k, v, p, scale = cache
    return dq / scale, dk, dv


def attention_without_softmax_correction(dy, cache):
    qg, k, v, p, scale = cache
    B, H, Tq, D = dy.shape
    dyg = dy.reshape(B, k.shape[1], -1, D)
    dv = p.swapaxes(-1, -2) @ dyg
    ds = p * (dyg @ v.swapaxes(-1, -2)) * scale  # missing: - sum_keys(dp * p)
    return (ds @ k).reshape(B, H, Tq, D), ds.swapaxes(-1, -2) @ qg, dv


def attention_kv_grad_from_first_group_head(dy, cache):
    # GQA: a key/value head's gradient must sum over the g query heads that read it
    dq, dk, dv = attention.causal_attention_backward(dy, cache)
    qg, k, v, p, scale = cache
    B, H, Tq, D = dy.shape
    Hkv = k.shape[1]
    g = H // Hkv
    dy_first = dy.reshape(B, Hkv, g, Tq, D).copy()
    dy_first[:, :, 1:] = 0.0
    _, dk1, dv1 = attention.causal_attention_backward(dy_first.reshape(B, H, Tq, D), cache)
    return dq, dk1, dv1


def linear_bias_from_first_row(dy, cache):
    dx, dw, db = linear.linear_backward(dy, cache)
    return dx, dw, dy.reshape(-1, dy.shape[-1])[0]


WRONG_DERIVATIONS = {
    "layernorm_without_mean_term": ("layernorm", layernorm_without_mean_term),
    "layernorm_without_variance_term": ("layernorm", layernorm_without_variance_term),
    "rmsnorm_without_xhat_term": ("rmsnorm", rmsnorm_without_xhat_term),
    "gelu_tanh_without_tanh_derivative": ("gelu_tanh", gelu_tanh_without_tanh_derivative),
    "gelu_exact_cdf_only": ("gelu_exact", gelu_exact_cdf_only),
    "silu_sigmoid_only": ("silu", silu_sigmoid_only),
    "swiglu_without_silu_derivative": ("swiglu", swiglu_without_silu_derivative),
    "softmax_without_jacobian_correction": ("softmax_last", softmax_without_jacobian_correction),
    "cross_entropy_without_onehot": ("cross_entropy_ignore", cross_entropy_without_onehot),
    "cross_entropy_counts_ignored": ("cross_entropy_ignore", cross_entropy_counts_ignored),
    "cross_entropy_mean_over_all": ("cross_entropy_ignore", cross_entropy_mean_over_all),
    "embedding_fancy_index_assign": ("embedding_repeats", embedding_fancy_index_assign),
    "dropout_ignoring_mask": ("dropout", dropout_ignoring_mask),
    "dropout_unscaled_mask": ("dropout", dropout_unscaled_mask),
    "rope_rotating_forward": ("rope_offset", rope_rotating_forward),
    "attention_without_scale_on_dq": ("attention_gqa_kvcache", attention_without_scale_on_dq),
    "attention_without_softmax_correction": ("attention_mha", attention_without_softmax_correction),
    "attention_kv_grad_from_first_group_head": ("attention_gqa", attention_kv_grad_from_first_group_head),
    "attention_mqa_kv_grad_from_first_head": (
        "attention_mqa_kvcache",
        attention_kv_grad_from_first_group_head,
    ),
    "linear_bias_from_first_row": ("linear_bias_3d", linear_bias_from_first_row),
}


@pytest.mark.parametrize("mutation", list(WRONG_DERIVATIONS))
def test_wrong_derivation_is_caught(mutation):
    case, wrong = WRONG_DERIVATIONS[mutation]
    fwd, _, inputs, wrt = build_case(case)
    errors = gradcheck.check_op(fwd, wrong, inputs, wrt=wrt, eps=EPS)
    assert max(errors.values()) > BROKEN_TOL, f"{mutation} not caught: {errors}"


def test_gelu_formulas_are_distinguishable():
    # using the tanh backward for the exact GELU is a plausible mix-up; the two derivatives
    # differ by only ~1e-3 relative, still far above what a correct backward gets (~1e-10)
    x = asarray(np.linspace(-3.0, 3.0, 25))
    tanh_bwd = lambda dy, cache: activation.gelu_backward(dy, activation.gelu_forward(cache[0], "tanh")[1])
    errors = gradcheck.check_op(lambda x: activation.gelu_forward(x, "none"), tanh_bwd, [x], eps=EPS)
    assert errors[0] > 100 * GRAD_TOL


# ---------------------------------------------------------------------------------------------
# The whole model: monkeypatch one op's backward as the model sees it, check_model must fail
# ---------------------------------------------------------------------------------------------


def _scaled_first(fn):
    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] * 1.01, *out[1:])
        return out * 1.01

    return wrong


MODEL_MUTATIONS = [
    ("gpt2", norm, "layernorm_backward"),
    ("llama", norm, "rmsnorm_backward"),
    ("gpt2", embedding, "embedding_backward"),
    ("gpt2", loss, "cross_entropy_backward"),
    ("gpt2", linear, "linear_backward"),  # the model's output head
    ("gpt2", ffn, "gelu_mlp_backward"),
    ("llama", ffn, "swiglu_mlp_backward"),
    ("gpt2", attention_layer, "self_attention_backward"),
    ("llama", attention, "causal_attention_backward"),
    ("llama", attention, "rope_backward"),
    ("gpt2", dropout, "dropout_backward"),  # identity in eval mode: scaling dy must still show
]


@pytest.mark.parametrize(
    "flavour,module,fn", MODEL_MUTATIONS, ids=[f"{f}-{n}" for f, _, n in MODEL_MUTATIONS]
)
def test_check_model_catches_a_broken_op(monkeypatch, flavour, module, fn):
    model = tiny_model(flavour)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))
    assert max(gradcheck.check_model(model, idx, targets, eps=EPS, max_entries=6).values()) <= GRAD_TOL
    monkeypatch.setattr(module, fn, _scaled_first(getattr(module, fn)))
    errors = gradcheck.check_model(model, idx, targets, eps=EPS, max_entries=6)
    assert max(errors.values()) > BROKEN_TOL, f"broken {module.__name__}.{fn} not caught: {errors}"


def test_check_model_catches_a_missing_tied_head_gradient(monkeypatch):
    # dropping the head's share of the tied wte gradient must show on wte only
    model = tiny_model("gpt2")
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))
    real = linear.linear_backward

    def head_without_weight_grad(dy, cache):
        dx, dw, db = real(dy, cache)
        return (dx, dw * 0.0, db) if dw.shape == model.params["wte"].T.shape else (dx, dw, db)

    monkeypatch.setattr(linear, "linear_backward", head_without_weight_grad)
    errors = gradcheck.check_model(model, idx, targets, eps=EPS, max_entries=20)
    assert errors["wte"] > BROKEN_TOL
    assert max(e for k, e in errors.items() if k != "wte") <= GRAD_TOL


def test_rel_error_scale_free():
    a = asarray([1.0, -2.0, 3.0])
    assert gradcheck.rel_error(a, a) == 0.0
    assert gradcheck.rel_error(xp().zeros(3), xp().zeros(3)) == 0.0
    assert gradcheck.rel_error(a * 1e-9, a * 1e-9 * 1.01) == pytest.approx(gradcheck.rel_error(a, a * 1.01))
    assert math.isclose(gradcheck.rel_error(a, 1.01 * a), 0.03 / 3.03)


def test_numerical_gradient_needs_float64():
    x = xp().ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match="float64"):
        gradcheck.numerical_gradient(lambda: float(x.sum()), x)
