"""AdamW against a per-element reference, the weight-decay rule, gradient clipping, the schedule."""

import math

import numpy as np
import pytest
from conftest import asarray, assert_allclose, assert_array_equal, rand, tiny_model, to_numpy, xp

from minimoe import AdamW, clip_grad_norm, cosine_lr
from minimoe.optim import default_decay

# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------


def reference_adamw(p0, grad_steps, lrs, b1, b2, eps, wd):
    """Loshchilov & Hutter (2019) Algorithm 2, one scalar at a time, in plain Python floats:
    p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)."""
    p = [float(a) for a in to_numpy(p0).ravel()]
    m, v = [0.0] * len(p), [0.0] * len(p)
    for t, (g, lr) in enumerate(zip(grad_steps, lrs), start=1):
        for i, gi in enumerate(float(a) for a in to_numpy(g).ravel()):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            p[i] = p[i] - lr * (m_hat / (math.sqrt(v_hat) + eps) + wd * p[i])
    return np.array(p).reshape(p0.shape)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_reference(rng, weight_decay):
    params = {"blocks.0.attn.wqkv": rand(rng, 3, 4), "ln_f.w": 1.0 + rand(rng, 4), "wte": rand(rng, 5, 4)}
    start = {k: v.copy() for k, v in params.items()}
    betas, eps = (0.9, 0.95), 1e-8
    opt = AdamW(params, lr=0.01, betas=betas, eps=eps, weight_decay=weight_decay)
    grads = [{k: rand(rng, *v.shape) for k, v in params.items()} for _ in range(4)]
    lrs = [0.01, 0.01, 0.03, 0.005]  # the last two override the default lr for one step
    arrays = {k: v for k, v in params.items()}  # the optimizer must update these arrays in place
    for g, lr in zip(grads, lrs):
        opt.step(g, lr=None if lr == 0.01 else lr)
    for k in params:
        assert params[k] is arrays[k]
        wd = weight_decay if k == "blocks.0.attn.wqkv" else 0.0  # 1-D gains and embeddings: no decay
        expected = reference_adamw(start[k], [g[k] for g in grads], lrs, *betas, eps, wd)
        assert_allclose(params[k], expected, rtol=1e-12, atol=1e-15)
    assert opt.t == 4


def test_adamw_first_step_is_lr_times_sign():
    # with bias correction, the first update is lr * g / (|g| + eps) ~ lr * sign(g), whatever |g| is
    p = {"w": xp().zeros((2, 3))}
    g = np.array([[1e-3, -5.0, 2.0], [-1e3, 0.5, -0.25]])
    AdamW(p, lr=0.1, weight_decay=0.0).step({"w": asarray(g)})
    assert_allclose(p["w"], -0.1 * np.sign(g), rtol=1e-4)


def test_adamw_skips_missing_gradients_and_keeps_dtype(rng):
    params = {"a": rand(rng, 2, 2).astype(np.float32), "b": rand(rng, 2, 2).astype(np.float32)}
    b0 = params["b"].copy()
    AdamW(params, lr=0.1).step({"a": xp().ones((2, 2), dtype=np.float32)})
    assert_array_equal(params["b"], b0)
    assert params["a"].dtype == np.float32


def test_adamw_state_dict_round_trip(rng):
    params = {"w": rand(rng, 3, 3)}
    opt = AdamW(params, lr=0.01)
    for _ in range(3):
        opt.step({"w": rand(rng, 3, 3)})
    twin_params = {"w": params["w"].copy()}
    twin = AdamW(twin_params, lr=0.01)
    twin.load_state_dict(
        {
            k: ({n: a.copy() for n, a in v.items()} if isinstance(v, dict) else v)
            for k, v in opt.state_dict().items()
        }
    )
    g = rand(rng, 3, 3)
    opt.step({"w": g})
    twin.step({"w": g.copy()})
    assert_array_equal(params["w"], twin_params["w"])


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_adamw_invalid_args(kwargs, word):
    with pytest.raises(ValueError, match=word):
        AdamW({"w": xp().zeros((2, 2))}, **kwargs)


# ---------------------------------------------------------------------------------------------
# Which parameters decay
# ---------------------------------------------------------------------------------------------


def expected_decay(name, p, decay_embeddings):
    # matrices (and 3-D expert stacks) decay; 1-D gains and biases never; embeddings on request
    return p.ndim >= 2 and (decay_embeddings or name not in ("wte", "wpe"))


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_rule_on_a_real_model(decay_embeddings):
    model = tiny_model("gpt2", tie_embeddings=False)
    opt = AdamW(model.params, lr=0.5, weight_decay=0.1, decay_embeddings=decay_embeddings)
    for name, p in model.params.items():
        assert opt.decay[name] == expected_decay(name, p, decay_embeddings), name
    assert opt.decay["lm_head"] and opt.decay["blocks.0.attn.wqkv"] and not opt.decay["blocks.0.attn.bqkv"]
    assert not opt.decay["blocks.0.ln1.w"] and opt.decay["wte"] == decay_embeddings
    # behaviour: with zero gradients Adam's part is exactly 0, so only the decay moves weights
    before = {k: v.copy() for k, v in model.params.items()}
    opt.step({k: xp().zeros_like(v) for k, v in model.params.items()})
    for name, p in model.params.items():
        factor = 1.0 - 0.5 * 0.1 if expected_decay(name, p, decay_embeddings) else 1.0
        assert_allclose(p, before[name] * factor, rtol=1e-15)


def test_default_decay_and_custom_rule():
    zeros = xp().zeros
    assert default_decay("blocks.0.moe.experts.w1", zeros((2, 3, 4)))  # 3-D expert stacks decay
    assert not default_decay("blocks.0.attn.bo", zeros(3))
    assert not default_decay("wpe", zeros((4, 3)))
    assert default_decay("wpe", zeros((4, 3)), decay_embeddings=True)
    opt = AdamW({"a": zeros((2, 2)), "b": zeros(2)}, decay=lambda n, p: n == "b")
    assert opt.decay == {"a": False, "b": True}


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------


def _norm(grads):
    return math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))


def test_clip_grad_norm_clips_to_max_norm(rng):
    grads = {"a": rand(rng, 4, 5, scale=3.0), "b": rand(rng, 7, scale=3.0)}
    before = {k: v.copy() for k, v in grads.items()}
    pre = _norm(grads)
    assert pre > 5.0
    total = clip_grad_norm(grads, 1.0)
    assert float(total) == pytest.approx(pre, rel=1e-12)  # returns the norm BEFORE clipping
    assert _norm(grads) == pytest.approx(1.0, rel=1e-5)
    ratio = to_numpy(before["a"] / grads["a"])
    assert_allclose(ratio, ratio.flat[0], rtol=1e-12)  # one common factor: direction kept
    assert_allclose(before["b"] / grads["b"], ratio.flat[0], rtol=1e-12)


def test_clip_grad_norm_leaves_small_gradients_unchanged(rng):
    grads = {
        "a": rand(rng, 3, 3, scale=0.01).astype(np.float32),
        "b": rand(rng, 2, scale=0.01).astype(np.float32),
    }
    before = {k: v.copy() for k, v in grads.items()}
    total = clip_grad_norm(grads, 1.0)
    assert float(total) == pytest.approx(_norm(before), rel=1e-6)
    for k in grads:
        assert_array_equal(grads[k], before[k])
        assert grads[k].dtype == np.float32


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_clip_grad_norm_invalid(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm({"a": xp().ones(2)}, max_norm)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------


def test_cosine_lr_shape():
    max_lr, min_lr, warmup, total = 1.0, 0.1, 10, 100
    lrs = [cosine_lr(s, max_lr, warmup, total, min_lr) for s in range(130)]
    # warmup: linear from max_lr/warmup, reaching the peak at the last warmup step
    assert_allclose(lrs[:warmup], np.arange(1, warmup + 1) / warmup, rtol=1e-15)
    assert lrs[warmup - 1] == max_lr == max(lrs)
    assert lrs[warmup] == pytest.approx(max_lr, rel=1e-15)
    # decay: strictly decreasing half cosine, halfway at the midpoint, min_lr at the end and after
    decay = lrs[warmup : total + 1]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lrs[(warmup + total) // 2] == pytest.approx((max_lr + min_lr) / 2, rel=1e-12)
    assert lrs[total] == pytest.approx(min_lr, rel=1e-12)
    assert all(lr == min_lr for lr in lrs[total:])


def test_cosine_lr_defaults_and_no_warmup():
    assert cosine_lr(0, 3e-4, 0, 50) == pytest.approx(3e-4, rel=1e-12)
    assert cosine_lr(50, 3e-4, 0, 50) == pytest.approx(3e-5)  # min_lr defaults to max_lr / 10
    assert cosine_lr(5, 1.0, 100, 20) == pytest.approx(0.06)  # warmup longer than the run: still warming


@pytest.mark.parametrize(
    "args,word",
    [
        ((-1, 1.0, 10, 100), "step"),
        ((0, 1.0, -1, 100), "warmup_iters"),
        ((0, 1.0, 10, -5), "max_iters"),
        ((0, -1.0, 10, 100), "max_lr"),
        ((0, 1.0, 10, 100, 2.0), "min_lr"),
        ((0, 1.0, 10, 100, -0.1), "min_lr"),
    ],
)
def test_cosine_lr_invalid_args(args, word):
    with pytest.raises(ValueError, match=word):
        cosine_lr(*args)


def test_adamw_rejects_non_positive_eps():
    with pytest.raises(ValueError, match="eps"):
        AdamW({"w": xp().ones((2, 2))}, eps=0.0)


def test_clip_grad_norm_rejects_empty_grads():
    with pytest.raises(ValueError, match="no gradients"):
        clip_grad_norm({}, 1.0)
