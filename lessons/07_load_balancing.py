# %% [markdown]
# # Lesson 07 — Load balancing
#
# A router is trained by the same gradient descent as everything else, and left alone it tends to a
# bad equilibrium: an expert that receives a few more tokens early gets more training, becomes a bit
# better, wins more tokens, and so on. The other experts starve. This is **router collapse** (Shazeer
# et al. 2017, sec. 4, called it a self-reinforcing imbalance). A collapsed MoE has the parameters of a
# big model and the quality of a small one — and, across devices, the speed of its busiest expert.
#
# This lesson first *shows* collapse on a tiny model, then builds the three standard remedies:
#
# 1. the Switch Transformer **load-balancing loss** (Fedus et al. 2021, eqs. 4–6), which you implement;
# 2. the ST-MoE router **z-loss** (Zoph et al. 2022, eq. 5), which keeps router logits small;
# 3. DeepSeek-V3's **auxiliary-loss-free bias balancing** (Wang et al. 2024; DeepSeek-AI 2024,
#    sec. 2.1.2), which balances without adding any loss at all.
#
# Shapes: N tokens, E experts, K experts per token.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minimoe import GPT, AdamW, Config
from minimoe.backend import to_numpy, topk_indices
from minimoe.data import builtin_corpus, get_batch
from minimoe.gradcheck import check_op
from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference
from minimoe.ops import balance, router
from minimoe.tokenizer import CharTokenizer

np.set_printoptions(precision=3, suppress=True)

# %% [markdown]
# ## Collapse, on a tiny model
#
# A character-level Llama-style model with 2 layers, both MoE: $E = 8$ SwiGLU experts, top-2,
# Mixtral's renormalised gates, a small random router init ($\sigma = 0.02$), and **no balancing at
# all** (`aux_loss_coef=0`). We train it for 300 steps on CPython's own documentation text and record,
# at every step, the fraction of the $N K$ token-slots each expert receives. Perfect balance would
# be $1/E = 12.5\%$ each. (300 steps of a tiny model take a few seconds; the loss is far from
# converged, and longer runs show the same picture more strongly.)

# %%
text = builtin_corpus()[:200_000]
tok = CharTokenizer.from_text(text)
ids = np.array(tok.encode(text), dtype=np.int64)
B, T, E, K = 16, 32, 8, 2


def train(steps=300, seed=1, **moe):
    """Train a tiny 2-layer MoE GPT; return a log of per-step routing statistics."""
    cfg = Config(
        flavour="llama",
        vocab_size=tok.vocab_size,
        block_size=T,
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_experts=E,
        top_k=K,
        expert_hidden=32,
        **moe,
    )
    model = GPT(cfg, seed=seed, dtype="float32")
    opt = AdamW(model.params, lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    log = {"load": [], "lm": [], "z": [], "bias": []}
    for _ in range(steps):
        x, y = get_batch(ids, B, T, rng)
        model.forward(x, y)
        model.backward()
        opt.step(model.grads)
        model.update_router_biases()  # DeepSeek-V3's bias step; a no-op for the softmax routers
        layers = model.stats["layers"]
        log["load"].append([to_numpy(st["tokens_per_expert"]) / (B * T * K) for st in layers])  # (L, E)
        log["lm"].append(float(model.stats["lm_loss"]))
        log["z"].append(float(model.stats["z_loss"]))
        if "blocks.1.moe.router_bias" in model.buffers:
            log["bias"].append(to_numpy(model.buffers["blocks.1.moe.router_bias"]).copy())
    log = {k: np.array(v) for k, v in log.items()}
    log["model"] = model
    return log


runs = {"no balancing": train(aux_loss_coef=0.0)}
final = runs["no balancing"]["load"][-50:].mean(axis=0)  # (layers, E), averaged over the last 50 steps

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
for layer, ax in enumerate(axes):
    ax.bar(np.arange(E), final[layer])
    ax.axhline(1 / E, color="k", ls="--", lw=1, label="uniform 1/E")
    ax.set_title(f"layer {layer}: load without balancing")
    ax.set_xlabel("expert")
axes[0].set_ylabel("fraction of slots")
axes[0].legend()
plt.tight_layout()
plt.show()
for layer in range(2):
    top2 = np.sort(final[layer])[-2:].sum()
    print(f"layer {layer}: the two busiest experts take {100 * top2:.0f}% of the slots (uniform: 25%)")

# %% [markdown]
# ## The Switch load-balancing loss
#
# Fedus et al. (2021, eqs. 4–6) add, for each MoE layer, with $N$ tokens and router probabilities
# $p_{n,e}$ (the **full** softmax over all $E$ experts):
#
# $$\mathcal{L}_\text{aux} = E \sum_{e=1}^{E} f_e P_e, \qquad
#   f_e = \frac{1}{NK}\sum_{n=1}^{N}\sum_{k=1}^{K} \mathbb{1}[\mathrm{idx}_{n,k} = e], \qquad
#   P_e = \frac{1}{N}\sum_{n=1}^{N} p_{n,e} .$$
#
# - $f_e$ is the fraction of the $NK$ assignments that went to expert $e$, counted **before** capacity
#   drops (after drops an overloaded expert's count is capped, and the loss would under-report exactly
#   the imbalance it should fix). It is piecewise constant: **no gradient** flows through $f$.
# - $P_e$ is differentiable. Its gradient, $\partial \mathcal{L}_\text{aux}/\partial p_{n,e} = E f_e / N$,
#   pushes probability away from each expert in proportion to its current load. It must use the full
#   softmax: with the top-$K$ gates only, the experts that are never chosen would never be pulled up.
# - At uniform routing, $f_e = P_e = 1/E$ and $\mathcal{L}_\text{aux} = E \cdot E \cdot 1/E^2 = 1$, for
#   every $K$ — **in our convention**. Hugging Face's Mixtral (`load_balancing_loss_func`) counts $f$
#   separately per choice rank (each rank's fractions sum to 1), so its value at uniform routing is $K$,
#   and it pools the tokens of all layers into one loss; we keep one loss per layer and the model adds
#   them, each times `aux_loss_coef` (Switch used 0.01).
#
# **Your turn.** Implement the loss and its backward (with respect to `probs`).


# %%
def load_balancing_loss_forward(probs, idx, E):
    """probs (N, E) full router distribution, idx (N, K) chosen experts (before drops) -> loss, cache."""
    ### BEGIN SOLUTION
    N, K = idx.shape
    f = np.bincount(idx.reshape(-1), minlength=E) / (N * K)  # (E,) fraction of the N*K slots
    P = probs.mean(axis=0)  # (E,) mean router probability
    loss = E * np.sum(f * P)
    return loss, (f, N)
    ### END SOLUTION


# %%
def load_balancing_loss_backward(dloss, cache):
    """dloss (scalar) -> dprobs (N, E) = dloss * E * f_e / N (the same row for every token)."""
    ### BEGIN SOLUTION
    f, N = cache
    E = f.shape[0]
    return np.broadcast_to(dloss * E * f / N, (N, E)).copy()
    ### END SOLUTION


# %% [markdown]
# **Check the forward** against the values of `minimoe.ops.balance` (stored in
# `07_load_balancing.npz`) on random routing with $K = 2$ and $K = 1$, then the two limiting values
# (uniform: 1; total collapse onto $K$ experts that also get all the probability: $E/K$), and the
# Hugging Face convention ($K$ times ours on one layer).


# %%
def hf_mixtral_aux(probs, idx, E):
    """Hugging Face Mixtral's convention on one layer: f per choice rank (K, E), then E * sum f P."""
    one_hot = np.eye(E)[idx]  # (N, K, E)
    return E * np.sum(one_hot.mean(axis=0) * probs.mean(axis=0))


def routing_case(name):
    """probs (N, E), idx (N, K) of a named case."""
    return reference("07", f"{name}_probs"), reference("07", f"{name}_idx")


# %% check id=load_balancing_loss_forward points=2
FN = "load_balancing_loss_forward"
for name in ("random_k2", "random_k1", "uniform", "collapsed"):
    probs, idx = routing_case(name)
    (N, E_), K_ = probs.shape, idx.shape[1]
    CASE = f"{name} routing N={N} E={E_} K={K_}"
    with case(FN, CASE):
        loss, _ = load_balancing_loss_forward(probs, idx, E_)
    check_shape(FN, CASE, "loss", loss, (), "f")
    check_close(FN, CASE, "loss", loss, reference("07", f"{name}_loss"), 1e-12)
    check_close(
        FN, CASE, "K * loss (vs Hugging Face's convention)", K_ * loss, hf_mixtral_aux(probs, idx, E_), 1e-12
    )
probs, idx = routing_case("random_k2")
print(
    f"ours {load_balancing_loss_forward(probs, idx, E)[0]:.4f}   Hugging Face {hf_mixtral_aux(probs, idx, E):.4f}"
)
print("load_balancing_loss_forward is correct: uniform 1, collapsed E/K")

# %% [markdown]
# **Check the backward**: a float64 gradient check with respect to `probs`, then one through the softmax
# with respect to the router logits (where `idx` is recomputed from the logits at every probe — top-$K$
# is piecewise constant, and O(1) random logits keep every probe on the same piece), then the values of
# `minimoe.ops.balance.load_balancing_loss_backward` for an upstream gradient of 1.7.


# %%
def aux_from_logits(lg, k):
    """logits (N, E) -> aux loss, with the choice and the full softmax both taken from the logits."""
    pr, _ = router.router_probs_forward(lg, "softmax")
    return load_balancing_loss_forward(pr, topk_indices(lg, k), lg.shape[1])[0]


def aux_from_logits_grad(lg, k, dloss):
    """The gradient of dloss * aux_from_logits with respect to the logits: your backward, then the softmax's."""
    pr, sm_cache = router.router_probs_forward(lg, "softmax")
    _, lb_cache = load_balancing_loss_forward(pr, topk_indices(lg, k), lg.shape[1])
    return router.router_probs_backward(load_balancing_loss_backward(dloss, lb_cache), sm_cache, "softmax")


# %% check id=load_balancing_loss_backward points=2
FN = "load_balancing_loss_backward"


def check_load_balancing_loss_backward(name):
    probs, idx = routing_case(name)
    logits = reference("07", f"{name}_logits")
    (N, E_), K_ = probs.shape, idx.shape[1]
    CASE = f"{name} routing N={N} E={E_} K={K_} dloss=1.7"
    with case(FN, CASE):
        dprobs = load_balancing_loss_backward(1.7, load_balancing_loss_forward(probs, idx, E_)[1])
        dlogits = aux_from_logits_grad(logits, K_, 1.7)
    check_shape(FN, CASE, "dprobs", dprobs, (N, E_), "f")
    loss = lambda: 1.7 * float(load_balancing_loss_forward(probs, idx, E_)[0])
    check_gradient(FN, CASE, loss, probs, dprobs, 1e-6, name="dprobs")
    loss = lambda: 1.7 * float(aux_from_logits(logits, K_))
    check_gradient(FN, CASE, loss, logits, dlogits, 1e-6, name="dlogits (through the softmax)")
    check_close(FN, CASE, "dprobs", dprobs, reference("07", f"{name}_dprobs"), 1e-12)


for name in ("random_k2", "random_k1"):
    check_load_balancing_loss_backward(name)
print("load_balancing_loss_backward is correct")

# %% [markdown]
# ## The router z-loss
#
# ST-MoE (Zoph et al. 2022, eq. 5) adds a second, independent term:
#
# $$\mathcal{L}_z = \frac{1}{N} \sum_{n=1}^{N} \Big(\log \sum_{e=1}^{E} e^{\ell_{n,e}}\Big)^2,
#   \qquad \frac{\partial \mathcal{L}_z}{\partial \ell_{n,e}} = \frac{2}{N}\, \mathrm{lse}_n\, p_{n,e}.$$
#
# It does not balance anything. It penalises large router logits, because large logits make the
# exponentials in the softmax sensitive to round-off (bfloat16 and float32 both), which ST-MoE found to
# be a source of training instabilities at scale. It is cheap, and its coefficient is small (ST-MoE:
# $10^{-3}$). Here is the package's version, gradient-checked, and its value for small and large logits:

# %%
rng = np.random.default_rng(0)
logits = rng.standard_normal((64, E))
err = check_op(balance.z_loss_forward, balance.z_loss_backward, [rng.standard_normal((16, E))], eps=1e-5)[0]
print(f"z-loss gradient check: {err:.1e}")
assert err <= 1e-6
for scale in (0.1, 1.0, 10.0):
    print(f"logits ~ N(0, {scale}^2): z-loss = {float(balance.z_loss_forward(scale * logits)[0]):8.2f}")

# %% [markdown]
# ## DeepSeek-V3: balancing with a bias, no loss
#
# An auxiliary loss trades language-modelling quality for balance: its gradient competes with the
# LM gradient inside the same router weights. Wang et al. (2024) and DeepSeek-V3 (DeepSeek-AI 2024,
# sec. 2.1.2, eqs. 13–16) balance differently. With sigmoid scores $s_{n,e} = \sigma(\ell_{n,e})$ and a
# per-expert bias $b_e$:
#
# $$S_n = \mathrm{TopK}_e\,(s_{n,e} + b_e), \qquad g_{n,e} = \frac{s_{n,e}}{\sum_{j \in S_n} s_{n,j}}
#   \quad (e \in S_n).$$
#
# - The bias only **chooses** the experts; the gates use the **unbiased** scores, so the bias never
#   changes how much an expert's output counts, and no gradient reaches it.
# - It is **not a parameter**: after every optimizer step it is nudged by a fixed amount $\gamma$,
#   $b_e \leftarrow b_e + \gamma\, \mathrm{sign}(\bar c - c_e)$ with $c_e$ the load of expert $e$ in the
#   batch and $\bar c$ the mean load: overloaded experts become less attractive, underloaded ones more.
#
# In minimoe: `router="sigmoid_bias"`, the biases live in `model.buffers` (not `model.params`, so the
# optimizer never sees them) and `model.update_router_biases()` applies the step (`bias_update_rate`
# $= \gamma$; DeepSeek-V3 used $10^{-3}$ over a long run, we use $10^{-2}$ for 300 steps). DeepSeek-V3
# keeps, in addition, a very small sequence-wise balancing loss; we leave it out.

# %%
logits = rng.standard_normal((5, E))
bias = np.zeros(E)
bias[3] = 1.0  # make expert 3 attractive
g0, i0, _ = router.sigmoid_bias_topk_forward(logits, np.zeros(E), K)
g1, i1, _ = router.sigmoid_bias_topk_forward(logits, bias, K)
print("chosen without bias:", i0.tolist(), "\nchosen with bias:   ", i1.tolist())
s = 1 / (1 + np.exp(-logits))
s_sel = np.take_along_axis(s, i1, axis=-1)
assert np.allclose(g1, s_sel / s_sel.sum(-1, keepdims=True))  # gates from the UNbiased scores
m = GPT(
    Config(
        flavour="llama",
        vocab_size=8,
        block_size=4,
        n_layer=1,
        n_head=1,
        n_embd=4,
        n_experts=4,
        top_k=2,
        router="sigmoid_bias",
    )
)
print("buffers:", list(m.buffers), "  in params?", any("router_bias" in k for k in m.params))

# %% [markdown]
# ## The three setups, side by side
#
# Same model, data and seed; only the balancing differs: none, the Switch loss with coefficient
# 0.01 (plus a run that also adds the z-loss at $10^{-3}$), and DeepSeek-V3's bias. Each panel shows
# how the slots of layer 1 are shared among the 8 experts over training (smoothed over 10 steps).

# %%
runs["Switch aux loss 0.01"] = train(aux_loss_coef=0.01)
runs["aux 0.01 + z-loss 1e-3"] = train(aux_loss_coef=0.01, z_loss_coef=1e-3)
runs["DeepSeek-V3 bias"] = train(router="sigmoid_bias", aux_loss_coef=0.0, bias_update_rate=1e-2)


def smooth(a, n=10):
    """Moving average over the first axis."""
    kernel = np.ones(n) / n
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 0, a)


shown = ("no balancing", "Switch aux loss 0.01", "DeepSeek-V3 bias")
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), sharey=True)
for ax, name in zip(axes, shown):
    load = smooth(runs[name]["load"][:, 1, :])  # (steps, E), layer 1
    ax.stackplot(np.arange(len(load)), load.T, labels=[f"expert {e}" for e in range(E)])
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
axes[0].set_ylabel("share of the slots (layer 1)")
axes[2].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
plt.tight_layout()
plt.show()

fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
for name, log in runs.items():
    axes[0].plot(smooth(E * log["load"].max(axis=-1).max(axis=-1)), label=name)  # busiest expert, any layer
    axes[1].plot(smooth(log["z"]), label=name)
axes[0].set_title("busiest expert's load / mean load")
axes[1].set_title("router z-loss (sum over layers)")
axes[2].plot(runs["DeepSeek-V3 bias"]["bias"])
axes[2].set_title("DeepSeek-V3 bias $b_e$ (layer 1)")
for ax in axes:
    ax.set_xlabel("step")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

for name, log in runs.items():
    last = log["load"][-50:].mean(axis=0)
    print(
        f"{name:24s} LM loss (last 50 steps) {log['lm'][-50:].mean():.3f}   "
        f"busiest expert {100 * last.max():.0f}% of slots   final z-loss {log['z'][-1]:.2f}"
    )

# %% [markdown]
# What to read from this (one seed, 300 steps, a 2-layer toy; other seeds differ in detail):
#
# - Without balancing a couple of experts take most of the slots — and keep them. (With $K = 2$ the
#   busiest expert's load is at most $E/K = 4$ times the mean: one slot of every token.)
# - Both remedies bring every expert near the uniform $1/E$. The bias does it without touching the
#   loss. Only differences between the biases matter (adding a constant to all of them changes no
#   choice); they drift upwards together here because more experts sit below the mean load than above.
# - In our runs the balanced models also reach a slightly *lower* LM loss: the starved experts of the
#   unbalanced model are parameters wasted. At this size the differences are small and noisy; treat
#   them as a hint, not a measurement.
# - The z-loss lowers the router's log-sum-exp without hurting the balance; its benefit (stability) only
#   shows at scale and in low precision.
#
# ## Exercises
#
# 1. Raise `aux_loss_coef` to 0.1 and 1.0. Balance improves further; what happens to the LM loss, and to
#    the router entropy (`model.stats["layers"][i]["router_entropy"]`)? Explain with the gradient
#    $E f_e / N$.
# 2. Compute $P$ from the top-$K$ gates instead of the full softmax (change one line of your loss) and
#    retrain with coefficient 0.01: can an expert that is never chosen recover?
# 3. Make the bias step proportional to the imbalance instead of its sign,
#    $b_e \leftarrow b_e + \gamma (\bar c - c_e)/\bar c$, by writing your own loop over
#    `model.buffers` after each step. Compare how fast the load settles.
# 4. Measure $f$ *after* capacity drops (train with `capacity_factor=1.0`, compute $f$ from the kept
#    slots) and show numerically that the loss then underestimates the imbalance of the run without
#    balancing.


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe.ops.balance (run at build time)."""
    import numpy as np

    from minimoe.backend import topk_indices
    from minimoe.ops import activation, balance

    rng = np.random.default_rng(0)
    N, E, K = 64, 8, 2
    out = {}
    for name, k in (("random_k2", 2), ("random_k1", 1)):
        logits = rng.standard_normal((N, E))
        out[f"{name}_logits"] = logits
        out[f"{name}_probs"] = activation.softmax_forward(logits)[0]
        out[f"{name}_idx"] = topk_indices(logits, k)
    out["uniform_probs"] = np.full((N, E), 1 / E)
    out["uniform_idx"] = (np.arange(N * K) % E).reshape(N, K)  # every expert gets N*K/E slots
    collapsed = np.zeros((N, E))
    collapsed[:, :K] = 1 / K  # experts 0 and 1 hold all the probability ...
    out["collapsed_probs"] = collapsed
    out["collapsed_idx"] = np.tile(np.arange(K), (N, 1))  # ... and get every slot
    for name in ("random_k2", "random_k1", "uniform", "collapsed"):
        loss, cache = balance.load_balancing_loss_forward(out[f"{name}_probs"], out[f"{name}_idx"], E)
        out[f"{name}_loss"] = np.asarray(loss)
        out[f"{name}_dprobs"] = balance.load_balancing_loss_backward(1.7, cache)
    assert abs(out["uniform_loss"] - 1.0) < 1e-12 and abs(out["collapsed_loss"] - E / K) < 1e-12
    return out
