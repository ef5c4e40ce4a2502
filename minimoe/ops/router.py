"""Token-choice routers: each token picks its K experts and a gate weight for each.

Legend: N tokens (B*T), E experts, K experts per token. Every router returns
    gates (N, K) float -- the weights that multiply the chosen experts' outputs,
    idx   (N, K) int   -- the chosen experts, best first,
and its backward takes dgates and returns dlogits (N, E). Top-k selection is piecewise constant:
no gradient flows through *which* experts were chosen, only through the gate values.
"""

from typing import Any, NamedTuple

from minimoe import backend
from minimoe.ops.activation import sigmoid, softmax_backward, softmax_forward


def _scatter_rows(vals, idx, E):
    """vals (N, K) placed at columns idx (N, K) of a zero (N, E) array (the K columns differ)."""
    xp = backend.xp_of(vals)
    out = xp.zeros((vals.shape[0], E), dtype=vals.dtype)
    xp.put_along_axis(out, idx, vals, axis=-1)
    return out


class SoftmaxTopkCache(NamedTuple):
    renormalize: bool  # softmax over the K chosen logits (True) or the full softmax's K entries
    softmax: tuple  # the cache of that softmax
    idx: Any  # (N, K) the chosen experts
    E: int  # experts


def softmax_topk_forward(logits, k, renormalize=True):
    """logits (N, E) -> gates (N, K), idx (N, K), cache.

    p = softmax(logits); idx = the K largest p (equivalently the K largest logits).
    renormalize=True (Mixtral, Jiang et al. 2024):  gates = p_idx / sum(p_idx)
        which equals softmax over the K chosen logits alone.
        With K = 1 the gate is always exactly 1, so the router receives NO gradient from the
        language-modelling loss (only from auxiliary losses): Switch does not renormalise.
    renormalize=False (Switch, Fedus et al. 2021, eq. 2; OLMoE): gates = p_idx.
    """
    xp = backend.xp_of(logits)
    idx = backend.topk_indices(logits, k)
    if renormalize:
        sel = xp.take_along_axis(logits, idx, axis=-1)
        gates, sm_cache = softmax_forward(sel)
    else:
        p, sm_cache = softmax_forward(logits)
        gates = xp.take_along_axis(p, idx, axis=-1)
    return gates, idx, SoftmaxTopkCache(renormalize, sm_cache, idx, logits.shape[-1])


def softmax_topk_backward(dgates, cache):
    """dgates (N, K) -> dlogits (N, E).
    renormalised: a softmax over the chosen logits, so dlogits_idx = g (dg - sum(dg g)), 0 elsewhere.
    not renormalised: scatter dg into the full (N, E) softmax gradient, then through the softmax."""
    if cache.renormalize:
        return _scatter_rows(softmax_backward(dgates, cache.softmax), cache.idx, cache.E)
    return softmax_backward(_scatter_rows(dgates, cache.idx, cache.E), cache.softmax)


def noisy_logits_forward(clean, noise_logits, noise):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 4):  H = clean + noise * softplus(noise_logits).

    clean = x W_g, noise_logits = x W_noise (N, E); noise (N, E) standard normal, drawn by the
    caller in training (pass None at evaluation: H = clean). The learned softplus scale lets
    the router decide how much exploration each expert gets. Then softmax_topk (renormalised).
    """
    xp = backend.xp_of(clean)
    if noise is None:
        return clean, None
    # softplus(z) = log(1 + e^z), computed stably as max(z, 0) + log1p(e^-|z|)
    sp = xp.maximum(noise_logits, 0) + xp.log1p(xp.exp(-xp.abs(noise_logits)))
    return clean + noise * sp, (noise, noise_logits)


def noisy_logits_backward(dH, cache):
    """dH (N, E) -> dclean (N, E), dnoise_logits (N, E) or None.  softplus'(z) = sigmoid(z)."""
    if cache is None:
        return dH, None
    noise, noise_logits = cache
    return dH, dH * noise * sigmoid(noise_logits)


class SigmoidTopkCache(NamedTuple):
    scores: Any  # (N, E) s = sigmoid(logits)
    idx: Any  # (N, K) the chosen experts
    gates: Any  # (N, K) s_idx / sum(s_idx) when renormalised, else s_idx
    total: Any  # (N, 1) sum(s_idx) when renormalised, else None


def group_limited_topk(scores, k, n_group=1, topk_group=1):
    """scores (N, E) -> idx (N, K): the K best experts, chosen only from each token's best groups.

    Group-limited routing (DeepSeek-V3's released code and config: n_group, topk_group): the E
    experts form n_group groups of E / n_group consecutive experts (in DeepSeek-V3, the experts of
    one group sit on one node, so a token talks to at most topk_group nodes):
        group_score[g] = sum of the 2 best scores in group g
        keep the topk_group best groups; idx = topk(scores with every other group's experts at -inf)
    With n_group = 1 this is the plain top-k. Like top-k, a selection: piecewise constant, no gradient.
    """
    xp = backend.xp_of(scores)
    if n_group == 1:
        return backend.topk_indices(scores, k)
    N, E = scores.shape
    grouped = scores.reshape(N, n_group, E // n_group)
    group_score = xp.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)  # (N, n_group)
    best = backend.topk_indices(group_score, topk_group)  # (N, topk_group)
    keep = xp.zeros((N, n_group), dtype=bool)
    xp.put_along_axis(keep, best, True, axis=-1)
    masked = xp.where(xp.repeat(keep, E // n_group, axis=-1), scores, -xp.inf)
    return backend.topk_indices(masked, k)


def sigmoid_bias_topk_forward(logits, bias, k, renormalize=True, n_group=1, topk_group=1):
    """DeepSeek-V3's router (DeepSeek-AI 2024, eqs. 13-16): auxiliary-loss-free balancing.

    logits (N, E), bias (E,) -> gates (N, K), idx (N, K), cache.
        s = sigmoid(logits)                 affinity of each token to each expert
        idx = topk(s + bias)                the bias only CHOOSES the experts ...
        gates = s_idx / sum(s_idx)          ... the gates use the unbiased scores, renormalised
                                            (renormalize=True, the paper's eq. 13; HF norm_topk_prob),
        gates = s_idx                       or not (renormalize=False): then the K gates do not sum
                                            to 1 and each gate is a plain sigmoid of its own logit.
    n_group, topk_group > 1: idx is chosen by `group_limited_topk` (same bias-shifted scores).
    (transformers adds 1e-20 to the sum, which changes nothing at our precision.)
    The bias is not a parameter: no gradient reaches it and the optimizer never sees it; it is
    nudged between steps towards balanced load (see `moe.update_bias`).
    """
    xp = backend.xp_of(logits)
    s = sigmoid(logits)
    idx = group_limited_topk(s + bias, k, n_group, topk_group)
    s_sel = xp.take_along_axis(s, idx, axis=-1)
    if not renormalize:
        return s_sel, idx, SigmoidTopkCache(s, idx, s_sel, None)
    total = s_sel.sum(axis=-1, keepdims=True)
    gates = s_sel / total
    return gates, idx, SigmoidTopkCache(s, idx, gates, total)


def sigmoid_bias_topk_backward(dgates, cache):
    """dgates (N, K) -> dlogits (N, E).
    renormalised, g_j = s_j / S with S = sum_sel s  =>  ds_i = (dg_i - sum_j dg_j g_j) / S on the chosen i;
    not renormalised, g_j = s_j                     =>  ds_i = dg_i;
    then through the sigmoid: dlogit = ds * s (1 - s)."""
    s = cache.scores
    if cache.total is None:
        ds_sel = dgates
    else:
        ds_sel = (dgates - (dgates * cache.gates).sum(axis=-1, keepdims=True)) / cache.total
    ds = _scatter_rows(ds_sel, cache.idx, s.shape[-1])
    return ds * s * (1.0 - s)


def jitter_forward(x, u):
    """Router jitter (Switch Transformer, Fedus et al. 2021, sec. 2.4; HF Mixtral's router_jitter_noise):
    x (N, C), u (N, C) drawn uniform in [1 - j, 1 + j] by the caller in training -> x * u (N, C).
    A multiplicative perturbation of the input, so the router explores near its decision edges."""
    return x * u, u


def jitter_backward(dy, cache):
    """dy (N, C) -> dx = dy * u (the same u: multiplication by a constant)."""
    return dy * cache


def router_probs_forward(logits, kind):
    """The router's full distribution over experts P (N, E), used by the balancing loss and the
    entropy statistic: softmax(logits) for softmax routers; for the sigmoid router, the scores
    normalised to sum to one, s / sum(s) (DeepSeek-V3, eq. 19)."""
    if kind != "sigmoid_bias":
        return softmax_forward(logits)
    s = sigmoid(logits)
    total = s.sum(axis=-1, keepdims=True)
    return s / total, (s, total)


def router_probs_backward(dprobs, cache, kind):
    """dprobs (N, E) -> dlogits (N, E)."""
    if kind != "sigmoid_bias":
        return softmax_backward(dprobs, cache)
    s, total = cache
    probs = s / total
    ds = (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) / total
    return ds * s * (1.0 - s)
