"""Routers (ops/router.py) and balancing losses (ops/balance.py): float64 gradient checks and the
semantics each router promises.

Top-k selection is piecewise constant, so a finite-difference check is only meaningful where no
two scores that decide the selection (or the order of the chosen K) lie within the step of each
other. Every check below asserts that precondition (`_assert_separated`) before comparing.
Legend: N tokens, E experts, K experts per token.
"""

import numpy as np
import pytest
from conftest import asarray, assert_allclose, assert_array_equal, to_numpy, xp

from minimoe.gradcheck import check_op
from minimoe.ops import balance, router
from minimoe.ops.activation import sigmoid

EPS = 1e-5  # finite-difference step
TOL = 1e-6  # max relative error accepted
N, E = 7, 6


def separated_logits(rng, n=N, e=E, gap=0.4):
    """(n, e) logits whose entries in each row are a shuffled ladder 0, gap, 2 gap, ... plus a
    random per-row offset: every pair differs by at least `gap`, so no finite-difference step
    can change which experts are chosen."""
    ladder = np.tile(np.arange(e) * gap, (n, 1))
    return rng.permuted(ladder, axis=1) - (e - 1) * gap / 2 + 0.3 * rng.standard_normal((n, 1))


def _assert_separated(scores, margin=1e-3):
    """Every pair of scores in a row differs by more than `margin` (>> the step EPS)."""
    s = np.sort(scores, axis=-1)
    assert np.diff(s, axis=-1).min() > margin


def _gates_only(forward):
    """Adapt a router forward returning (gates, idx, cache) to check_op's (y, cache)."""

    def f(*args):
        gates, _, cache = forward(*args)
        return gates, cache

    return f


# ------------------------------------------------------------------------------------------------
# gradient checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_gradients(k, renormalize):
    logits = separated_logits(np.random.default_rng(k))
    _assert_separated(logits)
    err = check_op(
        _gates_only(lambda lg: router.softmax_topk_forward(lg, k, renormalize)),
        router.softmax_topk_backward,
        [asarray(logits)],
        eps=EPS,
    )
    assert err[0] <= TOL


def test_noisy_logits_gradients_both_inputs():
    rng = np.random.default_rng(1)
    clean, noise_logits = asarray(rng.standard_normal((N, E))), asarray(rng.standard_normal((N, E)))
    noise = asarray(rng.standard_normal((N, E)))  # fixed: the function is smooth in both inputs

    forward = lambda c, z: router.noisy_logits_forward(c, z, noise)
    err = check_op(forward, router.noisy_logits_backward, [clean, noise_logits], eps=EPS)
    assert err[0] <= TOL and err[1] <= TOL


def test_noisy_logits_without_noise_is_the_identity():
    clean = asarray(np.random.default_rng(2).standard_normal((N, E)))
    H, cache = router.noisy_logits_forward(clean, clean * 3, None)
    assert H is clean
    dH = xp().ones_like(clean)
    dclean, dnoise = router.noisy_logits_backward(dH, cache)
    assert dclean is dH and dnoise is None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sigmoid_bias_topk_gradients(k):
    rng = np.random.default_rng(10 + k)
    bias = np.array([0.3, -0.2, 0.15, -0.1, 0.05, 0.25])  # nonzero: it changes the selection
    logits = separated_logits(rng, gap=0.5)
    while np.diff(np.sort(sigmoid(logits) + bias), axis=-1).min() < 0.01:  # redraw near-ties
        logits = separated_logits(rng, gap=0.5)
    _assert_separated(sigmoid(logits) + bias)
    logits, bias = asarray(logits), asarray(bias)
    _, idx_biased, _ = router.sigmoid_bias_topk_forward(logits, bias, k)
    _, idx_plain, _ = router.sigmoid_bias_topk_forward(logits, xp().zeros(E), k)
    assert bool((idx_biased != idx_plain).any())  # the bias really moves the choice in this example
    err = check_op(
        _gates_only(lambda lg: router.sigmoid_bias_topk_forward(lg, bias, k)),
        router.sigmoid_bias_topk_backward,
        [logits],
        eps=EPS,
    )
    assert err[0] <= TOL


@pytest.mark.parametrize("kind", ["softmax", "sigmoid_bias"])
def test_router_probs_gradients(kind):
    logits = asarray(np.random.default_rng(3).standard_normal((N, E)) * 2)
    probs, _ = router.router_probs_forward(logits, kind)
    assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-12)
    err = check_op(
        lambda lg: router.router_probs_forward(lg, kind),
        lambda dp, cache: router.router_probs_backward(dp, cache, kind),
        [logits],
        eps=EPS,
    )
    assert err[0] <= TOL


def test_load_balancing_loss_gradient_wrt_probs():
    rng = np.random.default_rng(4)
    probs, _ = router.router_probs_forward(asarray(rng.standard_normal((N, E))), "softmax")
    idx = asarray(np.stack([rng.permutation(E)[:2] for _ in range(N)]))  # f is a constant of idx
    err = check_op(
        lambda p: balance.load_balancing_loss_forward(p, idx, E),
        balance.load_balancing_loss_backward,
        [probs],
        eps=EPS,
    )
    assert err[0] <= TOL


def test_z_loss_gradient_wrt_logits():
    logits = asarray(np.random.default_rng(5).standard_normal((N, E)) * 3)
    err = check_op(balance.z_loss_forward, balance.z_loss_backward, [logits], eps=EPS)
    assert err[0] <= TOL


# ------------------------------------------------------------------------------------------------
# semantics
# ------------------------------------------------------------------------------------------------


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_renormalised_gates_are_softmax_over_the_chosen_logits(k):
    logits = separated_logits(np.random.default_rng(6))
    gates, idx, _ = router.softmax_topk_forward(asarray(logits), k, renormalize=True)
    idx = to_numpy(idx)
    assert_array_equal(idx, np.argsort(-logits, axis=-1)[:, :k])  # best first
    chosen = np.take_along_axis(logits, idx, axis=-1)
    assert_allclose(gates, _softmax(chosen), rtol=1e-12)
    # ... which is also softmax -> take the top k -> divide by their sum
    p = np.take_along_axis(_softmax(logits), idx, axis=-1)
    assert_allclose(gates, p / p.sum(axis=-1, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_unrenormalised_gates_are_the_full_softmax_at_the_chosen_experts(k):
    logits = separated_logits(np.random.default_rng(7))
    gates, idx, _ = router.softmax_topk_forward(asarray(logits), k, renormalize=False)
    gates, idx = to_numpy(gates), to_numpy(idx)
    assert_allclose(gates, np.take_along_axis(_softmax(logits), idx, axis=-1), rtol=1e-12)
    assert (gates.sum(axis=-1) < 1.0).all()  # a different function from the renormalised one


def test_k1_renormalised_gate_is_one_and_passes_no_gradient():
    logits = asarray(separated_logits(np.random.default_rng(8)))
    gates, _, cache = router.softmax_topk_forward(logits, 1, renormalize=True)
    assert_array_equal(gates, 1.0)
    dlogits = router.softmax_topk_backward(asarray(np.random.default_rng(9).standard_normal((N, 1))), cache)
    assert_array_equal(dlogits, 0.0)
    _, _, cache = router.softmax_topk_forward(logits, 1, renormalize=False)
    assert float(abs(router.softmax_topk_backward(xp().ones((N, 1)), cache)).max()) > 1e-3


def test_sigmoid_bias_chooses_experts_but_does_not_change_gates():
    rng = np.random.default_rng(11)
    logits = separated_logits(rng, gap=0.5)
    s = sigmoid(logits)
    k = 2
    # a bias that leaves the selection alone leaves the gates bit-for-bit alone
    g0, idx0, _ = router.sigmoid_bias_topk_forward(asarray(logits), xp().zeros(E), k)
    g1, idx1, _ = router.sigmoid_bias_topk_forward(asarray(logits), xp().full(E, 0.7), k)
    assert_array_equal(idx0, idx1)
    assert_array_equal(g0, g1)
    # a large bias on expert 4 puts it in every token's top k ...
    bias = np.zeros(E)
    bias[4] = 2.0
    g2, idx2, _ = router.sigmoid_bias_topk_forward(asarray(logits), asarray(bias), k)
    idx0, idx2 = to_numpy(idx0), to_numpy(idx2)
    assert (idx2[:, 0] == 4).all() and (idx0 != 4).all(axis=-1).any()
    # ... yet the gates are the UNBIASED scores of the chosen experts, renormalised
    s_sel = np.take_along_axis(s, idx2, axis=-1)
    assert_allclose(g2, s_sel / s_sel.sum(axis=-1, keepdims=True), rtol=1e-12)


def test_sigmoid_router_probs_are_normalised_scores():
    logits = np.random.default_rng(12).standard_normal((N, E))
    probs, _ = router.router_probs_forward(asarray(logits), "sigmoid_bias")
    s = sigmoid(logits)
    assert_allclose(probs, s / s.sum(axis=-1, keepdims=True), rtol=1e-12)


def test_topk_ties_break_towards_the_smaller_index():
    # every logit equal: each token deterministically takes experts 0, 1, ..., K-1
    for k in (1, 2, 3):
        for renorm in (True, False):
            gates, idx, _ = router.softmax_topk_forward(xp().zeros((N, E)), k, renorm)
            assert_array_equal(idx, np.tile(np.arange(k), (N, 1)))
        _, idx, _ = router.sigmoid_bias_topk_forward(xp().zeros((N, E)), xp().zeros(E), k)
        assert_array_equal(idx, np.tile(np.arange(k), (N, 1)))
    # a tie between experts 3 and 5 for the top slot: 3 wins, 5 comes second, every time
    logits = asarray([[0.0, 0.1, 0.2, 1.0, 0.3, 1.0]])
    results = [router.softmax_topk_forward(logits.copy(), 2)[1] for _ in range(3)]
    for idx in results:
        assert_array_equal(idx, [[3, 5]])
    gates, _, _ = router.softmax_topk_forward(logits, 2)
    assert_allclose(gates, [[0.5, 0.5]], rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2])
def test_balancing_loss_is_one_at_uniform_routing(k):
    # equal probabilities AND equal counts: N = 3E tokens, token n sends choice j to (n + j) mod E
    n = 3 * E
    probs = xp().full((n, E), 1.0 / E)
    idx = (np.arange(n)[:, None] + np.arange(k)[None, :]) % E
    assert (np.bincount(idx.ravel(), minlength=E) == 3 * k).all()
    loss, _ = balance.load_balancing_loss_forward(probs, asarray(idx), E)
    assert float(loss) == pytest.approx(1.0, abs=1e-14)


def test_balancing_loss_is_E_at_full_collapse():
    probs = xp().zeros((N, E))
    probs[:, 0] = 1.0
    loss, _ = balance.load_balancing_loss_forward(probs, xp().zeros((N, 1), dtype=np.int64), E)
    assert float(loss) == pytest.approx(E)


def test_z_loss_value_and_stability():
    logits = np.random.default_rng(13).standard_normal((N, E))
    z, _ = balance.z_loss_forward(asarray(logits))
    lse = np.log(np.exp(logits).sum(axis=-1))
    assert float(z) == pytest.approx(float((lse**2).mean()), rel=1e-12)
    big, _ = balance.z_loss_forward(asarray(logits) + 1000.0)  # no overflow: max-shifted logsumexp
    assert np.isfinite(to_numpy(big)) and float(big) == pytest.approx(
        float(((lse + 1000.0) ** 2).mean()), rel=1e-12
    )
