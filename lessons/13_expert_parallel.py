# %% [markdown]
# # Lesson 13 — Expert parallelism: the all-to-all, by hand
#
# Mixtral 8x7B holds 46.7B parameters, 45B of them in its experts: 93 GB in bf16, more than one
# 80 GB GPU holds. Mixtral, Switch, GShard and (reportedly) GPT-4 are therefore trained with their
# experts **spread over many devices**: with $P$ devices and $E$ experts per layer, device $r$ keeps
# experts $[rE/P, (r+1)E/P)$. The attention, norms and router are small; every device keeps a copy
# and works on its own share of the batch (data parallelism). But a token's experts now live
# elsewhere: after routing, each token-slot **travels to the device of its expert, and its result
# travels back**. The exchange in which every device sends a different piece to every other one is
# the **all-to-all**.
#
# In this lesson:
# 1. $P$ ranks (processes) simulated in one process: a Python list indexed by rank;
# 2. you write the all-to-all — a *block transpose* — and derive and write its backward;
# 3. you write the bookkeeping on the expert's side, and assemble an expert-parallel MoE layer that
#    equals the one-process layer to the last digits;
# 4. why the balancing statistics must be summed over all ranks;
# 5. the real thing: `mpiexec -n 2 python -m minimoe train` against one process;
# 6. on paper: what the all-to-all costs Mixtral 8x7B and the rumoured GPT-4 on 8 to 64 devices.
#
# Shapes: P ranks, N tokens (B·T), C channels, E experts (E/P per rank), K experts per token.

# %%
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minimoe
from minimoe import checkpoint
from minimoe.config import Config
from minimoe.gradcheck import rel_error
from minimoe.info import expert_parallel_cost, si
from minimoe.layers import moe
from minimoe.ops import balance, experts, router
from minimoe.presets import get_preset
from minimoe.train import train

np.set_printoptions(precision=4, suppress=True)
from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference

# %% [markdown]
# ## 1. P ranks in one process
#
# A *rank* is one of the $P$ processes; each has its own memory and sees only its own arrays. We
# simulate them with lists: `xs[r]` is rank $r$'s array. Take $P = 3$ ranks, $E = 6$ experts (two
# per rank), $K = 2$: every rank routes its own tokens and sorts its token-slots by expert (Lesson
# 06's dispatch). Since expert $e$ lives on rank $e \div (E/P)$, the sorted slots come out **grouped by
# destination rank**: a count matrix $n$ says how many slots rank $s$ sends to rank $d$.

# %%
rng = np.random.default_rng(0)
P, E, K, C, N_rank = 3, 6, 2, 4, 5  # N_rank tokens per rank
El = E // P
counts, xs = np.zeros((P, P), dtype=np.int64), []
for s in range(P):
    x = rng.standard_normal((N_rank, C))  # this rank's tokens
    idx = np.argsort(-rng.standard_normal((N_rank, E)), axis=-1, kind="stable")[:, :K]  # a random top-K
    x_sorted, offsets, _, _ = experts.dispatch_forward(x, idx, E)  # slots grouped by expert
    counts[s] = np.diff(offsets).reshape(P, El).sum(axis=1)  # slots for the experts of each rank
    xs.append(x_sorted)
print("n[s, d] = slots rank s sends to rank d:\n", counts)
print("rows on each rank:", [x.shape[0] for x in xs], "= N_rank * K =", N_rank * K)

# %% [markdown]
# ## 2. The all-to-all is a block transpose
#
# Cut each rank's rows into $P$ blocks, block $s \to d$ holding the $n_{sd}$ rows for rank $d$ (in
# rank order). Lay all blocks out in a $P \times P$ grid, row $s$ the sender, column $d$ the
# receiver. The all-to-all moves block $(s, d)$ to position $(d, s)$: rank $d$ receives
#
# $$y_d = \mathrm{concat}_{s=0}^{P-1} \big(\text{block } s \to d \text{ of } x_s\big), \qquad
#   y_d \in \mathbb{R}^{R_d \times C},\ R_d = \textstyle\sum_s n_{sd},$$
#
# its rows **grouped by source rank**. With MPI this is one call, `Alltoallv`, after the ranks have
# exchanged their counts (each rank must know how much it will receive).
#
# **Your turn.** Write the exchange as one process sees it: `xs` is the list of the $P$ ranks'
# arrays, `counts[s, d]` the number of rows of `xs[s]` for rank $d$; return the list of what each
# rank receives. The blocks of `xs[s]` start at the cumulative sums of `counts[s]`.


# %%
def all_to_all_forward(xs, counts):
    """xs: list of P arrays (M_s, C), rows grouped by destination; counts (P, P) integers
    -> list of P arrays (R_d, C): rank d's rows from every rank s, in the order of s."""
    ### BEGIN SOLUTION
    P = len(xs)
    starts = [np.concatenate([[0], np.cumsum(counts[s])]) for s in range(P)]
    return [np.concatenate([xs[s][starts[s][d] : starts[s][d + 1]] for s in range(P)]) for d in range(P)]
    ### END SOLUTION


# %% [markdown]
# **Check**: the received arrays' shapes, then their rows, exactly (an exchange copies numbers, it
# computes nothing), against `minimoe.layers.exchange.all_to_all_forward_reference` on three
# layouts: one rank (nothing moves), three ranks with empty blocks and a rank that receives nothing,
# and four ranks.

# %% check id=all_to_all_forward points=2
FN = "all_to_all_forward"
for layout in ("P1", "P3_empty", "P4"):
    counts_ = reference("13", f"counts_{layout}")
    P_ = counts_.shape[0]
    xs_ = [reference("13", f"x_{layout}_{s}") for s in range(P_)]
    CASE = f"{layout}, counts {counts_.tolist()}"
    with case(FN, CASE):
        ys_ = all_to_all_forward(xs_, counts_)
    if not isinstance(ys_, (list, tuple)) or len(ys_) != P_:
        raise CheckFailed(
            f"{FN}, case {CASE}: expected a list of {P_} arrays, one per rank, got {type(ys_).__name__}"
        )
    for d in range(P_):
        check_shape(FN, CASE, f"ys[{d}]", ys_[d], (counts_[:, d].sum(), xs_[0].shape[1]), "f")
        check_close(FN, CASE, f"ys[{d}]", ys_[d], reference("13", f"y_{layout}_{d}"), 0)
print("all_to_all_forward is correct")

# %% [markdown]
# ## 3. Its backward
#
# Stack all ranks' rows into one column: $X \in \mathbb{R}^{M \times C}$ with $M = \sum_s M_s$. The
# all-to-all only moves rows, so it is a **permutation**: $Y = \Pi X$ for a permutation matrix
# $\Pi$. For a loss $L(Y)$,
#
# $$\frac{\partial L}{\partial X} = \Pi^\top \frac{\partial L}{\partial Y} = \Pi^{-1}\,\frac{\partial L}{\partial Y}:$$
#
# the gradient rows go back **where their rows came from**. Rank $d$ received $n_{sd}$ rows from
# each $s$, in order of $s$: its $dY_d$ is grouped by destination-of-the-way-back with counts
# $n_{sd} = (n^\top)_{ds}$. So the backward of the all-to-all is the **all-to-all in the opposite
# direction, with the counts transposed** — the same exchange, sender and receiver swapped:
#
# $$dX_s = \mathrm{concat}_{d} \big(\text{rows of } dY_d \text{ that came from } s\big).$$
#
# **Your turn.** Write it (you may use your forward).


# %%
def all_to_all_backward(dys, counts):
    """dys: list of P arrays (R_d, C), the gradients of the received rows; counts (P, P) of the
    forward -> list of P arrays (M_s, C): the gradient of each rank's sent rows."""
    ### BEGIN SOLUTION
    return all_to_all_forward(dys, np.asarray(counts).T)
    ### END SOLUTION


# %% [markdown]
# **Check**: shapes; then a float64 gradient check of $L = \sum_d \langle W_d, y_d \rangle$ with respect
# to every entry of every rank's $x_s$, through *your* forward (central differences: perturb one
# entry of rank $s$, exchange everything, recompute $L$); then the reference values.

# %% check id=all_to_all_backward points=3
FN = "all_to_all_backward"


def check_all_to_all_backward(layout):
    counts_ = reference("13", f"counts_{layout}")
    P_ = counts_.shape[0]
    xs_ = [reference("13", f"x_{layout}_{s}") for s in range(P_)]
    ws_ = [reference("13", f"w_{layout}_{d}") for d in range(P_)]
    CASE = f"{layout}, counts {counts_.tolist()}"
    with case(FN, CASE):
        dxs_ = all_to_all_backward(ws_, counts_)
    if not isinstance(dxs_, (list, tuple)) or len(dxs_) != P_:
        raise CheckFailed(f"{FN}, case {CASE}: expected a list of {P_} arrays, one per rank")
    for s in range(P_):
        check_shape(FN, CASE, f"dxs[{s}]", dxs_[s], xs_[s].shape, "f")
    loss = lambda: sum(float((y * w).sum()) for y, w in zip(all_to_all_forward(xs_, counts_), ws_))
    for s in range(P_):
        if xs_[s].size:
            check_gradient(FN, CASE, loss, xs_[s], dxs_[s], 1e-8, name=f"dxs[{s}]")
        check_close(FN, CASE, f"dxs[{s}]", dxs_[s], reference("13", f"dx_{layout}_{s}"), 0)


for layout in ("P3_empty", "P4"):
    check_all_to_all_backward(layout)
print("all_to_all_backward is correct")

# %% [markdown]
# ## 4. On the expert's rank: regroup by expert
#
# What rank $d$ received is grouped by *source*: from rank 0 the slots of its first local expert,
# then of its second, ...; then from rank 1, and so on. Its experts want their rows together, as
# in one process (Lesson 06: one matmul per expert on a contiguous slice). Exchanging the counts
# told rank $d$ a matrix $g_{sj}$: slots from rank $s$ for its local expert $j$ ($P \times E/P$),
# stored source-major. The rows of block $(s, j)$ start at the running sum of $g$ in that order.
#
# **Your turn.** Return the permutation `perm` that lists the received rows **expert-major**: first
# every row for local expert 0 (from rank 0, then rank 1, ...), then expert 1, ... so that
# `received[perm]` is sorted by expert and `out[perm] = results` puts the results back.


# %%
def expert_major(counts):
    """counts (P, E_l) integers, g[s, j] rows from rank s for local expert j, stored source-major
    -> perm (R,) integers: the row indices in expert-major order (by j, then by s)."""
    ### BEGIN SOLUTION
    counts = np.asarray(counts, dtype=np.int64)
    flat = counts.reshape(-1)
    start = (np.cumsum(flat) - flat).reshape(counts.shape)  # first row of block (s, j)
    P, El = counts.shape
    blocks = [np.arange(start[s, j], start[s, j] + counts[s, j]) for j in range(El) for s in range(P)]
    return np.concatenate(blocks).astype(np.int64) if blocks else np.zeros(0, dtype=np.int64)
    ### END SOLUTION


# %% check id=expert_major points=2
FN = "expert_major"
for name in ("one_rank", "two_by_two", "with_zeros", "four_by_three"):
    g_ = reference("13", f"g_{name}")
    CASE = f"{name}, counts {g_.tolist()}"
    with case(FN, CASE):
        perm_ = expert_major(g_)
    check_shape(FN, CASE, "perm", perm_, (g_.sum(),), "iu")
    check_close(FN, CASE, "perm", perm_, reference("13", f"perm_{name}"), 0)
print("expert_major is correct")

# %% [markdown]
# ## 5. An expert-parallel MoE layer, simulated
#
# Now every piece is there. With your functions, $P = 2$ simulated ranks run a Mixtral-style MoE
# layer, each holding $E/P$ experts, and we compare with the one-process layer
# (`minimoe.layers.moe.moe_forward`) on the whole batch:
#
# 1. each rank routes its own tokens and dispatches its slots, sorted by expert;
# 2. the counts: rank $s$ tells rank $d$ how many slots it has for each of $d$'s experts;
# 3. all-to-all: the slots travel to their experts' ranks;
# 4. each rank regroups what arrived by expert and runs its own experts;
# 5. the results travel back — an all-to-all with the counts transposed: the **same call as the
#    backward** of step 3. (The return trip is the inverse permutation, and so is the backward.)
# 6. each rank combines its tokens' results with their gates.

# %%
c = Config(flavour="llama", n_layer=1, n_embd=8, n_head=1, vocab_size=5, block_size=8, n_experts=4,
           top_k=2, expert_hidden=6, init_std=0.5)  # fmt: skip
rng = np.random.default_rng(1)
p = moe.init_params(c, "moe.", rng, c.init_std, c.init_std)
h = rng.standard_normal((4, 4, c.n_embd))  # B = 4 rows of T = 4 tokens
y_one, _, _ = moe.moe_forward(c, h, p, {}, "moe.", None, False)  # one process, all experts


def expert_parallel_layer(h, p, P):
    """The MoE layer on P simulated ranks, rank r holding experts [r E/P, (r+1) E/P)."""
    E, K, El = c.n_experts, c.top_k, c.n_experts // P
    w = {k: p["moe.experts." + k] for k in ("w1", "w2", "w3")}
    ranks = []
    for r in range(P):  # 1. route and dispatch locally
        x = h[r * len(h) // P : (r + 1) * len(h) // P].reshape(-1, c.n_embd)
        gates, idx, _ = router.softmax_topk_forward(x @ p["moe.router.w"], K)
        x_sorted, offsets, _, disp = experts.dispatch_forward(x, idx, E)
        ranks.append(
            dict(x=x, gates=gates, x_sorted=x_sorted, disp=disp, sent=np.diff(offsets).reshape(P, El))
        )
    n = np.stack([rk["sent"].sum(axis=1) for rk in ranks])  # 2. n[s, d]
    received = all_to_all_forward([rk["x_sorted"] for rk in ranks], n)  # 3.
    results = []
    for d in range(P):  # 4. local experts, expert-major
        g = np.stack([rk["sent"][d] for rk in ranks])  # g[s, j]: from rank s for my expert j
        perm = expert_major(g)
        local = {k: v[d * El : (d + 1) * El] for k, v in w.items()}
        y_local, _ = experts.experts_forward(received[d][perm], [0, *np.cumsum(g.sum(axis=0))], local)
        out = np.empty_like(y_local)
        out[perm] = y_local
        results.append(out)
    back = all_to_all_backward(results, n)  # 5. the way back
    ys = [experts.combine_forward(back[r], ranks[r]["gates"], ranks[r]["disp"])[0] for r in range(P)]  # 6.
    return np.concatenate(ys).reshape(h.shape)


for P_sim in (1, 2, 4):
    err = rel_error(expert_parallel_layer(h, p, P_sim), y_one)
    print(f"P = {P_sim}: expert-parallel layer vs one process, max rel error {err:.1e}")
    assert err < 1e-12

# %% [markdown]
# The backward of this layer runs the same steps in reverse: the output gradients travel to the
# experts (the backward of step 5, an all-to-all with the forward's counts), through the experts, and
# back (the backward of step 3, with the counts transposed). Two all-to-alls forward, two backward,
# per MoE layer. The experts' weight gradients never leave their rank: nobody else holds those
# weights. minimoe's version is `minimoe.layers.exchange.experts_parallel_forward/backward`, and it
# runs over MPI.
#
# ## 6. The balancing statistics must be global
#
# The Switch balancing loss (Lesson 07) is $E \sum_e f_e P_e$, with $f_e$ the fraction of the
# batch's slots routed to $e$ and $P_e$ the batch's mean router probability. A rank sees only its
# share of the batch. If each rank used its own $f$ and $P$, the sum of the ranks' losses would not
# be the batch's loss — $f_e P_e$ is a product of two batch means, and a mean of products is not a
# product of means — and P ranks would train a different model from one process. Likewise
# DeepSeek-V3's balancing bias must follow the *global* load.

# %%
probs_all = router.router_probs_forward(h.reshape(-1, c.n_embd) @ p["moe.router.w"], "softmax")[0]
idx_all = router.softmax_topk_forward(h.reshape(-1, c.n_embd) @ p["moe.router.w"], c.top_k)[1]
whole = float(balance.load_balancing_loss_forward(probs_all, idx_all, c.n_experts)[0])
halves = [float(balance.load_balancing_loss_forward(probs_all[s], idx_all[s], c.n_experts)[0])
          for s in (slice(0, 8), slice(8, 16))]  # fmt: skip
print(f"balancing loss of the batch {whole:.6f}; mean of the two ranks' own losses {np.mean(halves):.6f}")
counts_g = sum(np.bincount(idx_all[s].reshape(-1), minlength=4) for s in (slice(0, 8), slice(8, 16)))
psum_g = sum(probs_all[s].sum(axis=0) for s in (slice(0, 8), slice(8, 16)))  # the all-reduced sums
summed = c.n_experts * float((counts_g / (16 * c.top_k) * psum_g / 16).sum())
print(f"from the all-reduced counts and probability sums: {summed:.6f}")
assert abs(summed - whole) < 1e-12 and abs(np.mean(halves) - whole) > 1e-6

# %% [markdown]
# So a minimoe MoE layer on $P$ ranks all-reduces one short vector per layer in the forward — the
# counts, the probability sums, the z-loss and entropy sums — and every rank gets the batch's
# numbers. Its gradient with respect to a rank's own probabilities is then
# $E f_e / N_\text{batch}$: the one-process formula with the global $f$, times the rank's share
# $N_\text{rank} / N_\text{batch}$ (`minimoe.layers.moe.global_balance`).
#
# Capacity (Switch) is the one place where P ranks *choose* to differ: each rank applies the
# capacity to its own tokens, as GShard does per group of tokens. One process gets the same
# semantics with `Config.capacity_groups = P`.
#
# ## 7. The real thing: two MPI processes
#
# `mpiexec -n 2 python -m minimoe train` starts two processes that train one model: each draws the
# same global batch and computes its half, the experts are split between them, and the all-to-all
# runs over MPI (`pip install "minimoe[dist]"` installs mpi4py and MPICH). Below, a tiny Mixtral
# trains 6 steps in float64 on two processes, and then in this one; their checkpoints agree to
# round-off.

# %%
mpiexec = Path(sys.executable).with_name("mpiexec")
mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401
except ImportError:
    mpiexec = None
if mpiexec is None:
    print("mpi4py or mpiexec is missing: pip install 'minimoe[dist]' to run this cell")
else:
    work = Path(tempfile.mkdtemp())
    words = "the cat sat on the mat and the dog ran to the red door".split()
    (work / "text.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 4000)))
    opts = dict(data=str(work / "text.txt"), preset="mixtral", n_layer=2, n_embd=16, n_head=2, block_size=16,
                batch_size=8, max_iters=6, eval_interval=6, eval_iters=2, warmup_iters=2, sample_tokens=0,
                dtype="float64")  # fmt: skip
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(minimoe.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    run = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "minimoe", "train", *flags, f"--out={work / 'two'}"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    print(run.stdout[-1200:] or run.stderr[-2000:])
    train({**opts, "out": str(work / "one")}, quiet=True)
    two, one = checkpoint.load_checkpoint(work / "two"), checkpoint.load_checkpoint(work / "one")
    worst = max(rel_error(two.params[k], one.params[k]) for k in one.params)
    print(f"two processes vs one, after {opts['max_iters']} steps: worst parameter rel error {worst:.1e}")
    print(
        "experts in the checkpoint:",
        two.params["blocks.0.moe.experts.w1"].shape[0],
        "(gathered from both ranks)",
    )
    assert worst < 1e-12

# %% [markdown]
# ## 8. On paper: when does the network limit?
#
# Per device and training step, with $T$ tokens per device, $L$ MoE layers, $K$ experts per token,
# width $C$ and $b$-byte activations, under uniform routing a slot's expert is on another device
# with probability $(P-1)/P$, and each MoE layer sends the slots out and back in the forward and
# their gradients out and back in the backward:
#
# $$\text{all-to-all bytes} = 4\, L\, T\, K\, C\, b\, \frac{P-1}{P}, \qquad
#   \text{compute} = (\text{training FLOPs per token}) \cdot T .$$
#
# Both grow with $T$: their ratio — FLOPs per byte sent — belongs to the model, not to the batch.
# `minimoe info --preset mixtral-8x7b --expert-parallel 8 --tokens 4096` prints it. Below, Mixtral
# 8x7B and the rumoured GPT-4 (an **unconfirmed** 2023 leak: 16 experts of ~111B, top-2) on 8 to 64
# devices, 4096 tokens per device, bf16, with assumed speeds (not measurements): 400 TFLOP/s per
# device, 450 GB/s inside a node of 8, 50 GB/s per device between nodes. With more devices than
# experts, each expert has copies on $P/E$ devices that share its tokens.

# %%
rows = []
print(f"{'model':20s} {'P':>3s} {'exp/dev':>8s} {'all-to-all':>11s} {'off-node':>9s} {'compute':>9s} "
      f"{'a2a time':>9s} {'a2a/comp':>9s} {'needs':>10s} {'grad all-reduce':>16s}")  # fmt: skip
for name in ("mixtral-8x7b", "gpt4-rumoured-full"):
    cfg = get_preset(name)
    for P_dev in (8, 16, 32, 64):
        d = expert_parallel_cost(cfg, P_dev, 4096)
        rows.append((name, P_dev, d))
        print(f"{name:20s} {P_dev:3d} {d['experts_per_device']:8g} {si(d['all_to_all_bytes_per_device'], 'B'):>11s} "
              f"{si(d['all_to_all_bytes_between_nodes'], 'B'):>9s} {d['compute_s'] * 1e3:7.0f}ms "
              f"{d['all_to_all_s'] * 1e3:7.0f}ms {d['all_to_all_over_compute']:9.3f} "
              f"{d['network_limits_below_gbs']:6.1f}GB/s {si(d['grad_allreduce_bytes_per_device'], 'B'):>9s}"
              f" {d['grad_allreduce_s'] * 1e3:5.0f}ms")  # fmt: skip

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for ax, name in zip(axes, ("mixtral-8x7b", "gpt4-rumoured-full")):
    pts = [(P_dev, d) for n, P_dev, d in rows if n == name]
    x = np.arange(len(pts))
    ax.bar(x - 0.2, [d["compute_s"] for _, d in pts], 0.4, label="compute")
    ax.bar(x + 0.2, [d["all_to_all_s"] for _, d in pts], 0.4, label="all-to-all")
    ax.set_xticks(x, [str(P_dev) for P_dev, _ in pts])
    ax.set_xlabel("devices P")
    ax.set_title(f"{name}, 4096 tokens/device")
axes[0].set_ylabel("seconds per step (assumed speeds)")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Inside one node the all-to-all costs about 1% of the matmuls; once most slots cross nodes
# ($P \geq 16$), 5–12%. The network would limit only below about 4–6 GB/s per device: 10–50 Gb
# Ethernet, not a training cluster's InfiniBand. Real systems also overlap the all-to-all with
# computation. What grows beyond $P = E$ is the *gradient all-reduce* of the experts' copies — once
# per step, whatever $T$ — which is why large MoE runs use large batches and shard the optimizer
# states.
#
# ## Summary
#
# - Expert parallelism splits each MoE layer's experts over the devices; every token-slot travels to
#   its expert's device and back: two all-to-alls in the forward, two in the backward.
# - The all-to-all is a block transpose (a permutation of rows); its backward is the inverse
#   permutation: the same exchange with the counts transposed. The return trip of the forward is
#   the same call.
# - On the expert's side the rows arrive grouped by source and are regrouped by expert.
# - The balancing loss, z-loss, routing statistics and DeepSeek's bias must use the global batch's
#   counts (one all-reduce per layer), or $P$ ranks train a different model.
# - The all-to-all volume and the compute both grow with the tokens per step; their ratio is the
#   model's. Across nodes the network matters; inside a node it rarely limits.
#
# ## Exercises
#
# 1. Write the backward of `expert_parallel_layer` of section 5 (use `experts.experts_backward`,
#    `experts.combine_backward`, `experts.dispatch_backward` and your `all_to_all_backward` /
#    `all_to_all_forward`) and check $\partial L / \partial h$ against the one-process
#    `moe.moe_backward`.
# 2. With a capacity factor, show that 2 simulated ranks that each apply capacity to their own
#    tokens equal one process with `Config.capacity_groups = 2`, and differ from `capacity_groups = 1`.
# 3. Count the bytes your section-5 layer moves between ranks (rows leaving their rank, times C
#    times 8 bytes) and compare with $4 L T K C b (P-1)/P$ for the routing of this random router.
#    Then run `python -m minimoe bench --ranks 2` and compare its measured bytes with the formula.
# 4. For the rumoured GPT-4 on 64 devices, at what link speed between nodes does the all-to-all take
#    as long as the compute? (`minimoe info --preset gpt4-rumoured-full --expert-parallel 64
#    --network-gbs ...`.) And how many tokens per device per step hide the gradient all-reduce?


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe's exchange (at build time)."""
    import numpy as np

    from minimoe.layers import exchange

    rng = np.random.default_rng(13)
    layouts = {
        "P1": np.array([[5]]),
        "P3_empty": np.array([[2, 0, 1], [0, 0, 3], [1, 0, 2]]),  # rank 1 receives nothing
        "P4": rng.integers(0, 4, (4, 4)),
    }
    out = {}
    for name, counts in layouts.items():
        out[f"counts_{name}"] = counts
        xs = [rng.standard_normal((int(counts[s].sum()), 3)) for s in range(len(counts))]
        ws = [rng.standard_normal((int(counts[:, d].sum()), 3)) for d in range(len(counts))]
        for s, x in enumerate(exchange.all_to_all_forward_reference(xs, counts)):
            out[f"y_{name}_{s}"] = x
        for s, dx in enumerate(exchange.all_to_all_backward_reference(ws, counts)):
            out[f"dx_{name}_{s}"] = dx
        for s in range(len(counts)):
            out[f"x_{name}_{s}"], out[f"w_{name}_{s}"] = xs[s], ws[s]
    gs = {
        "one_rank": np.array([[2, 3]]),
        "two_by_two": np.array([[2, 1], [0, 3]]),
        "with_zeros": np.array([[0, 2, 0], [1, 0, 0], [0, 0, 0]]),
        "four_by_three": rng.integers(0, 3, (4, 3)),
    }
    for name, g in gs.items():
        out[f"g_{name}"] = g
        out[f"perm_{name}"] = exchange.expert_major(g)
    return out
