"""Reading what a router learned: which experts each token goes to, how evenly the experts are
loaded, and whether consecutive tokens stick to the same expert.

    routes = route_tokens(model, ids)          # one dict per MoE layer
    routes[0]["expert_idx"]                    # (T, K) chosen experts, first choice first
    expert_load(routes[0]["expert_idx"], E)    # (E,) fraction of assignments per expert
    consecutive_same_expert(routes[0]["expert_idx"], E)
    print(routing_table(tokens, routes))

Mixtral's paper (Jiang et al. 2024, sec. 5 "Routing analysis") measures how often token t and
token t-1 are routed alike, against what independent uniform routing would give:
  first choice: top-1 expert of t == top-1 expert of t-1;         random baseline 1/E
  any choice:   the K experts of t and of t-1 share at least one; random baseline
                1 - C(E-K, K) / C(E, K)  (the chance two random K-subsets of E are disjoint)
(for E = 8, K = 2: 12.5% and 46.4%). Rates well above the baseline mean the router follows
local structure (syntax, positions in words) more than topic.
"""

from __future__ import annotations

import math

import numpy as np

from minimoe import backend


def route_tokens(model, ids) -> list:
    """Run the model on a token sequence (eval mode) and collect each MoE layer's routing.

    ids: 1-D ids (any length: longer sequences are cut into windows of block_size, each
    routed on its own). Returns [{"layer": i, "expert_idx": (T, K) int, "gates": (T, K) float
    or None}, ...] for the MoE blocks i, as host arrays. The columns are in the router's order:
    the highest-scoring (first choice) expert first. "gates" is None when the model's stats do
    not record gate values.
    """
    c = model.config
    if c.n_experts == 0:
        raise ValueError(
            "this model is dense (n_experts = 0): it has no MoE layers whose routing could be shown"
        )
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("no tokens to route; pass a non-empty text")
    was_training = model.training
    model.eval()
    per_layer: dict = {}
    try:
        for start in range(0, ids.size, c.block_size):
            window = ids[start : start + c.block_size][None, :]  # (1, T)
            model.forward(window)  # host ids: range-checked on the host, moved once by the model
            for st in model.stats["layers"]:
                entry = per_layer.setdefault(st["layer"], {"idx": [], "gates": []})
                entry["idx"].append(backend.to_numpy(st["expert_idx"]))
                gates = st.get("gates")
                entry["gates"].append(None if gates is None else backend.to_numpy(gates))
    finally:
        if was_training:
            model.train()
    routes = []
    for layer, entry in sorted(per_layer.items()):
        gates = None if any(g is None for g in entry["gates"]) else np.concatenate(entry["gates"])
        routes.append(
            {"layer": layer, "expert_idx": np.concatenate(entry["idx"]).astype(np.int64), "gates": gates}
        )
    return routes


def expert_load(expert_idx, n_experts: int) -> np.ndarray:
    """(T, K) chosen experts -> (E,) fraction of the T*K assignments that went to each expert."""
    idx = np.asarray(expert_idx).reshape(-1)
    counts = np.bincount(idx, minlength=n_experts).astype(np.float64)
    return counts / max(idx.size, 1)


def same_expert_baselines(n_experts: int, k: int) -> dict:
    """Chance rates under independent uniform routing (see module docstring)."""
    disjoint = math.comb(n_experts - k, k) / math.comb(n_experts, k) if n_experts >= 2 * k else 0.0
    return {"first_choice": 1.0 / n_experts, "any_choice": 1.0 - disjoint}


def consecutive_same_expert(expert_idx, n_experts: int) -> dict:
    """How often token t is routed like token t-1, with the random-routing baselines.

    expert_idx (T, K), first choice in column 0. Returns first_choice and any_choice rates over
    the T-1 consecutive pairs, and baseline_first_choice / baseline_any_choice.
    """
    idx = np.asarray(expert_idx)
    T, K = idx.shape
    base = same_expert_baselines(n_experts, K)
    out = {
        "pairs": max(T - 1, 0),
        "baseline_first_choice": base["first_choice"],
        "baseline_any_choice": base["any_choice"],
    }
    if T < 2:
        out.update(first_choice=float("nan"), any_choice=float("nan"))
        return out
    first = idx[1:, 0] == idx[:-1, 0]
    # any shared expert: compare every choice of t with every choice of t-1, (T-1, K, K)
    shared = (idx[1:, :, None] == idx[:-1, None, :]).any(axis=(1, 2))
    out.update(first_choice=float(first.mean()), any_choice=float(shared.mean()))
    return out


def display_token(text: str) -> str:
    """A token's text made visible in one table cell: escapes for newlines/tabs, ␣ for spaces."""
    return repr(text)[1:-1].replace(" ", "␣") or "''"


def routing_table(tokens: list, routes: list, max_rows: int | None = None) -> str:
    """A text table: one row per token, one column per MoE layer, cells the chosen expert ids
    (first choice first)."""
    labels = [display_token(t) for t in tokens]
    T = len(labels)
    rows = T if max_rows is None else min(T, max_rows)
    tok_w = max([len("token")] + [len(s) for s in labels[:rows]])
    cells = [[",".join(str(int(e)) for e in r["expert_idx"][t]) for r in routes] for t in range(rows)]
    heads = [f"layer {r['layer']}" for r in routes]
    col_w = [max([len(h)] + [len(row[j]) for row in cells]) for j, h in enumerate(heads)]
    pos_w = max(3, len(str(T - 1)))
    lines = [f"{'pos':>{pos_w}}  {'token':<{tok_w}}  " + "  ".join(h.ljust(w) for h, w in zip(heads, col_w))]
    for t in range(rows):
        cols = "  ".join(c.ljust(w) for c, w in zip(cells[t], col_w))
        lines.append(f"{t:>{pos_w}}  {labels[t]:<{tok_w}}  {cols}".rstrip())
    if rows < T:
        lines.append(f"... ({T - rows} more tokens)")
    return "\n".join(lines)


def routing_summary(routes: list, n_experts: int) -> str:
    """Per layer: expert load (percent) and consecutive-token same-expert rates vs chance."""
    lines = []
    for r in routes:
        load = expert_load(r["expert_idx"], n_experts)
        rep = consecutive_same_expert(r["expert_idx"], n_experts)
        lines.append(
            f"layer {r['layer']}: load % [{' '.join(f'{100 * f:.0f}' for f in load)}]; consecutive tokens: "
            f"same first choice {100 * rep['first_choice']:.1f}% "
            f"(chance {100 * rep['baseline_first_choice']:.1f}%), "
            f"a shared expert {100 * rep['any_choice']:.1f}% (chance {100 * rep['baseline_any_choice']:.1f}%)"
        )
    return "\n".join(lines)


def routing_matrix(route: dict, n_experts: int) -> np.ndarray:
    """(T, E) weight of each expert for each token: the gate value where chosen (1 for every
    chosen expert when gates are unknown), 0 elsewhere."""
    idx = route["expert_idx"]
    T, K = idx.shape
    vals = route["gates"] if route.get("gates") is not None else np.ones((T, K))
    m = np.zeros((T, n_experts))
    np.add.at(
        m, (np.repeat(np.arange(T), K), idx.reshape(-1)), np.asarray(vals, dtype=np.float64).reshape(-1)
    )
    return m


def plot_routes(tokens: list, routes: list, n_experts: int, path) -> None:
    """Save a heat map (tokens down, experts across, one panel per MoE layer) to `path`.

    Needs matplotlib (ImportError otherwise); uses the non-interactive Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(tokens)
    L = len(routes)
    gated = all(r.get("gates") is not None for r in routes)
    fig, axes = plt.subplots(
        1, L, figsize=(1.2 + 0.35 * n_experts * L + 1.0, 1.5 + 0.22 * T), squeeze=False, sharey=True
    )
    im = None
    for ax, r in zip(axes[0], routes):
        im = ax.imshow(
            routing_matrix(r, n_experts),
            aspect="auto",
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
        )
        ax.set_title(f"layer {r['layer']}")
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_experts))
    axes[0][0].set_yticks(range(T))
    axes[0][0].set_yticklabels([display_token(t) for t in tokens], fontsize=7, family="monospace")
    axes[0][0].set_ylabel("token")
    fig.colorbar(im, ax=axes[0].tolist(), label="gate weight" if gated else "chosen")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
