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
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy

from minimoe import backend
from minimoe.config import Config
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
    jitter: Any = None  # (N, C) the router jitter u (training with router_jitter > 0), else None
    shared_gate_proj: Optional[tuple] = None  # linear cache of x W_gate (shared_gate), else None
    shared_gate: Optional[tuple] = None  # sigmoid-gate cache (shared_gate), else None


def moe_forward(c: Config, h, p: dict, buffers: dict, pre: str, rng, training: bool):
    """h (B, T, C) -> y (B, T, C), cache, stats (dict of per-layer routing statistics)."""
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

    # 4. dispatch -> experts -> combine
    capacity = experts.capacity_for(N, K, E, c.capacity_factor)
    x_sorted, offsets, counts, c_disp = experts.dispatch_forward(x, idx, E, capacity)
    w = {k: p[pre + "experts." + k] for k in ("w1", "w2", "w3") if pre + "experts." + k in p}
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
    dprobs = balance.load_balancing_loss_backward(c.aux_loss_coef, cache.aux)
    dsel += router.router_probs_backward(dprobs, cache.probs, c.router)
    dsel += balance.z_loss_backward(c.z_loss_coef, cache.z)

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


def update_bias(c: Config, buffers: dict, pre: str, stats: dict):
    """DeepSeek-V3 auxiliary-loss-free balancing (DeepSeek-AI 2024, sec. 2.1.2): after each
    step, b_e -= gamma if expert e was overloaded (more than the mean N*K/E assignments) and
    b_e += gamma if underloaded. A plain update, outside the optimizer and its gradients."""
    if c.router != "sigmoid_bias":
        return
    xp = backend.xp_of(buffers[pre + "router_bias"])
    load = stats["tokens_per_expert"].astype(buffers[pre + "router_bias"].dtype)
    buffers[pre + "router_bias"] += c.bias_update_rate * xp.sign(load.mean() - load)
