# %% [markdown]
# # Lesson 08 — The MoE GPT
#
# Time to put the pieces of Lessons 05–07 into a language model and test the claim that made
# Mixture-of-Experts popular:
#
# > *A sparse model has the capacity (parameters) of a big model at the compute (FLOPs per token) of a
# > small one.*
#
# Shazeer et al. (2017) called it "outrageously large" networks; Switch Transformer (Fedus et al. 2021)
# reported reaching T5-Base's quality up to 7x faster at the same FLOPs per token; Mixtral 8x7B
# (Jiang et al. 2024) holds 46.7B parameters but uses 12.9B per token, and matches or beats the dense
# Llama 2 70B on most benchmarks.
#
# In this lesson you assemble the MoE layer from the ops, look at its two sizes (total vs *active*
# parameters per token), and then train a dense GPT and an MoE GPT, **matched in active parameters per
# token**, side by side on the same data. We will be honest about what a toy-sized run can and cannot show.
#
# Shapes: B batch, T time, C channels, N tokens (B·T), E experts, K experts per token, F hidden size.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from minimoe import GPT, PRESETS, AdamW, cosine_lr, count_params, get_preset
from minimoe.data import builtin_corpus, get_batch, train_val_split
from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference
from minimoe.ops import experts, linear, router
from minimoe.tokenizer import CharTokenizer

# %% [markdown]
# ## The MoE block
#
# A GPT block is $x \leftarrow x + \mathrm{Attn}(\mathrm{Norm}_1(x))$, then $x \leftarrow x +
# \mathrm{FFN}(\mathrm{Norm}_2(x))$. An MoE GPT swaps the FFN for the MoE layer; everything else stays.
# For the normalised input $h$ (flattened to $N$ tokens):
#
# $$\ell = h W_r, \quad (g, \mathrm{idx}) = \mathrm{softmax\_topk}(\ell, K), \quad
#   y_n = \sum_{k} g_{n,k}\, \mathrm{Expert}_{\mathrm{idx}[n,k]}(h_n),$$
#
# the sum computed by dispatch → experts → combine (Lesson 06). The backward runs the same chain in
# reverse, and the gradient reaching $h$ has two parts: through the experts, and through the router
# logits (via the gates). The model also adds the balancing losses of Lesson 07; we leave them out here
# (`aux_loss_coef = 0`) so the layer is just the composition.
#
# **Your turn.** Assemble the forward and backward of the layer from `linear`, `router.softmax_topk_*`
# and `experts.dispatch_* / experts_* / combine_*` (all in `minimoe.ops`). Dropless (capacity None),
# renormalised gates (Mixtral).


# %%
def moe_layer_forward(h, w_router, w1, w3, w2, k):
    """h (N, C), w_router (C, E), w1, w3 (E, C, F), w2 (E, F, C) -> y (N, C), cache."""
    ### BEGIN SOLUTION
    E = w_router.shape[1]
    logits, c_lin = linear.linear_forward(h, w_router)  # (N, E)
    gates, idx, c_gate = router.softmax_topk_forward(logits, k, renormalize=True)  # (N, K) each
    h_sorted, offsets, _, c_disp = experts.dispatch_forward(h, idx, E)  # (N*K, C), slots by expert
    y_sorted, c_exp = experts.experts_forward(h_sorted, offsets, {"w1": w1, "w3": w3, "w2": w2})
    y, c_comb = experts.combine_forward(y_sorted, gates, c_disp)  # (N, C)
    return y, (c_lin, c_gate, c_disp, c_exp, c_comb)
    ### END SOLUTION


# %%
def moe_layer_backward(dy, cache):
    """dy (N, C) -> dh (N, C), dw_router (C, E), dw1, dw3, dw2."""
    ### BEGIN SOLUTION
    c_lin, c_gate, c_disp, c_exp, c_comb = cache
    dy_sorted, dgates = experts.combine_backward(dy, c_comb)
    dh_sorted, dw = experts.experts_backward(dy_sorted, c_exp)
    dh = experts.dispatch_backward(dh_sorted, c_disp)  # through the experts
    dlogits = router.softmax_topk_backward(dgates, c_gate)
    dh_router, dw_router, _ = linear.linear_backward(dlogits, c_lin)  # through the router
    return dh + dh_router, dw_router, dw["w1"], dw["w3"], dw["w2"]
    ### END SOLUTION


# %% [markdown]
# **Check** against the values of the package's MoE layer (`moe_forward` / `moe_backward` of
# minimoe's model, which also computes the balancing statistics; stored in `08_moe_gpt.npz`), for
# $K = 2$ and $K = 1$ on $N = 10$ tokens, $C = 6$, $E = 4$, $F = 5$; for the backward, first a float64
# gradient check with respect to every input.

# %%
WEIGHTS = ("router.w", "experts.w1", "experts.w3", "experts.w2")


def layer_inputs(k):
    """h (N, C), the layer's weights in the order of moe_layer_forward, and dy (N, C)."""
    h = reference("08", "h")
    return h, [reference("08", f"k{k}_{n}") for n in WEIGHTS], reference("08", "dy")


# %% check id=moe_layer_forward points=2
FN = "moe_layer_forward"
for k in (2, 1):
    h, weights, _ = layer_inputs(k)
    CASE = f"N={h.shape[0]} C={h.shape[1]} E={weights[0].shape[1]} k={k}"
    with case(FN, CASE):
        y, _ = moe_layer_forward(h, *weights, k=k)
    check_shape(FN, CASE, "y", y, h.shape, "f")
    check_close(FN, CASE, "y", y, reference("08", f"k{k}_y"), 1e-10)
print("moe_layer_forward is correct")

# %% check id=moe_layer_backward points=3
FN = "moe_layer_backward"


def check_moe_layer_backward(k):
    h, weights, dy = layer_inputs(k)
    CASE = f"N={h.shape[0]} C={h.shape[1]} E={weights[0].shape[1]} k={k}"
    with case(FN, CASE):
        grads = moe_layer_backward(dy, moe_layer_forward(h, *weights, k=k)[1])
    names = ("dh", *(f"d{n}" for n in WEIGHTS))
    if not isinstance(grads, tuple) or len(grads) != 5:
        raise CheckFailed(
            f"{FN}, case {CASE}: return the 5 gradients {', '.join(names)}, got {type(grads).__name__}"
        )
    for name, grad, wrt in zip(names, grads, (h, *weights)):
        check_shape(FN, CASE, name, grad, wrt.shape, "f")
    loss = lambda: float((moe_layer_forward(h, *weights, k=k)[0] * dy).sum())
    for name, grad, wrt in zip(names, grads, (h, *weights)):
        check_gradient(FN, CASE, loss, wrt, grad, 1e-6, name=name)
    for name, grad in zip(names, grads):
        check_close(FN, CASE, name, grad, reference("08", f"k{k}_{name}"), 1e-10)


for k in (2, 1):
    check_moe_layer_backward(k)
print("moe_layer_backward is correct (with k = 1 the router gets no gradient: renormalised gates are 1)")

# %% [markdown]
# ## Two sizes: total and active parameters
#
# An MoE model has a *total* parameter count (what it stores) and an *active* count (what one token
# multiplies): a token uses only $K$ of the $E$ routed experts, so where the total has
# $E \cdot 3 C F_e$ expert weights per layer, the active count has $K \cdot 3 C F_e$; the router and any
# shared experts are always active. Lesson 12 derives both counts by hand for every piece of the
# model (attention with grouped-query heads, dense and SwiGLU feed-forward, routers, shared experts)
# and checks them against every preset; here we take them from `minimoe.count_params`:

# %%
llama_presets = [n for n, d in PRESETS.items() if d.get("flavour") == "llama"]
print(f"{'preset':18s} {'total':>16s} {'active/token':>16s}")
for name in llama_presets:
    n = count_params(get_preset(name))
    print(f"{name:18s} {n['total']:16,d} {n['active']:16,d}")

# %% [markdown]
# The toy presets are **matched in active parameters per token** by one rule: every feed-forward layer
# spends $3 \cdot C \cdot 512$ weights on each token.
#
# - dense: one SwiGLU of $F = 512 = 4C$;
# - Mixtral-style: $K = 2$ experts of $F_e = 256$ ($2 \times 256 = 512$), $E = 8$;
# - Switch-style: $K = 1$ expert of $F_e = 512$, $E = 8$;
# - DeepSeek-style: $K = 3$ fine-grained experts of $F_e = 128$ plus 1 shared of 128 ($4 \times 128$),
#   $E = 16$.
#
# Their active counts differ only by the router ($C \cdot E$ weights), while the MoE totals are
# 3–6 times the dense one. Mixtral 8x7B itself: 46.7B total, 12.9B active — about 28%.
#
# ## Dense vs MoE, trained side by side
#
# The toy presets (4 layers, 128 wide) are too slow for a one-minute lesson in NumPy, so we shrink
# both **proportionally, keeping the matching**: 2 layers, $C = 64$, dense $F = 4C = 256$, Mixtral-style
# experts $F_e = 2C = 128$, $E = 8$, $K = 2$, context $T = 32$. Same data (character-level CPython
# documentation), same batches (same seed), same optimizer and schedule, 500 steps each.

# %%
text = builtin_corpus()
tok = CharTokenizer.from_text(text)
train_ids, val_ids = train_val_split(tok.encode(text), 0.1)
train_ids, val_ids = np.array(train_ids, dtype=np.int64), np.array(val_ids, dtype=np.int64)

SMALL = dict(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=tok.vocab_size)
configs = {
    "dense": get_preset("dense", ffn_hidden=4 * 64, **SMALL),
    "MoE (Mixtral-style)": get_preset("mixtral", expert_hidden=2 * 64, **SMALL),
}
counts = {name: count_params(c) for name, c in configs.items()}
for name, n in counts.items():
    print(
        f"{name:20s} total {n['total']:8,d}   active/token {n['active']:8,d}   "
        f"train FLOPs/token {n['train_flops_per_token']:10,d}"
    )
router_weights = 2 * 64 * 8  # one C x E router per MoE layer
assert counts["MoE (Mixtral-style)"]["active"] - counts["dense"]["active"] == router_weights

# %%
STEPS, BATCH, LR = 500, 16, 3e-3
val_rng = np.random.default_rng(123)
val_batches = [get_batch(val_ids, 32, 32, val_rng) for _ in range(4)]  # fixed held-out text


def val_loss(model):
    """Mean LM cross-entropy (no auxiliary losses) on the fixed held-out batches."""
    model.eval()
    losses = []
    for x, y in val_batches:
        model.forward(x, y)
        losses.append(float(model.stats["lm_loss"]))
    model.train()
    return float(np.mean(losses))


def train(cfg, seed=0):
    model = GPT(cfg, seed=seed, dtype="float32")
    opt = AdamW(model.params, lr=LR)
    rng = np.random.default_rng(seed)  # the same seed -> both models see the same batches
    log = {"train": [], "time": [], "val_step": [], "val": []}
    elapsed = 0.0  # training time only (evaluation excluded)
    for step in range(STEPS):
        t0 = time.perf_counter()
        x, y = get_batch(train_ids, BATCH, 32, rng)
        model.forward(x, y)
        model.backward()
        opt.step(model.grads, lr=cosine_lr(step, LR, 30, STEPS))
        elapsed += time.perf_counter() - t0
        log["train"].append(float(model.stats["lm_loss"]))
        log["time"].append(elapsed)
        if (step + 1) % 100 == 0:
            log["val_step"].append(step + 1)
            log["val"].append(val_loss(model))
    return {k: np.array(v) for k, v in log.items()}


logs = {name: train(c) for name, c in configs.items()}


# %%
def smooth(a, n=20):
    return np.convolve(a, np.ones(n) / n, mode="valid")


fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for name, log in logs.items():
    steps = np.arange(len(smooth(log["train"]))) + 20  # the trailing average ends at these steps
    (line,) = axes[0].plot(steps, smooth(log["train"]), label=f"{name}, train")
    axes[0].plot(log["val_step"], log["val"], "o--", color=line.get_color(), label=f"{name}, validation")
    axes[1].plot(log["time"][19:], smooth(log["train"]), color=line.get_color(), label=name)
axes[0].set_xlabel("step")
axes[0].set_ylabel("cross-entropy (nats/char)")
axes[0].set_ylim(1.4, 3.0)
axes[1].set_xlabel("training wall time (s)")
axes[0].legend()
axes[1].legend()
plt.tight_layout()
plt.show()

for name, log in logs.items():
    print(
        f"{name:20s} final validation loss {log['val'][-1]:.3f}   "
        f"{1000 * log['time'][-1] / STEPS:.1f} ms/step"
    )
gap = logs["dense"]["val"][-1] - logs["MoE (Mixtral-style)"]["val"][-1]
print(f"MoE minus dense, validation: {-gap:+.3f} nats/char")

# %% [markdown]
# ## What this does and does not show
#
# - **Per step** (equal active parameters, so roughly equal FLOPs per token), the MoE model should learn
#   faster: it has about 3x the parameters to store what it sees. In our run the gap at the end was a
#   few hundredths of a nat per character in favour of the MoE (another seed gave a similar gap), and it
#   opened up early. That is the central claim, in miniature. (The validation loss sits below the
#   training curve because the training curve is a trailing average, and the last 10% of this corpus
#   happens to be a little easier.)
# - **Per second** the picture is less flattering here. Our experts are a Python loop of $E$ small
#   matmuls plus a sort; at this size that overhead is comparable to the FFN compute it saves, so the
#   MoE's steps are not cheaper than dense steps, they are about as expensive or slower. On a GPU with
#   grouped GEMM kernels, and at widths where the FFN dominates, the wall-time curve moves towards the
#   step curve.
# - **Toy scale caveats.** 500 steps, a 2-layer model and one seed: the difference is real in our runs
#   but small, and a different seed, learning rate or batch could shrink or reverse it. Longer runs and
#   larger models give cleaner results. And "capacity" costs memory: the MoE holds all its experts,
#   about 3x the dense model's parameters, even though each token touches a third of them.
#
# ## Exercises
#
# 1. Train a third model: dense with `ffn_hidden = 8 * 128 = 1024`, the MoE's *total* FFN parameters.
#    Where does the MoE fall between the small dense and the big dense model, per step and per second?
# 2. Replace the Mixtral-style model by the `switch` preset (top-1, $F_e = 4C$, capacity 1.25) and the
#    `deepseek` preset (16 fine-grained experts, top-3, one shared expert, bias balancing), shrunk the
#    same way (keep $K F_e$ + shared $= 4C$). Which wins at equal active parameters?
# 3. Repeat the comparison with three seeds and report the mean and standard deviation of the final
#    validation gap. Is it larger than the seed-to-seed spread?
# 4. With the counting functions of Lesson 12, find what fraction of Mixtral 8x7B's and of DeepSeekMoE
#    16B's total parameters sit in routed experts, and how much of each model's active count is
#    attention.


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from the package's MoE layer (run at build time)."""
    import numpy as np

    from minimoe import Config
    from minimoe.backend import make_rng
    from minimoe.layers import moe  # the MoE layer

    rng = np.random.default_rng(0)
    B, T, C, E, F = 2, 5, 6, 4, 5
    h, dy = rng.standard_normal((B * T, C)), rng.standard_normal((B * T, C))
    out = {"h": h, "dy": dy}
    for k in (2, 1):
        cfg = Config(flavour="llama", vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=C, n_experts=E,
                     top_k=k, expert_hidden=F, aux_loss_coef=0.0, z_loss_coef=0.0)  # fmt: skip
        p = {  # the layer's weights under the prefix "L.", as the model names them (std 0.5: well conditioned)
            "L.router.w": rng.standard_normal((C, E)),
            "L.experts.w1": rng.standard_normal((E, C, F)) * 0.5,
            "L.experts.w3": rng.standard_normal((E, C, F)) * 0.5,
            "L.experts.w2": rng.standard_normal((E, F, C)) * 0.5,
        }
        y, cache, _ = moe.moe_forward(cfg, h.reshape(B, T, C), p, {}, "L.", make_rng(0), training=False)
        grads = {}
        dh = moe.moe_backward(cfg, dy.reshape(B, T, C), cache, "L.", grads)
        out[f"k{k}_y"], out[f"k{k}_ddh"] = y.reshape(-1, C), dh.reshape(-1, C)
        for name in ("router.w", "experts.w1", "experts.w3", "experts.w2"):
            out[f"k{k}_{name}"] = p["L." + name]
            out[f"k{k}_d{name}"] = grads["L." + name]
    out["k2_dh"], out["k1_dh"] = out.pop("k2_ddh"), out.pop("k1_ddh")
    return out
