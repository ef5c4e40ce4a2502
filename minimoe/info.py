"""What `minimoe info` reports about a preset or a checkpoint: its config, parameter and FLOP
counts (presets.count_params) and, for a checkpoint, how far its training got; with
--expert-parallel P, the cost of training it on P devices (`expert_parallel_cost`). As a dict
(the --json output) and as text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from minimoe.config import Config
from minimoe.errors import OptionError
from minimoe.presets import count_params
from minimoe.rundir import best_checkpoint

__all__ = ["Config", "Hardware", "expert_parallel_cost", "format_cost", "format_info", "human", "info_dict"]


def human(n: float) -> str:
    """1.5e9 -> '1.5B', 12_900 -> '12.9k'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def info_dict(config, training=None) -> dict:
    """{name, config, total, active, flops_per_token, train_flops_per_token[, training]}."""
    d = {"name": config.name, "config": config.to_dict(), **count_params(config)}
    if training is not None:
        d["training"] = training
    return d


def training_summary(ckpt) -> dict:
    """How far the checkpoint's run got: steps, losses, tokens, wall time, data and tokenizer."""
    ts = ckpt.train_state
    opts = ts.get("options", {})
    best = best_checkpoint(ckpt)  # OUT/best.npz when it holds this run's best step (train --keep-best)
    return {
        "iterations": ts.get("iteration"),
        "max_iters": opts.get("max_iters"),
        "train_loss": ts.get("last_train_loss"),
        "val_loss": ts.get("last_val_loss"),
        "best_val_loss": ts.get("best_val_loss"),
        "best_step": ts.get("best_step"),
        "best_checkpoint": best and str(best),
        "tokens_seen": ts.get("tokens_seen"),
        "wall_time_s": ts.get("elapsed_s"),
        "data": opts.get("data"),
        "tokenizer": (ckpt.tokenizer or {}).get("type"),
        "backend": ts.get("backend"),
    }


def format_info(info: dict, from_preset: bool) -> str:
    """The text form of info_dict's result: the config one field a line, then the counts."""
    cfg = info["config"]
    counted_only = (
        "  (published full-size configuration: counted, never built)" if cfg.get("counted_only") else ""
    )
    lines = [f"{info['name'] or 'model'}{counted_only}"]
    width = max(len(k) for k in cfg)
    lines += [f"  {k:<{width}}  {v}" for k, v in cfg.items()]
    tot, act = info["total"], info["active"]
    lines.append(
        f"parameters: {tot:,} total ({human(tot)}), {act:,} active per token ({human(act)}, "
        f"{100 * act / tot:.1f}%)"
    )
    lines.append(
        f"FLOPs per token: {human(info['flops_per_token'])} forward, "
        f"{human(info['train_flops_per_token'])} training (3x forward) at context {cfg['block_size']}"
    )
    if from_preset and not cfg.get("counted_only"):
        lines.append(
            "(a toy preset's vocab_size is a placeholder: `minimoe train` takes it from the tokenizer)"
        )
    tr = info.get("training")
    if tr:

        def f(x, fmt="{:.4f}"):
            return "n/a" if x is None else fmt.format(x)

        lines.append(
            f"training: {tr['iterations']} of {tr['max_iters']} steps on {tr['data']!r} ({tr['tokenizer']} "
            f"tokenizer), {f(tr['tokens_seen'], '{:,}')} tokens seen, "
            f"wall time {f(tr['wall_time_s'], '{:.1f}')} s"
        )
        best = f"best val loss {f(tr['best_val_loss'])}"
        if tr.get("best_step") is not None:  # say where the best weights are, or that they are gone
            kept = (
                f"kept in {tr['best_checkpoint']}"
                if tr.get("best_checkpoint")
                else "weights not kept: --keep-best keeps them"
            )
            best += f" (step {tr['best_step']}, {kept})"
        lines.append(f"  last train loss {f(tr['train_loss'])}, last val loss {f(tr['val_loss'])}, {best}")
    return "\n".join(lines)


# ------------------------------------------------------------------------- expert parallelism
@dataclass
class Hardware:
    """Assumed speeds for the cost model (not measured: change them to your machine's).
    Defaults are of the class of an H100 cluster: 400 TFLOP/s achieved in bf16 matmuls
    (about 40% of the dense peak), NVLink-class links inside a node of 8 GPUs, one 400 Gb/s
    InfiniBand-class port per GPU between nodes."""

    tflops: float = 400.0  # achieved training TFLOP/s per device
    node_gbs: float = 450.0  # GB/s per device to the devices of its own node
    network_gbs: float = 50.0  # GB/s per device to other nodes
    devices_per_node: int = 8


def expert_parallel_cost(config, P: int, tokens: int, nbytes: int = 2, hw: Hardware | None = None) -> dict:
    """The cost of one training step with the experts of every MoE layer spread over P devices,
    each processing `tokens` tokens (T) per step, activations and gradients of `nbytes` bytes.

    E experts over P devices: E/P per device (P <= E), or each expert on P/E devices (P > E,
    replicas that share its tokens). Under uniform routing a token-slot's expert is on another
    device with probability (P-1)/P, and every MoE layer moves each slot's C activations there
    and back in the forward, and their gradients there and back in the backward:
        all-to-all bytes per device = 4 x L_moe x T x K x C x nbytes x (P-1)/P
    of which the fraction max(P - node, 0)/P crosses to other nodes. Against it, the compute:
        FLOPs per device = train_flops_per_token x T            (the work of T tokens)
    Both grow with T, so their ratio does not depend on it: FLOPs per byte sent is a property
    of the model (C, K, active parameters) and P. The gradient all-reduce (ring: 2(P-1)/P of the
    replicated parameters' bytes, once per step whatever T) is listed too.
    """
    c, hw = config, hw or Hardware()
    E, K, C = c.n_experts, c.top_k, c.n_embd
    if not E:
        raise OptionError("--expert-parallel needs a MoE model; this one is dense (n_experts = 0)")
    if P < 1 or (E % P and P % E):
        raise OptionError(
            f"--expert-parallel = {P} is invalid: it must divide the {E} experts, or be a multiple of {E}"
        )
    layers = sum(c.is_moe_block(i) for i in range(c.n_layer))
    counts = count_params(c)
    expert = (3 if c.activation == "swiglu" else 2) * C * c.expert_hidden
    routed = layers * E * expert  # every routed expert's weights
    per_device_experts = layers * expert * max(E // P, 1)
    remote, off_node = (P - 1) / P, max(P - hw.devices_per_node, 0) / P
    a2a = 4 * layers * tokens * K * C * nbytes * remote
    a2a_node = a2a * (remote - off_node) / remote if remote else 0.0
    a2a_net = a2a - a2a_node
    flops = counts["train_flops_per_token"] * tokens
    t_compute = flops / (hw.tflops * 1e12)
    t_a2a = a2a_node / (hw.node_gbs * 1e9) + a2a_net / (hw.network_gbs * 1e9)
    replicas = max(P // E, 1)
    grad = (
        2 * (P - 1) / P * (counts["total"] - routed) * nbytes
        + 2 * (replicas - 1) / replicas * per_device_experts * nbytes
    )
    link = hw.network_gbs if P > hw.devices_per_node else hw.node_gbs
    return {
        "devices": P,
        "experts": E,
        "experts_per_device": E / P,
        "tokens_per_device": tokens,
        "moe_layers": layers,
        "bytes_per_value": nbytes,
        "hardware": asdict(hw),
        "train_flops_per_device": flops,
        "compute_s": t_compute,
        "all_to_all_bytes_per_device": a2a,
        "all_to_all_bytes_between_nodes": a2a_net,
        "all_to_all_s": t_a2a,
        "all_to_all_over_compute": t_a2a / t_compute,
        "flops_per_all_to_all_byte": flops / a2a if a2a else float("inf"),
        "network_limits_below_gbs": a2a / t_compute / 1e9,  # GB/s that just hides the all-to-all
        "grad_allreduce_bytes_per_device": grad,
        "grad_allreduce_s": grad / (link * 1e9),
        "expert_params_per_device": per_device_experts,
        "params_per_device": counts["total"] - routed + per_device_experts,
    }


def si(n: float, unit: str) -> str:
    """5.24e14, "FLOP" -> '524 TFLOP'; 7.5e9, "B" -> '7.5 GB'."""
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


def format_cost(d: dict) -> str:
    """expert_parallel_cost's dict as the lines `minimoe info --expert-parallel` prints."""
    hw, P, T = d["hardware"], d["devices"], d["tokens_per_device"]
    n = d["experts_per_device"]
    per = f"{n:g} of the {d['experts']} experts of each MoE layer per device"
    if n < 1:
        per = (
            f"1 of the {d['experts']} experts of each MoE layer per device, each expert on {1 / n:g} devices"
        )
    net = d["all_to_all_bytes_between_nodes"]
    limit = "the all-to-all (the network) limits" if d["all_to_all_over_compute"] > 1 else "the matmuls limit"
    return "\n".join(
        [
            f"expert parallel over {P} devices ({per}, {human(d['params_per_device'])} "
            f"parameters each), {T:,} tokens per device per step, {d['bytes_per_value']}-byte activations:",
            f"  compute     {si(d['train_flops_per_device'], 'FLOP')} per device per step "
            f"-> {d['compute_s'] * 1e3:,.1f} ms at {hw['tflops']:g} TFLOP/s",
            f"  all-to-all  4 x {d['moe_layers']} MoE layers x T x K x C x {d['bytes_per_value']} B x {P - 1}/{P} = "
            f"{si(d['all_to_all_bytes_per_device'], 'B')} per device per step ({si(net, 'B')} of it between nodes) "
            f"-> {d['all_to_all_s'] * 1e3:,.1f} ms at {hw['node_gbs']:g} GB/s in a node of {hw['devices_per_node']}, "
            f"{hw['network_gbs']:g} GB/s between nodes",
            f"  all-to-all / compute = {d['all_to_all_over_compute']:.2f}: {limit} (if not overlapped); "
            f"{d['flops_per_all_to_all_byte']:,.0f} FLOPs per byte sent, whatever T: the network keeps up "
            f"above {d['network_limits_below_gbs']:,.1f} GB/s per device",
            f"  gradient all-reduce {si(d['grad_allreduce_bytes_per_device'], 'B')} per device per step, "
            f"whatever T -> {d['grad_allreduce_s'] * 1e3:,.1f} ms",
            "  (assumed speeds, not measured: --tflops, --node-gbs, --network-gbs, --devices-per-node)",
        ]
    )
