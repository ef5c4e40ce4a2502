"""Experts and the dispatch/combine that move token-slots to them and back, by sorting.

Legend: N tokens, C channels, E experts, K experts per token, F expert hidden size,
M slots kept (N*K when dropless). A *slot* is one (token n, choice k) pair.

    x (N, C) --dispatch--> x_sorted (M, C), slots grouped by expert into contiguous slices
             --experts---> y_sorted (M, C), expert e applied to its slice offsets[e]:offsets[e+1]
             --combine---> y (N, C) = sum_k gates[n, k] * y_sorted[slot of (n, k)]

Slots are numbered s = k * N + n ("choice rank major"), and sorted by expert with a STABLE sort,
so within one expert the slots stand in the order: all first choices (k = 0) by token index n,
then all second choices, and so on. With a capacity, each expert keeps its first `capacity` slots
in that order and DROPS the rest: first choices win over second choices, and among equals the
earlier token in the batch (n = b*T + t) wins. A dropped slot contributes nothing to the output;
a token whose every slot was dropped passes through the block on the residual stream alone.

Dispatch and combine come first as `*_reference`, written plainly (each expert's slots found by
comparison, tokens summed by a scatter-add); the fast versions below them compute the same
numbers with one sort and K gathers (a test checks them equal in float64).
"""

import math
from fractions import Fraction
from typing import Any, NamedTuple

from minimoe import backend
from minimoe.ops import ffn


def capacity_for(N, K, E, capacity_factor):
    """Slots per expert: ceil(capacity_factor * N * K / E); None when dropless (factor 0)."""
    if not capacity_factor:
        return None
    # exact rational arithmetic: in floats 1.1 * 100 / 10 = 11.000000000000002 would round up to 12
    return max(1, math.ceil(Fraction(str(capacity_factor)) * N * K / E))


class DispatchCache(NamedTuple):
    order: Any  # (M,) the kept slots s = k*N + n, grouped by expert
    token: Any  # (M,) the token of each kept slot, order % N
    slot_pos: Any  # (N, K) the row of x_sorted holding slot (n, k), or M when it was dropped
    M: int  # slots kept
    N: int  # tokens
    K: int  # experts per token


class CombineCache(NamedTuple):
    y_sorted: Any  # (M, C) the experts' outputs, one row per kept slot
    gate_sorted: Any  # (M,) the gate of each kept slot
    dispatch: DispatchCache  # where each slot went


# ---------------------------------------------------------------------------------------------
# Plain twins: each expert's slots found by a comparison, tokens summed by a scatter-add
# ---------------------------------------------------------------------------------------------


def dispatch_forward_reference(x, idx, E, capacity=None):
    """x (N, C), idx (N, K) -> x_sorted (M, C), offsets (E+1,), counts (E,), cache: the plain twin
    of `dispatch_forward`. Expert e takes its slots in slot order, at most `capacity` of them."""
    xp = backend.xp_of(x)
    N, K = idx.shape
    expert_of_slot = idx.T.reshape(-1)  # slot s = k*N + n
    # expert e's slots in slot order (first choices first, by token), the first `capacity` kept
    kept = [xp.flatnonzero(expert_of_slot == e)[:capacity] for e in range(E)]
    order = xp.concatenate(kept)
    M = order.shape[0]
    slot_pos = xp.full(N * K, M, dtype=xp.int64)
    slot_pos[order] = xp.arange(M)
    offsets = [0]
    for slots in kept:
        offsets.append(offsets[-1] + slots.shape[0])
    counts = xp.bincount(expert_of_slot, minlength=E)  # before drops
    token = order % N
    return x[token], offsets, counts, DispatchCache(order, token, slot_pos.reshape(K, N).T, M, N, K)


def dispatch_backward_reference(dx_sorted, cache):
    """dx_sorted (M, C) -> dx (N, C): each kept slot's gradient added to its token's row."""
    xp = backend.xp_of(dx_sorted)
    dx = xp.zeros((cache.N, dx_sorted.shape[1]), dtype=dx_sorted.dtype)
    xp.add.at(dx, cache.token, dx_sorted)
    return dx


def combine_forward_reference(y_sorted, gates, cache):
    """y_sorted (M, C), gates (N, K) -> y (N, C): y[n] = sum over n's kept slots of gate * output."""
    xp = backend.xp_of(y_sorted)
    gate_sorted = gates.T.reshape(-1)[cache.order]  # slot s = k*N + n has gate gates[n, k]
    y = xp.zeros((cache.N, y_sorted.shape[1]), dtype=y_sorted.dtype)
    xp.add.at(y, cache.token, gate_sorted[:, None] * y_sorted)
    return y, CombineCache(y_sorted, gate_sorted, cache)


def combine_backward_reference(dy, cache):
    """dy (N, C) -> dy_sorted (M, C), dgates (N, K), the plain twin of `combine_backward`:
    dy_sorted[m] = gate[m] * dy[token m],  dgates[n, k] = <dy[n], y_sorted[slot (n, k)]>, 0 if dropped."""
    xp = backend.xp_of(dy)
    d = cache.dispatch
    dy_slot = dy[d.token]  # (M, C) the gradient at each kept slot's token
    dgates = xp.zeros(d.N * d.K, dtype=dy.dtype)  # dropped slots: 0
    dgates[d.order] = (dy_slot * cache.y_sorted).sum(axis=-1)
    return cache.gate_sorted[:, None] * dy_slot, dgates.reshape(d.K, d.N).T


# ---------------------------------------------------------------------------------------------
# The fast versions: one stable sort, and gathers per choice rank (no scatter-add)
# ---------------------------------------------------------------------------------------------


def dispatch_forward(x, idx, E, capacity=None):
    """x (N, C), idx (N, K) -> x_sorted (M, C), offsets (E+1,) host ints, counts (E,), cache.

    counts are the assignments per expert BEFORE drops (what the balancing loss and the load
    statistics use); offsets bound each expert's slice of kept slots.

    The permutation `order` sorts slots by expert; `slot_pos` (N, K) is its inverse: where each
    slot landed in x_sorted, or M (a null row) when it was dropped.
    """
    # Fast twin of dispatch_forward_reference: one stable sort instead of E comparisons of all slots.
    xp = backend.xp_of(x)
    N, K = idx.shape
    expert_of_slot = idx.T.reshape(-1)  # slot s = k*N + n
    order = backend.argsort_stable(expert_of_slot)
    counts = xp.bincount(expert_of_slot, minlength=E)  # assignments per expert, before drops
    if capacity is not None:
        starts = xp.cumsum(counts) - counts
        rank_in_expert = xp.arange(N * K) - starts[expert_of_slot[order]]
        order = order[rank_in_expert < capacity]
        kept = xp.minimum(counts, capacity)
    else:
        kept = counts
    M = order.shape[0]
    slot_pos = xp.full(N * K, M, dtype=xp.int64)
    slot_pos[order] = xp.arange(M)
    token = order % N
    x_sorted = x[token]
    offsets = [0] + backend.to_numpy(xp.cumsum(kept)).tolist()  # E+1 slice bounds, on the host
    return x_sorted, offsets, counts, DispatchCache(order, token, slot_pos.reshape(K, N).T, M, N, K)


def dispatch_backward(dx_sorted, cache):
    """dx_sorted (M, C) -> dx (N, C): each token gathers the gradients of its kept slots
    (the inverse permutation; no scatter-add needed since we gather per choice rank)."""
    # Fast twin of dispatch_backward_reference: K gathers instead of a scatter-add.
    xp = backend.xp_of(dx_sorted)
    slot_pos = cache.slot_pos
    C = dx_sorted.shape[1]
    if cache.M < cache.N * cache.K:  # some slots were dropped: point them at an appended zero row
        dx_sorted = xp.concatenate([dx_sorted, xp.zeros((1, C), dtype=dx_sorted.dtype)])
    dx = dx_sorted[slot_pos[:, 0]]
    for k in range(1, cache.K):
        dx += dx_sorted[slot_pos[:, k]]
    return dx


def combine_forward(y_sorted, gates, cache):
    """y_sorted (M, C), gates (N, K) -> y (N, C) = sum_k gates[n, k] * y_sorted[slot_pos[n, k]]."""
    # Fast twin of combine_forward_reference: K gathers instead of a scatter-add.
    xp = backend.xp_of(y_sorted)
    slot_pos = cache.slot_pos
    gate_sorted = gates.T.reshape(-1)[cache.order]  # gate of each kept slot, in sorted order
    weighted = y_sorted * gate_sorted[:, None]
    if cache.M < cache.N * cache.K:
        weighted = xp.concatenate([weighted, xp.zeros((1, weighted.shape[1]), dtype=weighted.dtype)])
    y = weighted[slot_pos[:, 0]]
    for k in range(1, cache.K):
        y += weighted[slot_pos[:, k]]
    return y, CombineCache(y_sorted, gate_sorted, cache)


def combine_backward(dy, cache):
    """dy (N, C) -> dy_sorted (M, C), dgates (N, K).
    dy_sorted[slot] = gate[slot] * dy[token of slot];  dgate[slot] = <dy[token], y_sorted[slot]>;
    dropped slots get dgate = 0."""
    # Fast twin of combine_backward_reference: row dots by einsum, the scaling in place.
    xp = backend.xp_of(dy)
    d = cache.dispatch
    dy_sorted = dy[d.token]  # (M, C), each slot's token gradient (a gathered copy) ...
    dgate_sorted = xp.einsum("mc,mc->m", dy_sorted, cache.y_sorted)  # row dots, no (M, C) temporary
    dy_sorted *= cache.gate_sorted[:, None]  # ... then scaled by the slot's gate, in place
    dgates = xp.zeros(d.N * d.K, dtype=dy.dtype)
    dgates[d.order] = dgate_sorted
    return dy_sorted, dgates.reshape(d.K, d.N).T


class ExpertsCache(NamedTuple):
    ffn_caches: list  # one FFN cache per expert, None for an expert that received no slot
    offsets: list  # (E+1,) host ints, expert e's rows are offsets[e]:offsets[e+1]
    activation: str  # "swiglu", "gelu", "gelu_exact" or "relu"
    weight_shapes: dict  # name -> shape of the stacked weights, for the zero gradients


def experts_forward(x_sorted, offsets, w, activation="swiglu"):
    """x_sorted (M, C) -> y_sorted (M, C): expert e's FFN on rows offsets[e]:offsets[e+1].

    w: dict of stacked weights, swiglu: w1, w3 (E, C, F), w2 (E, F, C);
    gelu / gelu_exact / relu: w1 (E, C, F), w2 (E, F, C). Experts have no biases.
    """
    xp = backend.xp_of(x_sorted)
    E = w["w1"].shape[0]
    y = xp.empty_like(x_sorted)
    caches = []
    for e in range(E):
        a, b = offsets[e], offsets[e + 1]
        if a == b:
            caches.append(None)
            continue
        if activation == "swiglu":
            y[a:b], c = ffn.swiglu_mlp_forward(x_sorted[a:b], w["w1"][e], w["w3"][e], w["w2"][e])
        elif activation == "relu":  # Switch Transformer's experts
            y[a:b], c = ffn.relu_mlp_forward(x_sorted[a:b], w["w1"][e], None, w["w2"][e], None)
        else:
            approx = "tanh" if activation == "gelu" else "none"
            y[a:b], c = ffn.gelu_mlp_forward(x_sorted[a:b], w["w1"][e], None, w["w2"][e], None, approx)
        caches.append(c)
    return y, ExpertsCache(caches, offsets, activation, {k: v.shape for k, v in w.items()})


def experts_backward(dy_sorted, cache):
    """dy_sorted (M, C) -> dx_sorted (M, C), dict of stacked weight gradients (E, ., .)."""
    xp = backend.xp_of(dy_sorted)
    offsets = cache.offsets
    dw = {k: xp.zeros(s, dtype=dy_sorted.dtype) for k, s in cache.weight_shapes.items()}
    dx = xp.empty_like(dy_sorted)
    for e, c in enumerate(cache.ffn_caches):
        if c is None:
            continue
        a, b = offsets[e], offsets[e + 1]
        if cache.activation == "swiglu":
            dx[a:b], dw["w1"][e], dw["w3"][e], dw["w2"][e] = ffn.swiglu_mlp_backward(dy_sorted[a:b], c)
        elif cache.activation == "relu":
            dx[a:b], dw["w1"][e], _, dw["w2"][e], _ = ffn.relu_mlp_backward(dy_sorted[a:b], c)
        else:
            dx[a:b], dw["w1"][e], _, dw["w2"][e], _ = ffn.gelu_mlp_backward(dy_sorted[a:b], c)
    return dx, dw
