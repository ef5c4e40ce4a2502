"""The Mixture-of-Experts layer: router -> dispatch -> experts -> combine (+ shared experts).

    h (B, T, C) -> x (N, C), N = B*T
    x_r = x * u, u ~ U(1 - j, 1 + j)                     router jitter, training only (j = .router_jitter;
                                                         .jitter_scope "moe": the experts see x_r too)
    logits = x_r W_router (+ b_router)                   (N, E); the bias when .router_logit_bias (Switch)
    gates, idx = router(logits)                          (N, K) each, see ops/router.py
                                                         (Config.router, .renormalize, .top_k, .n_group)
    gates = routed_scaling_factor * gates                (DeepSeek-V3; 1 elsewhere)
    y = sum_k gates[:, k] * Expert_idx[:, k](x)          by sorting slots, see ops/experts.py
      + SharedFFN(x)                                     DeepSeekMoE's always-on experts, if any,
        [* sigmoid(x W_gate)]                            gated per token when .shared_gate (Qwen2-MoE)
and per layer the Switch balancing loss and the ST-MoE z-loss (ops/balance.py), whose weighted
sum the model adds to the language-modelling loss.

Parameters under `pre` (e.g. "blocks.1.moe."):
    router.w (C, E);  router.b (E,) with router_logit_bias;  router.w_noise (C, E) for noisy top-k
    experts.w1 (E, C, F), experts.w2 (E, F, C), experts.w3 (E, C, F) for SwiGLU
    shared.* one dense FFN of width n_shared_experts * shared_hidden (S always-on experts of
    width F_s are exactly one FFN of width S*F_s: their hidden units simply sit side by side).
    shared_gate.w (C, 1) with shared_gate: the gate logit of the shared experts.
Buffers (not trained): router_bias (E,) for the DeepSeek-V3 sigmoid router.

On P ranks (`group`, a layers.exchange.Group): h is this rank's share of the batch; the
balancing loss, z-loss and routing statistics are those of the GLOBAL batch (`global_balance`);
with expert parallelism this rank holds E/P experts and the slots travel to them and back
(exchange.experts_parallel_forward). Capacity is applied per group of tokens (`dispatch`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy

from minimoe import backend
from minimoe.config import Config
from minimoe.layers import exchange
from minimoe.layers.ffn import ffn_backward, ffn_forward, init_ffn_params
from minimoe.ops import balance, experts, gate, linear, router


def init_params(c: Config, pre: str, rng, std: float, std_out: float) -> dict:
    """Host float64 initial weights of one MoE layer (see module docstring for names)."""
    C, E, F = c.n_embd, c.n_experts, c.expert_hidden
    p = {pre + "router.w": rng.standard_normal((C, E)) * c.router_init_std}
    if c.router_logit_bias:
        p[pre + "router.b"] = numpy.zeros(E)
    if c.router == "noisy":
        p[pre + "router.w_noise"] = numpy.zeros((C, E))  # softplus(0) = 0.69: some noise from the start
    p[pre + "experts.w1"] = rng.standard_normal((E, C, F)) * std
    if c.activation == "swiglu":
        p[pre + "experts.w3"] = rng.standard_normal((E, C, F)) * std
    p[pre + "experts.w2"] = rng.standard_normal((E, F, C)) * std_out
    if c.n_shared_experts:
        p.update(init_ffn_params(c, pre + "shared.", c.n_shared_experts * c.shared_hidden, rng, std, std_out))
        if c.shared_gate:
            p[pre + "shared_gate.w"] = rng.standard_normal((C, 1)) * std
    return p


def init_buffers(c: Config) -> dict:
    """Non-trained state: the DeepSeek-V3 selection bias of each MoE layer, zero at the start."""
    if c.n_experts == 0 or c.router != "sigmoid_bias":
        return {}
    return {
        f"blocks.{i}.moe.router_bias": numpy.zeros(c.n_experts) for i in range(c.n_layer) if c.is_moe_block(i)
    }


class MoECache(NamedTuple):
    """What `moe_backward` needs from its forward: each op's cache, by the step that made it."""

    router: tuple  # linear cache of the router logits x W_router
    noise_proj: Optional[tuple]  # linear cache of x W_noise (noisy router), else None
    noise: Optional[tuple]  # noisy-logits cache (noisy router in training), else None
    gate: tuple  # top-k router cache (softmax or sigmoid-bias)
    probs: tuple  # full router distribution, for the balancing loss
    aux: tuple  # load-balancing loss
    z: tuple  # router z-loss
    dispatch: tuple
    experts: tuple
    combine: tuple
    shared: Optional[tuple]  # shared experts' FFN cache, or None without shared experts
    shape: tuple  # (B, T, C) of the input
    share: float = 1.0  # this rank's tokens / all ranks' tokens: the weight of its balancing terms
    jitter: Any = None  # (N, C) the router jitter u (training with router_jitter > 0), else None
    shared_gate_proj: Optional[tuple] = None  # linear cache of x W_gate (shared_gate), else None
    shared_gate: Optional[tuple] = None  # sigmoid-gate cache (shared_gate), else None


def moe_forward(c: Config, h, p: dict, buffers: dict, pre: str, rng, training: bool, group=None):
    """h (B, T, C) -> y (B, T, C), cache, stats (dict of per-layer routing statistics).
    group: the ranks training together (layers.exchange.Group), or None in one process."""
    xp = backend.xp_of(h)
    B, T, C = h.shape
    N, E, K = B * T, c.n_experts, c.top_k
    x = h.reshape(N, C)

    # 0. router jitter (training only): the router sees x * u; with jitter_scope "moe" so do the experts
    x_route, u = x, None
    if training and c.router_jitter > 0:
        u = 1.0 - c.router_jitter + 2.0 * c.router_jitter * rng.random((N, C), dtype=x.dtype)
        x_route, u = router.jitter_forward(x, u)
        if c.jitter_scope == "moe":
            x = x_route

    # 1. router logits (N, E)
    logits, c_router = linear.linear_forward(x_route, p[pre + "router.w"], p.get(pre + "router.b"))
    c_noise = c_wnoise = None
    if c.router == "noisy":
        noise_logits, c_wnoise = linear.linear_forward(x_route, p[pre + "router.w_noise"])
        noise = rng.standard_normal((N, E), dtype=x.dtype) if training else None
        sel_logits, c_noise = router.noisy_logits_forward(logits, noise_logits, noise)
    else:
        sel_logits = logits

    # 2. gates and chosen experts (N, K). The softmax routers (plain and noisy) renormalise over
    # the K chosen (Mixtral; Shazeer's softmax(KeepTopK(H))) or not (Switch, OLMoE) as
    # c.renormalize says.
    if c.router == "sigmoid_bias":
        bias = buffers[pre + "router_bias"]
        gates, idx, c_gate = router.sigmoid_bias_topk_forward(
            sel_logits, bias, K, c.renormalize, c.n_group, c.topk_group
        )
    else:
        gates, idx, c_gate = router.softmax_topk_forward(sel_logits, K, c.renormalize)
    if c.routed_scaling_factor != 1.0:
        gates = gates * c.routed_scaling_factor

    # 3. balancing losses on the full distribution, per layer
    probs, c_probs = router.router_probs_forward(sel_logits, c.router)
    aux, c_aux = balance.load_balancing_loss_forward(probs, idx, E)
    z, c_z = balance.z_loss_forward(sel_logits)

    # 4. dispatch -> experts (here, or on the ranks that hold them) -> combine
    x_sorted, offsets, counts, c_disp = dispatch(c, x, idx)
    w = {k: p[pre + "experts." + k] for k in ("w1", "w2", "w3") if pre + "experts." + k in p}
    if group is not None and group.expert_parallel:
        y_sorted, c_exp = exchange.experts_parallel_forward(x_sorted, offsets, w, c.activation, group)
    else:
        y_sorted, c_exp = experts.experts_forward(x_sorted, offsets, w, c.activation)
    y, c_comb = experts.combine_forward(y_sorted, gates, c_disp)

    # 5. shared (always-on) experts, gated per token by sigmoid(x W_gate) with shared_gate
    c_shared = c_gate_proj = c_sgate = None
    if c.n_shared_experts:
        ys, c_shared = ffn_forward(c, x, p, pre + "shared.")
        if c.shared_gate:
            gate_logit, c_gate_proj = linear.linear_forward(x, p[pre + "shared_gate.w"])  # (N, 1)
            ys, c_sgate = gate.sigmoid_gate_forward(ys, gate_logit)
        y = y + ys

    entropy = -(probs * xp.log(xp.maximum(probs, 1e-30))).sum(axis=-1).mean()
    stats = {
        "tokens_per_expert": counts,  # (E,) assignments before drops
        "dropped_fraction": 1.0 - offsets[-1] / (N * K),
        "router_entropy": entropy,
        "aux_loss": aux,
        "z_loss": z,
        "expert_idx": idx,  # (N, K), for routing analysis
        "gates": gates,  # (N, K), the weights of those experts
    }
    share = 1.0
    if group is not None:
        aux, c_aux, z, share = global_balance(probs, idx, c_z, stats, offsets[-1], group)
        stats.update(aux_loss=aux, z_loss=z)
    cache = MoECache(
        router=c_router,
        noise_proj=c_wnoise,
        noise=c_noise,
        gate=c_gate,
        probs=c_probs,
        aux=c_aux,
        z=c_z,
        dispatch=c_disp,
        experts=c_exp,
        combine=c_comb,
        shared=c_shared,
        shape=(B, T, C),
        share=share,
        jitter=u,
        shared_gate_proj=c_gate_proj,
        shared_gate=c_sgate,
    )
    return y.reshape(B, T, C), cache, stats


def moe_backward(c: Config, dy, cache: MoECache, pre: str, grads: dict):
    """dy (B, T, C) -> dh (B, T, C); writes this layer's parameter gradients into grads.

    The router logits collect three gradients: from the gates (through combine), from the
    balancing loss (through P) and from the z-loss, each scaled by its coefficient.
    """
    B, T, C = cache.shape
    dy = dy.reshape(-1, C)

    # 5. shared experts (and their gate), then 4. combine -> experts -> dispatch
    dx = None
    if cache.shared is not None:
        dys = dy
        if cache.shared_gate is not None:
            dys, dz = gate.sigmoid_gate_backward(dy, cache.shared_gate)
            dxg, grads[pre + "shared_gate.w"], _ = linear.linear_backward(dz, cache.shared_gate_proj)
        dx = ffn_backward(c, dys, cache.shared, pre + "shared.", grads)
        if cache.shared_gate is not None:
            dx = dx + dxg
    dy_sorted, dgates = experts.combine_backward(dy, cache.combine)
    if isinstance(cache.experts, exchange.ExpertParallelCache):
        dx_sorted, dw = exchange.experts_parallel_backward(dy_sorted, cache.experts)
    else:
        dx_sorted, dw = experts.experts_backward(dy_sorted, cache.experts)
    for k, v in dw.items():
        grads[pre + "experts." + k] = v
    dx_disp = experts.dispatch_backward(dx_sorted, cache.dispatch)
    dx = dx_disp if dx is None else dx + dx_disp

    # 2. and 3. the selection logits: gates (scaled by routed_scaling_factor), balancing loss, z-loss
    if c.routed_scaling_factor != 1.0:
        dgates = dgates * c.routed_scaling_factor
    if c.router == "sigmoid_bias":
        dsel = router.sigmoid_bias_topk_backward(dgates, cache.gate)
    else:
        dsel = router.softmax_topk_backward(dgates, cache.gate)
    dprobs = balance.load_balancing_loss_backward(c.aux_loss_coef * cache.share, cache.aux)
    dsel += router.router_probs_backward(dprobs, cache.probs, c.router)
    dsel += balance.z_loss_backward(c.z_loss_coef * cache.share, cache.z)

    # 1. router logits (and the noise projection of the noisy router)
    dlogits, dnoise_logits = router.noisy_logits_backward(dsel, cache.noise)
    if cache.noise_proj is not None:
        if dnoise_logits is None:  # evaluation-mode forward: the noise branch was unused
            dnoise_logits = dlogits * 0
        dxn, grads[pre + "router.w_noise"], _ = linear.linear_backward(dnoise_logits, cache.noise_proj)
    dxr, grads[pre + "router.w"], dbr = linear.linear_backward(dlogits, cache.router)
    if dbr is not None:
        grads[pre + "router.b"] = dbr
    if cache.noise_proj is not None:
        dxr = dxr + dxn

    # 0. router jitter: x_route = x * u, and with scope "moe" the experts' input was x * u too
    if cache.jitter is not None:
        dxr = router.jitter_backward(dxr, cache.jitter)
        if c.jitter_scope == "moe":
            dx = router.jitter_backward(dx, cache.jitter)
    return (dx + dxr).reshape(B, T, C)


def dispatch(c: Config, x, idx):
    """x (N, C), idx (N, K) -> x_sorted, offsets (E+1,), counts (E,), cache: experts.dispatch_forward
    with GShard's per-group capacity (Lepikhin et al. 2020, sec. 2.2): the N tokens form
    G = c.capacity_groups contiguous groups of ceil(N/G) (the ranks of a data-parallel run are
    such groups), and each expert keeps at most ceil(cf * (N/G) * K / E) slots OF EACH GROUP.
    Done as one dispatch over E*G virtual experts (e, g) = e*G + g: sorted by expert, then by
    group, each (expert, group) keeping its first slots in the usual order."""
    xp = backend.xp_of(x)
    N, K = idx.shape
    E, G = c.n_experts, c.capacity_groups
    size = -(-N // G)  # tokens per group (the last may be smaller when G does not divide N)
    capacity = experts.capacity_for(size, K, E, c.capacity_factor)
    if G == 1:
        return experts.dispatch_forward(x, idx, E, capacity)
    group_of_token = xp.arange(N) // size
    x_sorted, offsets, counts, cache = experts.dispatch_forward(
        x, idx * G + group_of_token[:, None], E * G, capacity
    )
    return x_sorted, offsets[::G], counts.reshape(E, G).sum(axis=1), cache


def global_balance(probs, idx, c_z, stats: dict, kept: int, group):
    """The balancing loss, z-loss and routing statistics of the GLOBAL batch, from this rank's
    N tokens (every rank has N, so the batch has N_g = P N): one all-reduce of the local sums
        counts_e (E), sum_n probs[n, e] (E), sum_n lse_n^2, sum_n entropy_n, kept slots
    -> aux = E sum_e f_e P_e with f_e = counts_e / (N_g K), P_e = sum probs / N_g;  z = sum lse^2 / N_g.
    Returns aux, its cache, z and share = N / N_g. The gradient of the global loss with respect
    to this rank's probs is E f_e / N_g = share * (the one-process formula with the global f), and
    the z-loss's is share * the local one: moe_backward scales both by `share`. Writes the global
    counts, dropped fraction and entropy into stats (the DeepSeek bias update reads the counts)."""
    xp = backend.xp_of(probs)
    N, K = idx.shape
    E, P, dt = probs.shape[1], group.size, probs.dtype
    counts = xp.bincount(idx.reshape(-1), minlength=E)
    lse2 = (c_z.lse * c_z.lse).sum()
    scalars = xp.stack([lse2, stats["router_entropy"] * N, xp.asarray(kept, dtype=dt)])
    local = xp.concatenate([counts.astype(xp.float64), probs.sum(axis=0).astype(xp.float64), scalars])
    tot = group.allreduce_sum(local)
    Ng = N * P
    f = (tot[:E] / (Ng * K)).astype(dt)
    aux = E * (f * (tot[E : 2 * E] / Ng).astype(dt)).sum()
    stats.update(
        tokens_per_expert=xp.rint(tot[:E]).astype(counts.dtype),
        router_entropy=(tot[2 * E + 1] / Ng).astype(dt),
        dropped_fraction=1.0 - tot[2 * E + 2] / (Ng * K),
    )
    return aux, balance.LoadBalancingCache(f, N, E), (tot[2 * E] / Ng).astype(dt), 1.0 / P


def update_bias(c: Config, buffers: dict, pre: str, stats: dict):
    """DeepSeek-V3 auxiliary-loss-free balancing (DeepSeek-AI 2024, sec. 2.1.2): after each
    step, b_e -= gamma if expert e was overloaded (more than the mean N*K/E assignments) and
    b_e += gamma if underloaded. A plain update, outside the optimizer and its gradients."""
    if c.router != "sigmoid_bias":
        return
    xp = backend.xp_of(buffers[pre + "router_bias"])
    load = stats["tokens_per_expert"].astype(buffers[pre + "router_bias"].dtype)
    buffers[pre + "router_bias"] += c.bias_update_rate * xp.sign(load.mean() - load)
