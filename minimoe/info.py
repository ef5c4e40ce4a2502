"""What `minimoe info` reports about a preset or a checkpoint: its config, parameter and FLOP
counts (presets.count_params) and, for a checkpoint, how far its training got. As a dict (the
--json output) and as text.
"""

from __future__ import annotations

from minimoe.presets import count_params
from minimoe.rundir import best_checkpoint


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
