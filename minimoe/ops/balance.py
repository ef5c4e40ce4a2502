"""Auxiliary losses that keep a router healthy, computed per MoE layer.

Legend: N tokens, E experts, K experts per token.
"""

from typing import Any, NamedTuple

from minimoe import backend


class LoadBalancingCache(NamedTuple):
    f: Any  # (E,) fraction of the N*K assignments that went to each expert
    N: int  # tokens
    E: int  # experts


def load_balancing_loss_forward(probs, idx, E):
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6), for top-K routing.

    probs (N, E): the router's FULL distribution P (not just the chosen K);
    idx (N, K): the experts chosen, BEFORE any capacity drops.
        f_e = (number of the N*K assignments that went to e) / (N*K)     -- fraction of slots
        P_e = mean over tokens of probs[:, e]                             -- mean router mass
        loss = E * sum_e f_e * P_e
    f is piecewise constant (no gradient); the gradient flows through P only.
    Uniform routing (f_e = P_e = 1/E) gives exactly 1, for every K; perfectly collapsed routing
    gives up to E. Hugging Face's Mixtral `load_balancing_loss_func` counts f per choice rank
    (each rank's fractions sum to 1), so its value at uniform routing is K, not 1; and it pools
    the tokens of ALL layers into one loss, where we average nothing and keep one loss per layer
    (the model adds the layers' losses, each times aux_loss_coef).
    """
    xp = backend.xp_of(probs)
    N, K = idx.shape
    counts = xp.bincount(idx.reshape(-1), minlength=E)
    f = counts.astype(probs.dtype) / (N * K)
    P = probs.mean(axis=0)
    loss = E * (f * P).sum()
    return loss, LoadBalancingCache(f, N, E)


def load_balancing_loss_backward(dloss, cache):
    """dloss (scalar) -> dprobs (N, E):  d loss / d probs[n, e] = E * f_e / N."""
    N, E = cache.N, cache.E
    xp = backend.xp_of(cache.f)
    return xp.broadcast_to((dloss * E / N) * cache.f, (N, E)).copy()


class ZLossCache(NamedTuple):
    lse: Any  # (N,) log sum_e exp(logits[n, e])
    probs: Any  # (N, E) softmax(logits)
    N: int  # tokens


def z_loss_forward(logits):
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5):  (1/N) sum_n (log sum_e exp(logits[n, e]))^2.

    logits (N, E) -> scalar. Penalises large router logits, which keeps the softmax out of the
    range where float32 round-off makes routing unstable.
    """
    xp = backend.xp_of(logits)
    m = logits.max(axis=-1, keepdims=True)
    e = xp.exp(logits - m)
    s = e.sum(axis=-1, keepdims=True)
    lse = (m + xp.log(s))[:, 0]
    N = logits.shape[0]
    return (lse * lse).sum() / N, ZLossCache(lse, e / s, N)


def z_loss_backward(dloss, cache):
    """dloss -> dlogits (N, E) = dloss * (2/N) * lse_n * softmax(logits_n)."""
    return (dloss * 2.0 / cache.N) * cache.lse[:, None] * cache.probs
