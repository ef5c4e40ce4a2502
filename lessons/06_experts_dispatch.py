# %% [markdown]
# # Lesson 06 — Experts, dispatch and combine
#
# The router (Lesson 05) gave every token $n$ a list of $K$ experts `idx[n]` and gate values
# `gates[n]`. Now the layer must actually compute
#
# $$y_n = \sum_{k=1}^{K} g_{n,k}\, \mathrm{Expert}_{\mathrm{idx}[n,k]}(x_n)$$
#
# for all $N$ tokens at once, fast, with each expert doing **one dense matrix multiply** over the tokens
# it received. This lesson builds the data movement that makes that possible — *dispatch* (tokens to
# experts) and *combine* (results back to tokens) — by sorting, and then looks at *capacity*: what
# happens when an expert is offered more tokens than it accepts.
#
# Shapes: N tokens, C channels, E experts, K experts per token, F expert hidden size, M slots kept.

# %%
import time
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np

from minimoe.backend import topk_indices
from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference
from minimoe.ops import experts, ffn

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## Experts as stacked weights
#
# Each expert is a SwiGLU feed-forward network (Shazeer 2020), the one Mixtral uses:
#
# $$\mathrm{Expert}_e(x) = \big(\mathrm{SiLU}(x W_1^{(e)}) \odot x W_3^{(e)}\big) W_2^{(e)},
#   \qquad W_1^{(e)}, W_3^{(e)} \in \mathbb{R}^{C \times F},\ W_2^{(e)} \in \mathbb{R}^{F \times C}.$$
#
# We store the $E$ experts' matrices *stacked*: `w1` and `w3` of shape (E, C, F), `w2` of shape
# (E, F, C). Expert $e$ is simply `w1[e], w3[e], w2[e]`.
#
# Here is the layer written the obvious way — a loop over tokens and their choices. It is our
# ground truth: slow, but impossible to misread. (Ignore `capacity` for now; it is explained below.)


# %%
def expert_ffn(x, w, e):
    """x (n, C) -> (n, C): expert e's SwiGLU FFN."""
    return ffn.swiglu_mlp_forward(x, w["w1"][e], w["w3"][e], w["w2"][e])[0]


def moe_loop(x, gates, idx, w, capacity=None):
    """x (N, C), gates (N, K), idx (N, K) -> y (N, C), one (token, choice) at a time."""
    N, K = idx.shape
    E = w["w1"].shape[0]
    y = np.zeros_like(x)
    used = np.zeros(E, dtype=int)  # slots each expert has accepted so far
    for k in range(K):  # all first choices before all second choices ...
        for n in range(N):  # ... and, within a choice rank, earlier tokens first
            e = idx[n, k]
            if capacity is not None and used[e] >= capacity:
                continue  # the expert is full: this (token, choice) is dropped
            used[e] += 1
            y[n] += gates[n, k] * expert_ffn(x[n : n + 1], w, e)[0]
    return y


rng = np.random.default_rng(0)
N, C, E, K, F = 12, 4, 4, 2, 8
x = rng.standard_normal((N, C))
idx = topk_indices(rng.standard_normal((N, E)), K)  # (N, K) distinct experts per token
gates = rng.uniform(0.2, 0.8, size=(N, K))
w = {
    "w1": rng.standard_normal((E, C, F)) * 0.5,
    "w3": rng.standard_normal((E, C, F)) * 0.5,
    "w2": rng.standard_normal((E, F, C)) * 0.5,
}
y_loop = moe_loop(x, gates, idx, w)
print("idx (first choice first):\n", idx.T)

# %% [markdown]
# ## Dispatch by sorting: the names
#
# Every name the exercise uses, on the example above ($N = 12$ tokens, $K = 2$ choices, $E = 4$
# experts, $C = 4$ channels):
#
# | name | shape | meaning |
# |---|---|---|
# | slot $s$ | | one (token $n$, choice $k$) pair, numbered $s = kN + n$ ("choice-rank major": all first choices, then all second choices); $NK$ slots |
# | `expert_of_slot` | $(NK,)$ | the expert of every slot: `idx.T.reshape(-1)` |
# | `counts` | $(E,)$ int | how many slots chose each expert, **before** any drop: `np.bincount(expert_of_slot, minlength=E)` |
# | `capacity` | int or `None` | the most slots an expert accepts; `None`: no limit ("dropless") |
# | `kept` | $(E,)$ int | slots each expert keeps: `counts`, or `np.minimum(counts, capacity)` |
# | `M` | int | the number of kept slots, `kept.sum()` ($= NK$ when dropless) |
# | `order` | $(M,)$ int | the kept slots, grouped by expert (expert 0's first, in slot order) |
# | `offsets` | $E + 1$ ints | `offsets[0] = 0`, `offsets[e + 1] = offsets[e] + kept[e]`: expert $e$'s rows are `offsets[e]:offsets[e+1]` |
# | `x_sorted` | $(M, C)$ | every expert's input, one row per kept slot: `x[order % N]` (slot $s$ belongs to token $s \bmod N$) |
# | `slot_pos` | $(N, K)$ int | the row of `x_sorted` that holds token $n$'s choice $k$, or $M$ when that slot was dropped |
#
# **Dispatch.**
#
# 1. A **stable** `argsort` of `expert_of_slot` (`kind="stable"`) is a permutation of the $NK$ slots
#    that groups them by expert and keeps the slot order inside each group.
# 2. Keep each expert's first `capacity` slots (see *Capacity* below): that is `order`.
# 3. `x_sorted = x[order % N]`: one gather builds every expert's input, and expert $e$ runs one dense
#    matmul on rows `offsets[e]:offsets[e+1]` (`minimoe.ops.experts.experts_forward`).
# 4. `slot_pos` is the **inverse** permutation: `slot_pos[s] = i` when `order[i] = s`, i.e.
#    `slot_pos[order] = np.arange(M)` on a flat array of $NK$ entries that starts full of $M$; then
#    reshape it to $(K, N)$ (slot $s = kN + n$) and transpose to $(N, K)$.
#
# **Combine** is $K$ gathers: $y_n = \sum_k g_{n,k}\, y_\text{sorted}[\text{slot\_pos}[n,k]]$, where a
# dropped slot reads row $M$ of `y_sorted` with one extra **row of zeros** appended (so it adds
# nothing). Only `combine` pads; `x_sorted` itself has exactly $M$ rows.
#
# Why not the alternatives?
#
# - **One-hot matmuls** (GShard, Lepikhin et al. 2020; the Mesh-TensorFlow Switch code): build a 0/1
#   dispatch tensor of shape (N, E, capacity) and contract it with $x$ (an `einsum`, i.e. a matmul).
#   It costs $N \cdot E \cdot \text{capacity} \cdot C \approx N^2 K C$ multiply-adds — quadratic in the
#   batch, almost all of them by zero — and as much memory.
# - **Scatter-add** (`np.add.at`) to combine: in NumPy it is an unbuffered, slow loop; on a GPU it needs
#   atomic adds, whose summation order (and so the float result) changes from run to run.
#
# Sorting costs $O(NK \log NK)$ on tiny integers, makes every expert's input contiguous (what grouped
# GEMM kernels such as MegaBlocks, Gale et al. 2023, also want), and both directions are plain
# gathers: deterministic, and no scatter-add anywhere, not even in the backward pass — because a
# permutation's transpose is its inverse.
#
# ## Capacity
#
# Switch (Fedus et al. 2021, eq. 3) gives each expert a fixed budget of
# $\text{capacity} = \lceil \text{capacity\_factor} \cdot N K / E \rceil$ slots (static shapes for
# accelerators). An expert offered more keeps the first `capacity` slots of its group and **drops** the
# rest. With our numbering and a stable sort, "first" means: **first choices win over second choices,
# and among equals the earlier token wins** — exactly the loop order of `moe_loop` above. A dropped
# slot contributes nothing; a token whose every slot is dropped gets $y_n = 0$, so the block's residual
# connection $h + \mathrm{MoE}(h)$ passes it through unchanged.
#
# Finding the kept slots after the sort: entry $i$ of the sorted permutation belongs to expert
# $e$ = `expert_of_slot[sorted[i]]`, whose group starts at `starts[e]` $=$ `cumsum(counts)[e] - counts[e]`;
# its rank in the group is $i - $ `starts[e]`; keep it when the rank is below the capacity.
#
# ## The backward
#
# By the chain rule, one gather at a time:
#
# - dispatch is a gather, $x_\text{sorted}[i] = x[\text{order}[i] \bmod N]$, so $dx_n$ **sums** the
#   gradients of token $n$'s kept slots: $dx_n = \sum_k dx_\text{sorted}[\text{slot\_pos}[n,k]]$, with
#   the zero row again for dropped slots;
# - combine gives $dy_\text{sorted}[\text{slot\_pos}[n,k]] = g_{n,k}\, dy_n$ and
#   $dg_{n,k} = \langle dy_n, y_\text{sorted}[\text{slot\_pos}[n,k]] \rangle$ (zero when dropped). Since
#   every kept slot occurs exactly once, the "scatter" into `dy_sorted` is a plain assignment.
#
# **Your turn**: four functions. The cache that dispatch passes on is a `Routing` (below): `order`,
# `slot_pos` and `M`; `combine_forward`'s cache is the tuple `(y_sorted, gates, routing)`.


# %%
class Routing(NamedTuple):
    """What dispatch passes on to combine and to the backward passes."""

    order: np.ndarray  # (M,) kept slots, grouped by expert
    slot_pos: np.ndarray  # (N, K) row of x_sorted for token n's choice k; M when dropped
    M: int  # number of kept slots


# %%
def dispatch_forward(x, idx, E, capacity=None):
    """x (N, C), idx (N, K) -> x_sorted (M, C), offsets (E+1 ints), counts (E,), Routing."""
    ### BEGIN SOLUTION
    N, K = idx.shape
    expert_of_slot = idx.T.reshape(-1)  # (N*K,) slot s = k*N + n
    order = np.argsort(expert_of_slot, kind="stable")  # slots grouped by expert, slot order kept
    counts = np.bincount(expert_of_slot, minlength=E)  # (E,) assignments before any drop
    kept = counts
    if capacity is not None:
        starts = np.cumsum(counts) - counts  # where each expert's group starts in `order`
        rank = np.arange(N * K) - starts[expert_of_slot[order]]  # rank within the group
        order = order[rank < capacity]  # each expert keeps its first `capacity` slots
        kept = np.minimum(counts, capacity)
    M = len(order)
    slot_pos = np.full(N * K, M)  # the inverse permutation; M (a zero row) for dropped slots
    slot_pos[order] = np.arange(M)
    x_sorted = x[order % N]  # slot s belongs to token s % N
    offsets = [0] + np.cumsum(kept).tolist()
    return x_sorted, offsets, counts, Routing(order, slot_pos.reshape(K, N).T, M)
    ### END SOLUTION


# %%
def dispatch_backward(dx_sorted, routing):
    """dx_sorted (M, C) -> dx (N, C)."""
    ### BEGIN SOLUTION
    padded = np.concatenate([dx_sorted, np.zeros((1, dx_sorted.shape[1]))])  # row M: dropped slots
    return padded[routing.slot_pos].sum(axis=1)  # (N, K, C) -> (N, C): sum over a token's choices
    ### END SOLUTION


# %%
def combine_forward(y_sorted, gates, routing):
    """y_sorted (M, C), gates (N, K) -> y (N, C), cache = (y_sorted, gates, routing)."""
    ### BEGIN SOLUTION
    padded = np.concatenate([y_sorted, np.zeros((1, y_sorted.shape[1]))])  # a dropped slot reads 0
    picked = padded[routing.slot_pos]  # (N, K, C): each token's expert outputs, by choice rank
    y = (gates[:, :, None] * picked).sum(axis=1)
    return y, (y_sorted, gates, routing)
    ### END SOLUTION


# %%
def combine_backward(dy, cache):
    """dy (N, C) -> dy_sorted (M, C), dgates (N, K)."""
    ### BEGIN SOLUTION
    y_sorted, gates, routing = cache
    C = dy.shape[1]
    padded = np.concatenate([y_sorted, np.zeros((1, C))])
    dgates = (dy[:, None, :] * padded[routing.slot_pos]).sum(axis=-1)  # (N, K); 0 for dropped slots
    dy_sorted = np.zeros((routing.M + 1, C))
    dy_sorted[routing.slot_pos.reshape(-1)] = (gates[:, :, None] * dy[:, None, :]).reshape(-1, C)
    return dy_sorted[: routing.M], dgates  # row M collected the dropped slots: discard it
    ### END SOLUTION


# %% [markdown]
# **Checks.** Each function is checked on its own, with inputs and expected values computed by
# `minimoe.ops.experts` (stored in `06_experts_dispatch.npz`), for five cases: the example above
# dropless and at capacity factors 1.0 and 0.5, a larger batch of 40 tokens at factor 1.0, and the
# worst case of the next section (every token picks experts 0 and 1; capacity 2). The combine and
# backward checks build their `Routing` from the reference values, so each function earns its points
# even if another one is still wrong.

# %%
CASES = ("dropless", "factor 1.0", "factor 0.5", "40 tokens factor 1.0", "all pick 0 and 1 capacity 2")


def case_inputs(i):
    """The case's tokens x, choices idx, gates, number of experts E and capacity (None: dropless)."""
    cap = int(reference("06", f"c{i}_capacity"))
    return (reference("06", f"c{i}_x"), reference("06", f"c{i}_idx"), reference("06", f"c{i}_gates"),
            int(reference("06", f"c{i}_E")), None if cap < 0 else cap)  # fmt: skip


def reference_routing(i):
    return Routing(
        reference("06", f"c{i}_order"), reference("06", f"c{i}_slot_pos"), int(reference("06", f"c{i}_M"))
    )


# %% check id=dispatch_forward points=3
FN = "dispatch_forward"
for i, name in enumerate(CASES):
    cx, cidx, _, E_, cap = case_inputs(i)
    (N_, C_), M_ = cx.shape, int(reference("06", f"c{i}_M"))
    CASE = f"{name} (N={N_} K={cidx.shape[1]} E={E_} capacity={cap})"
    with case(FN, CASE):
        x_sorted, offsets, counts, routing = dispatch_forward(cx, cidx, E_, cap)
        order, slot_pos, M = routing
    check_shape(FN, CASE, "counts", counts, (E_,), "iu")
    check_close(FN, CASE, "counts (before drops)", counts, reference("06", f"c{i}_counts"), 0)
    check_shape(FN, CASE, "offsets", np.asarray(offsets), (E_ + 1,), "iu")
    check_close(FN, CASE, "offsets", np.asarray(offsets), reference("06", f"c{i}_offsets"), 0)
    check_close(FN, CASE, "M", np.asarray(M), np.asarray(M_), 0)
    check_shape(FN, CASE, "x_sorted", x_sorted, (M_, C_), "f")
    check_close(FN, CASE, "order", order, reference("06", f"c{i}_order"), 0)
    check_close(FN, CASE, "x_sorted", x_sorted, reference("06", f"c{i}_x_sorted"), 0)
    check_close(FN, CASE, "slot_pos", slot_pos, reference("06", f"c{i}_slot_pos"), 0)
print("dispatch_forward is correct")

# %% check id=dispatch_backward points=2
FN = "dispatch_backward"


def check_dispatch_backward(i, name):
    cx, cidx, _, E_, cap = case_inputs(i)
    routing, dx_sorted = reference_routing(i), reference("06", f"c{i}_dx_sorted")
    CASE = f"{name} (N={cx.shape[0]} K={cidx.shape[1]} E={E_} capacity={cap})"
    with case(FN, CASE):
        dx = dispatch_backward(dx_sorted, routing)
    check_shape(FN, CASE, "dx", dx, cx.shape, "f")
    # dispatch is the gather x_sorted = x[order % N]: check the gradient of sum(x_sorted * dx_sorted)
    loss = lambda: float((cx[routing.order % len(cx)] * dx_sorted).sum())
    check_gradient(FN, CASE, loss, cx, dx, 1e-6, name="dx")
    check_close(FN, CASE, "dx", dx, reference("06", f"c{i}_dx"), 1e-12)


for i, name in enumerate(CASES):
    check_dispatch_backward(i, name)
print("dispatch_backward is correct")

# %% check id=combine_forward points=2
FN = "combine_forward"
for i, name in enumerate(CASES):
    cx, cidx, cgates, E_, cap = case_inputs(i)
    routing, y_sorted = reference_routing(i), reference("06", f"c{i}_y_sorted")
    CASE = f"{name} (N={cx.shape[0]} K={cidx.shape[1]} E={E_} capacity={cap})"
    with case(FN, CASE):
        y, _ = combine_forward(y_sorted, cgates, routing)
    check_shape(FN, CASE, "y", y, cx.shape, "f")
    check_close(FN, CASE, "y", y, reference("06", f"c{i}_y"), 1e-12)
print("combine_forward is correct")

# %% check id=combine_backward points=2
FN = "combine_backward"


def check_combine_backward(i, name):
    cx, cidx, cgates, E_, cap = case_inputs(i)
    routing, y_sorted, dy = (
        reference_routing(i),
        reference("06", f"c{i}_y_sorted"),
        reference("06", f"c{i}_dy"),
    )
    CASE = f"{name} (N={cx.shape[0]} K={cidx.shape[1]} E={E_} capacity={cap})"
    with case(FN, CASE):
        dy_sorted, dgates = combine_backward(dy, (y_sorted, cgates, routing))
    check_shape(FN, CASE, "dy_sorted", dy_sorted, y_sorted.shape, "f")
    check_shape(FN, CASE, "dgates", dgates, cgates.shape, "f")
    loss = lambda: float((combine_forward(y_sorted, cgates, routing)[0] * dy).sum())
    check_gradient(FN, CASE, loss, y_sorted, dy_sorted, 1e-6, name="dy_sorted")
    check_gradient(FN, CASE, loss, cgates, dgates, 1e-6, name="dgates")
    check_close(FN, CASE, "dy_sorted", dy_sorted, reference("06", f"c{i}_dy_sorted"), 1e-12)
    check_close(FN, CASE, "dgates", dgates, reference("06", f"c{i}_dgates"), 1e-12)


for i, name in enumerate(CASES):
    check_combine_backward(i, name)
print("combine_backward is correct")

# %% [markdown]
# **The whole layer.** Your dispatch, the package's experts, your combine: the output must equal the
# token loop `moe_loop` at every capacity, and a float64 gradient check of the whole layer with respect
# to $x$ and the gates must pass.


# %%
def layer_forward(x, gates, idx, w, capacity):
    """The MoE layer (N, C) -> (N, C) from your dispatch and combine and the reference experts."""
    x_sorted, offsets, counts, routing = dispatch_forward(x, idx, w["w1"].shape[0], capacity)
    y_sorted, ecache = experts.experts_forward(x_sorted, offsets, w)
    y, ccache = combine_forward(y_sorted, gates, routing)
    return y, (routing, ecache, ccache)


def layer_backward(dy, cache):
    """dy (N, C) -> dx (N, C), dgates (N, K)."""
    routing, ecache, ccache = cache
    dy_sorted, dgates = combine_backward(dy, ccache)
    dx_sorted, _ = experts.experts_backward(dy_sorted, ecache)
    return dispatch_backward(dx_sorted, routing), dgates


# %% check id=moe_layer points=1
FN = "layer_forward and layer_backward (your dispatch and combine)"


def check_moe_layer(cap):
    CASE = f"N={N} K={K} E={E} capacity={cap}"
    dy = np.random.default_rng(3).standard_normal((N, C))
    with case(FN, CASE):
        y, cache = layer_forward(x, gates, idx, w, cap)
        dx, dg = layer_backward(dy, cache)
    check_close(FN, CASE, "y (vs the token loop)", y, moe_loop(x, gates, idx, w, cap), 1e-12)
    loss = lambda: float((layer_forward(x, gates, idx, w, cap)[0] * dy).sum())
    check_gradient(FN, CASE, loss, x, dx, 1e-6, name="dx")
    check_gradient(FN, CASE, loss, gates, dg, 1e-6, name="dgates")
    print(f"capacity {cap}: kept {cache[0].M}/{N * K} slots, output and gradients OK")


for cf in (0.0, 1.0, 0.5):  # dropless, and two capacities that drop
    check_moe_layer(experts.capacity_for(N, K, E, cf))
print("dispatch/combine: OK")

# %% [markdown]
# ## The drop order, and dropped tokens
#
# A small worst case: every token wants experts 0 and 1, and the capacity is 2. Expert 0 keeps the
# first choices of tokens 0 and 1; expert 1 keeps their second choices; tokens 2–5 lose **both**
# slots. Their MoE output is exactly zero, so after the residual connection they leave the block
# unchanged.

# %%
idx_all = np.tile([0, 1], (6, 1))  # (6, 2): everyone picks experts 0 and 1
h = rng.standard_normal((6, C))
g = np.full((6, 2), 0.5)


def reference_layer(x, gates, idx, w, capacity):
    """The same layer from minimoe.ops.experts alone (so later cells run even before you finish)."""
    x_sorted, offsets, counts, dcache = experts.dispatch_forward(x, idx, w["w1"].shape[0], capacity)
    y_sorted, _ = experts.experts_forward(x_sorted, offsets, w)
    return experts.combine_forward(y_sorted, gates, dcache)[0], offsets, counts


moe_out, offs, counts = reference_layer(h, g, idx_all, w, capacity=2)
kept = np.zeros((6, 2), dtype=int)  # which (token, choice) survived: replay the drop order
used = np.zeros(E, dtype=int)
for k in range(2):
    for n in range(6):
        kept[n, k] = used[idx_all[n, k]] < 2
        used[idx_all[n, k]] += kept[n, k]
print("assignments per expert before drops:", counts, "  kept slots:", offs[-1], "of", 12)
print("kept (token x choice):\n", kept)
out = h + moe_out  # residual + MoE
assert np.array_equal(out[2:], h[2:])  # fully dropped tokens: passed through by the residual
print("tokens 2..5 unchanged by the block:", np.array_equal(out[2:], h[2:]))

# %% [markdown]
# Dropping has a price beyond the lost computation: a token's output now depends on the **other
# tokens of the batch**. Worse for a language model: a *later* token's first choice outranks an
# *earlier* token's second choice, so in training an early position can be affected by a future one.
# minimoe's default is therefore dropless (`capacity_factor = 0`), as in Mixtral and MegaBlocks; the
# Switch preset uses a capacity factor of 1.25.
#
# ## Tokens per expert and drops vs capacity factor
#
# A router is rarely balanced. Below, 512 tokens choose $K=2$ of 8 experts from random logits, once
# balanced and once with a popularity skew added to the logits. Left: the load per expert against the
# capacity lines; right: the fraction of slots dropped as the capacity factor grows.

# %%
rng = np.random.default_rng(1)
N2, E2, K2 = 512, 8, 2
x2 = rng.standard_normal((N2, 4))
routings = {
    "balanced": topk_indices(rng.standard_normal((N2, E2)), K2),
    "skewed": topk_indices(rng.standard_normal((N2, E2)) + np.linspace(1.0, -1.0, E2), K2),
}
factors = np.linspace(0.25, 3.0, 45)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
counts_skew = np.bincount(routings["skewed"].reshape(-1), minlength=E2)
counts_bal = np.bincount(routings["balanced"].reshape(-1), minlength=E2)
axes[0].bar(np.arange(E2), counts_skew, color="tab:orange", label="skewed router")
axes[0].bar(np.arange(E2), counts_bal, fill=False, edgecolor="tab:blue", label="balanced router")
for cf, ls in ((1.0, "-"), (1.25, "--"), (2.0, ":")):
    cap = experts.capacity_for(N2, K2, E2, cf)
    axes[0].axhline(cap, color="k", ls=ls, lw=1, label=f"capacity, factor {cf}")
axes[0].set_xlabel("expert")
axes[0].set_ylabel("assignments (of N·K = 1024)")
axes[0].legend(fontsize=8)
for name, r in routings.items():
    caps = [experts.capacity_for(N2, K2, E2, cf) for cf in factors]
    kept = [experts.dispatch_forward(x2, r, E2, cap)[1][-1] for cap in caps]  # offsets[-1] = slots kept
    dropped = 1 - np.array(kept) / (N2 * K2)
    axes[1].plot(factors, dropped, label=name)
axes[1].set_xlabel("capacity factor")
axes[1].set_ylabel("fraction of slots dropped")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Even the balanced router drops a few percent at factor 1.0 (random fluctuations overflow some
# experts), and the skewed one needs a factor near $\max_e \text{load}_e / \text{mean load}$ before it
# stops dropping. That is one reason balancing the router (Lesson 07) matters.
#
# ## Why not one-hot matmuls or scatter-add: a rough timing
#
# The three ways of building every expert's input and combining the results, on 2048 tokens. (Timings
# vary with the machine; they are printed, never asserted.)

# %%
rng = np.random.default_rng(2)
N3, C3, E3, K3 = 2048, 64, 8, 2
x3 = rng.standard_normal((N3, C3)).astype(np.float32)
idx3 = topk_indices(rng.standard_normal((N3, E3)), K3)
g3 = rng.uniform(size=(N3, K3)).astype(np.float32)
cap3 = experts.capacity_for(N3, K3, E3, 2.0)  # large enough that nothing is dropped here


def timed(f, reps=3):
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def one_hot_way():  # GShard-style dispatch tensor D (N, E, capacity) and two matmuls
    rank = np.zeros((N3, K3), dtype=int)
    used = np.zeros(E3, dtype=int)
    for k in range(K3):  # positions inside each expert's buffer, in the same drop order
        for e in range(E3):
            m = idx3[:, k] == e
            rank[m, k] = used[e] + np.arange(m.sum())
            used[e] += m.sum()
    D = np.zeros((N3, E3, cap3), dtype=np.float32)
    for k in range(K3):
        D[np.arange(N3), idx3[:, k], rank[:, k]] = 1.0
    x_e = D.reshape(N3, -1).T @ x3  # (E*capacity, C) expert inputs: a matmul, mostly with zeros
    G = np.zeros_like(D)  # combine weights: the gate in place of the 1
    for k in range(K3):
        G[np.arange(N3), idx3[:, k], rank[:, k]] = g3[:, k]
    return G.reshape(N3, -1) @ x_e  # (N, C); pretend the experts are identities


def add_at_way():  # boolean masks per expert, then np.add.at to combine
    y = np.zeros_like(x3)
    for e in range(E3):
        n, k = np.nonzero(idx3 == e)
        np.add.at(y, n, g3[n, k][:, None] * x3[n])
    return y


def sort_way():
    xs, offs, _, cache = experts.dispatch_forward(x3, idx3, E3)
    return experts.combine_forward(xs, g3, cache)[0]


assert np.allclose(one_hot_way(), sort_way(), atol=1e-4) and np.allclose(add_at_way(), sort_way(), atol=1e-4)
ways = {"one-hot matmuls": one_hot_way, "masks + np.add.at": add_at_way, "sort + gather": sort_way}
for name, f in ways.items():
    print(f"{name:18s} {timed(f):8.2f} ms")
print(f"(the one-hot dispatch tensor alone holds {N3 * E3 * cap3:,} numbers for {N3 * C3:,} inputs)")

# %% [markdown]
# ## Summary
#
# - Experts are stacked weights (E, C, F); each runs one dense matmul on a contiguous slice.
# - Dispatch = a stable sort of the slots by expert (a permutation); combine = its inverse, as $K$
#   gathers. No one-hot matmuls, no scatter-add, in either direction.
# - A capacity keeps the first slots of each expert in a documented order (first choices, then earlier
#   tokens); dropped slots contribute zero and dropped tokens ride the residual stream.
#
# ## Exercises
#
# 1. *Batch Prioritized Routing* (Riquelme et al. 2021, V-MoE): when dropping, let slots with larger
#    gates win. Change the key of the sort (hint: sort by expert, then by $-$gate, with `np.lexsort`) and
#    compare, at capacity factor 1.0 on the skewed router, the fraction of **gate mass** dropped.
# 2. Using `layer_backward`, show that the gradient with respect to the gate of a dropped slot is exactly
#    zero. What does that mean for the router's learning signal on overflowing experts?
# 3. Count the multiply-adds of the one-hot dispatch einsum and of the sorted gather for $N$ tokens, and
#    find the $N$ at which the one-hot way costs more than the experts' own matmuls ($\approx 6 N K C F$).
# 4. *Expert choice* routing (Zhou et al. 2022) lets each expert pick its top-capacity tokens instead
#    (an argsort over the token axis). Implement it with these dispatch pieces, and explain why it
#    cannot be used as is for causal generation: what does token $t$'s routing depend on?


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe.ops.experts (run at build time)."""
    import numpy as np

    from minimoe.backend import topk_indices
    from minimoe.ops import experts

    rng = np.random.default_rng(6)
    out = {}
    cases = []
    x12, idx12 = rng.standard_normal((12, 4)), topk_indices(rng.standard_normal((12, 4)), 2)
    g12 = rng.uniform(0.2, 0.8, (12, 2))
    for cf in (0.0, 1.0, 0.5):
        cases.append((x12, idx12, g12, 4, experts.capacity_for(12, 2, 4, cf)))
    x40 = rng.standard_normal((40, 3))
    idx40 = topk_indices(rng.standard_normal((40, 4)) + np.array([1.0, 0.5, 0.0, -0.5]), 2)  # skewed
    cases.append((x40, idx40, rng.uniform(0.2, 0.8, (40, 2)), 4, experts.capacity_for(40, 2, 4, 1.0)))
    cases.append((rng.standard_normal((6, 4)), np.tile([0, 1], (6, 1)), np.full((6, 2), 0.5), 4, 2))
    for i, (x, idx, gates, E, cap) in enumerate(cases):
        x_sorted, offsets, counts, cache = experts.dispatch_forward(x, idx, E, cap)
        M = x_sorted.shape[0]
        order = cache.order if hasattr(cache, "order") else cache[0]  # the package's routing cache
        slot_pos = cache.slot_pos if hasattr(cache, "slot_pos") else cache[2]
        y_sorted, dx_sorted, dy = (
            rng.standard_normal(s) for s in ((M, x.shape[1]), (M, x.shape[1]), x.shape)
        )
        y, ccache = experts.combine_forward(y_sorted, gates, cache)
        dy_sorted, dgates = experts.combine_backward(dy, ccache)
        values = dict(x=x, idx=idx, gates=gates, E=np.array(E), capacity=np.array(-1 if cap is None else cap),
                      counts=counts, offsets=np.array(offsets), M=np.array(M), order=order, slot_pos=slot_pos,
                      x_sorted=x_sorted, dx_sorted=dx_sorted, dx=experts.dispatch_backward(dx_sorted, cache),
                      y_sorted=y_sorted, y=y, dy=dy, dy_sorted=dy_sorted, dgates=dgates)  # fmt: skip
        out.update({f"c{i}_{k}": np.asarray(v) for k, v in values.items()})
    return out
