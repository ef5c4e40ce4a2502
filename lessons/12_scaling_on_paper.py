# %% [markdown]
# # Lesson 12 — Scaling on paper: total vs active parameters, FLOPs and training compute
#
# A Mixture-of-Experts model has **two sizes**. Its *total* parameter count decides how much memory
# it needs; its *active* parameter count — the weights one token actually multiplies — decides how
# much compute each token costs. Mixtral 8x7B holds 46.7B parameters but runs each token through
# 12.9B of them (Jiang et al. 2024). This lesson counts both, by hand, for real models far too large
# to build here. (This is the one place in the course where parameters are counted by hand; Lesson 08
# uses these counts.) The models:
#
# | model | kind | source |
# |---|---|---|
# | GPT-3 175B | dense | Brown et al. 2020, table 2.1 |
# | Mixtral 8x7B | 8 experts, top-2 | Jiang et al. 2024 |
# | DeepSeekMoE 16B | 64 fine-grained experts, top-6, + 2 shared | Dai et al. 2024 |
# | OLMoE-1B-7B | 64 experts, top-8 | Muennighoff et al. 2024 |
# | GPT-4 (rumoured) | 16 experts, top-2 | **an UNCONFIRMED leak** (SemiAnalysis, July 2023) |
#
# OpenAI has never published GPT-4's architecture. The "GPT-4" numbers below come from a 2023 leak
# that has never been confirmed; treat them as an illustration of the arithmetic, not as facts.
#
# You will write the parameter count of one transformer block — attention with grouped-query heads,
# and a dense feed-forward network or a Mixture of Experts — check it against `minimoe.count_params`
# for **every** preset (and against the arrays of the models small enough to build), then derive
# FLOPs per token and the training compute $C \approx 6ND$.

# %%
import json
import math

import matplotlib.pyplot as plt
import numpy as np

from minimoe import PRESETS, count_params, get_preset
from minimoe.gradcheck import check_op
from minimoe.lessons.checks import CheckFailed, case, check_close, check_shape, reference
from minimoe.ops.linear import linear_backward, linear_forward

full_size = ["gpt3-175b", "mixtral-8x7b", "deepseek-moe-16b", "olmoe-1b-7b", "gpt4-rumoured-full"]
keys = [
    "n_layer",
    "n_embd",
    "n_head",
    "n_kv_head",
    "ffn_hidden",
    "n_experts",
    "top_k",
    "expert_hidden",
    "n_shared_experts",
    "vocab_size",
    "activation",
]
print(f"{'preset':20s}" + "".join(f"{k[:10]:>11s}" for k in keys))
for name in full_size:
    c = get_preset(name)
    print(f"{name:20s}" + "".join(f"{str(getattr(c, k)):>11s}" for k in keys))

# %% [markdown]
# ## 1. One block, by hand
#
# Shapes: $C$ channels, $H$ query heads, $H_{kv}$ key/value heads, $D = C/H$ head size, $F$ hidden width,
# $E$ experts, $K$ experts per token. `minimoe` stores (see `minimoe/model.py` and the MoE layer):
#
# **Attention** (grouped-query: Ainslie et al. 2023; $H_{kv} = H$ is ordinary multi-head attention):
# $W_{qkv}$ of shape $C \times (H + 2H_{kv})D$ (queries, keys and values side by side) and
# $W_o$ of shape $HD \times C$; with biases (GPT-2 flavour), $(H + 2H_{kv})D + C$ more.
# For multi-head attention this is the familiar $4C^2$ (+ $4C$).
#
# **Norms**: two per block, $C$ weights each for RMSNorm, $2C$ (gain and bias) for LayerNorm.
#
# **Dense feed-forward** of width $F$: GELU MLP $W_1 (C \times F)$, $W_2 (F \times C)$, plus biases $F + C$
# in the GPT-2 flavour: $2CF$ (+ $F + C$). SwiGLU (Shazeer 2020) has a third matrix $W_3$: $3CF$, no biases.
#
# **Mixture of Experts**: a router $W_r$ of $C \times E$ (twice that for noisy top-$k$, which has a
# second matrix for the noise scale), $E$ experts each a feed-forward network of width $F_e$
# *without biases* in `minimoe` ($3CF_e$ or $2CF_e$), and, DeepSeekMoE-style, $S$ shared experts of
# width $F_s$ that every token uses — stored as one dense FFN of width $S F_s$ (config field
# `shared_hidden` is $F_s$, with biases if the flavour has them).
#
# **Active** per token: everything except the $E - K$ routed experts the token does not use. The router
# and the shared experts are always active.
#
# Whether block $i$ is a MoE block is `c.is_moe_block(i)` (DeepSeekMoE keeps its first block dense).
#
# **Your turn:** write the three counts.


# %%
def attention_params(c):
    """Weights of one attention layer of config c (grouped-query heads, optional biases)."""
    ### BEGIN SOLUTION
    C, H, Hkv, D = c.n_embd, c.n_head, c.n_kv_head, c.head_size
    n = C * (H + 2 * Hkv) * D + H * D * C  # W_qkv and W_o
    if c.bias:
        n += (H + 2 * Hkv) * D + C
    return n
    ### END SOLUTION


# %%
def ffn_params(c, F):
    """Weights of one dense feed-forward network of hidden width F (GELU: 2 matrices, SwiGLU: 3)."""
    ### BEGIN SOLUTION
    C = c.n_embd
    if c.activation == "swiglu":
        return 3 * C * F
    return 2 * C * F + ((F + C) if c.bias else 0)
    ### END SOLUTION


# %%
def block_params(c, i):
    """(total, active) weights of block i: two norms, attention, and a dense FFN or a MoE layer."""
    ### BEGIN SOLUTION
    C = c.n_embd
    norms = 2 * C * (2 if c.norm == "layernorm" else 1)
    common = norms + attention_params(c)
    if not c.is_moe_block(i):
        f = ffn_params(c, c.ffn_hidden)
        return common + f, common + f
    expert = (3 if c.activation == "swiglu" else 2) * C * c.expert_hidden  # no biases in experts
    router = C * c.n_experts * (2 if c.router == "noisy" else 1)
    shared = ffn_params(c, c.n_shared_experts * c.shared_hidden) if c.n_shared_experts else 0
    total = common + router + shared + c.n_experts * expert
    active = common + router + shared + c.top_k * expert
    return total, active
    ### END SOLUTION


# %% [markdown]
# The rest of the model: the token embedding $V \times C$, learned positions $T_{max} \times C$ (GPT-2
# flavour), a final norm, and an output head $C \times V$ unless it is tied to the embedding. All of it
# counts as active (every token uses one row of the embedding and all of the head).


# %%
def plain_layout(c):
    """Whether config c uses only the layouts counted above (not MLA, QK-norm, q/k/v-only biases,
    a gated shared expert or a router bias: docs/families.md counts those)."""
    moe_extras = c.n_experts and (c.shared_gate or c.router_logit_bias)
    return c.attention == "mha" and c.qk_norm == "none" and c.qkv_bias == c.bias and not moe_extras


# %%
def model_params(c):
    """(total, active) weights of the whole model of config c."""
    C = c.n_embd
    embed = c.vocab_size * C + (c.block_size * C if c.pos_emb == "learned" else 0)
    head = 0 if c.tie_embeddings else C * c.vocab_size
    final_norm = C * (2 if c.norm == "layernorm" else 1)
    total = active = embed + head + final_norm
    for i in range(c.n_layer):
        t, a = block_params(c, i)
        total, active = total + t, active + a
    return total, active


# %% [markdown]
# **Checks.** Each count is compared with the arrays of models small enough to build — the toy
# presets, and shrunk copies of the other layouts (GPT-2's GELU with biases and LayerNorm, the
# rumoured GPT-4's GELU experts, DeepSeekMoE's shared experts and dense first block, a noisy router
# with grouped-query heads) — counted from the models' parameter dicts and stored in
# `12_scaling_on_paper.npz`; then with a few values by hand (GPT-3's attention is $4C^2 + 4C$ with
# $C = 12288$; one Mixtral expert is $3 \cdot 4096 \cdot 14336$); finally the whole model, for
# **every** preset, against `minimoe.count_params`.

# %%
# the presets whose layouts this lesson counts (MLA, QK-norm, q/k/v-only biases and gated shared
# experts are docs/families.md's; count_params covers them)
COUNTED_HERE = [n for n in PRESETS if plain_layout(get_preset(n))]
BUILT = {name: get_preset(preset, **overrides) for name, (preset, overrides) in json.loads(str(reference("12", "built"))).items()}  # fmt: skip
gpt3, mixtral = get_preset("gpt3-175b"), get_preset("mixtral-8x7b")


def arrays_of(i, what):
    """Entries counted from built model i's arrays: 'attn', 'ffn' (first dense block), 'shared', 'blocks'."""
    return reference("12", f"built{i}_{what}")


# %% check id=attention_params points=1
FN = "attention_params"
for i, (name, c) in enumerate(BUILT.items()):
    CASE = f"{name} (C={c.n_embd} H={c.n_head} H_kv={c.n_kv_head} bias={c.bias})"
    with case(FN, CASE):
        n = attention_params(c)
    check_shape(FN, CASE, "count", n, (), "iu")
    check_close(FN, CASE, "count (vs the built model's attention arrays)", n, arrays_of(i, "attn"), 0)
for name, c, want, what in (("gpt3-175b", gpt3, 4 * 12288**2 + 4 * 12288, "4 C^2 + 4 C"),
                            ("mixtral-8x7b", mixtral, 4096 * (32 + 2 * 8) * 128 + 4096 * 4096, "GQA: 8 key/value heads")):  # fmt: skip
    CASE = f"{name} by hand ({what})"
    with case(FN, CASE):
        n = attention_params(c)
    check_close(FN, CASE, "count", n, np.asarray(want), 0)
print("attention_params is correct")

# %% check id=ffn_params points=1
FN = "ffn_params"
for i, (name, c) in enumerate(BUILT.items()):
    for what, F in (("ffn", c.ffn_hidden), ("shared", c.n_shared_experts * c.shared_hidden)):
        want = arrays_of(i, what)
        if want < 0:  # this model has no such network
            continue
        CASE = f"{name}: {'dense FFN' if what == 'ffn' else 'shared experts'} (C={c.n_embd} F={F} {c.activation} bias={c.bias})"
        with case(FN, CASE):
            n = ffn_params(c, F)
        check_shape(FN, CASE, "count", n, (), "iu")
        check_close(FN, CASE, "count (vs the built model's arrays)", n, want, 0)
CASE = "mixtral-8x7b expert by hand (3 C F, C=4096 F=14336)"
with case(FN, CASE):
    n = ffn_params(mixtral, 14336)
check_close(FN, CASE, "count", n, np.asarray(3 * 4096 * 14336), 0)
print("ffn_params is correct")

# %% check id=block_params points=2
FN = "block_params"
for i, (name, c) in enumerate(BUILT.items()):
    for layer in range(c.n_layer):
        CASE = f"{name} block {layer} ({'MoE' if c.is_moe_block(layer) else 'dense'})"
        with case(FN, CASE):
            counts = block_params(c, layer)
        if not isinstance(counts, tuple) or len(counts) != 2:
            raise CheckFailed(f"{FN}, case {CASE}: return a tuple (total, active), got {counts!r}")
        check_close(
            FN, CASE, "total (vs the built model's arrays)", counts[0], arrays_of(i, "blocks")[layer], 0
        )
for name in COUNTED_HERE:
    c = get_preset(name)
    CASE = f"{name}, the whole model with your block_params"
    with case(FN, CASE):
        ours = model_params(c)
    ref = reference("12", "count_" + name.replace("-", "_"))  # (total, active) from minimoe.count_params
    check_close(FN, CASE, "(total, active)", np.asarray(ours), ref, 0)
    print(f"{name:20s} total {ours[0]:>16,d}  active {ours[1]:>16,d}")
print("block_params is correct: every preset matches minimoe.count_params")

# %% [markdown]
# The toy presets of this course are *matched in active parameters* (1.1M each): the MoE variants hold
# 3–6x more weights at the same compute per token.
#
# ## 2. Against the published numbers
#
# How close do the configurations in `minimoe.presets` come to what the papers report?

# %%
published = {  # (total, active) in billions, as reported
    "gpt3-175b": (175.0, 175.0),
    "mixtral-8x7b": (46.7, 12.9),
    "deepseek-moe-16b": (16.4, 2.8),
    "olmoe-1b-7b": (6.9, 1.3),
    "gpt4-rumoured-full": (1800.0, 280.0),  # UNCONFIRMED leak
}
counts = {name: count_params(get_preset(name)) for name in full_size}
print(f"{'model':20s} {'total (ours)':>13s} {'reported':>9s} {'active (ours)':>14s} {'reported':>9s}")
for name in full_size:
    t, a = counts[name]["total"] / 1e9, counts[name]["active"] / 1e9
    pt, pa = published[name]
    flag = "   <- UNCONFIRMED leak" if "gpt4" in name else ""
    print(f"{name:20s} {t:12.1f}B {pt:8.1f}B {a:13.1f}B {pa:8.1f}B{flag}")
    assert abs(t / pt - 1) < 0.03 and abs(a / pa - 1) < 0.03

# %% [markdown]
# (The remaining differences are rounding in the papers, and small parts `minimoe` does not model,
# such as OLMoE's normalisation of queries and keys.)

# %%
fig, ax = plt.subplots(figsize=(7, 3.6))
xs = np.arange(len(full_size))
ax.bar(xs - 0.2, [counts[n]["total"] for n in full_size], 0.4, label="total (memory)")
ax.bar(xs + 0.2, [counts[n]["active"] for n in full_size], 0.4, label="active per token (compute)")
ax.set_xticks(xs)
ax.set_xticklabels(
    [n.replace("gpt4-rumoured-full", "GPT-4\n(rumoured,\nunconfirmed)") for n in full_size], fontsize=8
)
ax.set_yscale("log")
ax.set_ylabel("parameters")
ax.legend()
ax.set_title("total vs active parameters")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. FLOPs per token
#
# A matmul $y = xW$ with $W$ of shape $C_{in} \times C_{out}$ costs $2 C_{in} C_{out}$ floating-point
# operations per token (a multiply and an add per weight). So the forward pass costs about **2 FLOPs
# per active matmul weight** (Kaplan et al. 2020, table 1), plus the attention itself, which has no
# weights: the scores $q k^\top$ and the weighted sum $p v$ cost $2 \cdot 2 \cdot T \cdot HD$ per token
# and layer at context $T$:
#
# $$\text{forward FLOPs per token} \approx 2 N_{\text{active matmul}} + 4\, L\, T\, H D$$
#
# (PaLM, Chowdhery et al. 2022, appendix B; the embedding lookup is not a matmul and costs nothing).
# `count_params` computes this at $T$ = `block_size`. For a dense model the first term is $\approx 2N$; for
# a Mixture of Experts it follows the *active* count, so MoE models sit below the dense line:

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for name in ["gpt2-124m"] + full_size:
    r = count_params(get_preset(name))
    moe = get_preset(name).n_experts > 0
    ax.scatter(
        r["total"], r["flops_per_token"], marker="o" if moe else "s", s=50, color="C1" if moe else "C0"
    )
    left = "gpt4" in name  # label on the left, inside the axes
    ax.annotate(
        name + (" (unconfirmed)" if left else ""),
        (r["total"], r["flops_per_token"]),
        fontsize=7,
        xytext=(-6 if left else 5, 6 if left else -3),
        textcoords="offset points",
        ha="right" if left else "left",
    )
line = np.logspace(8, 12.5, 10)
ax.plot(line, 2 * line, "k--", lw=0.8, label="dense: 2 FLOPs per parameter")
ax.scatter([], [], marker="s", color="C0", label="dense")
ax.scatter([], [], marker="o", color="C1", label="mixture of experts")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("total parameters")
ax.set_ylabel("forward FLOPs per token")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
for name in full_size:
    r = count_params(get_preset(name))
    print(
        f"{name:20s} {r['flops_per_token'] / 1e9:8.1f} GFLOPs per token  "
        f"= {r['flops_per_token'] / (2 * r['total']):.2f} x (2 x total)"
    )

# %% [markdown]
# Mixtral holds 3.6x more weights than a dense model of its per-token cost; the (rumoured) GPT-4 about
# 6.5x; DeepSeekMoE and OLMoE, with many small experts, 5–6x.
#
# ## 4. Why training costs 6 FLOPs per parameter and token
#
# The backward pass of $y = xW$ needs two matmuls of the same size as the forward's:
#
# $$\frac{\partial L}{\partial x} = \frac{\partial L}{\partial y} W^\top, \qquad
#   \frac{\partial L}{\partial W} = x^\top \frac{\partial L}{\partial y},$$
#
# each $2 C_{in} C_{out}$ FLOPs per token. Forward + backward = $3 \times 2 = 6$ FLOPs per weight and token,
# hence the rule $C \approx 6 N D$ for $N$ parameters and $D$ training tokens (Kaplan et al. 2020,
# section 2.1). A float64 gradient check confirms that those two matmuls *are* the gradients (the
# package's `linear_backward` computes exactly them), and we count their FLOPs:

# %%
rng = np.random.default_rng(0)
Ntok, Cin, Cout = 6, 4, 5
x, W = rng.standard_normal((Ntok, Cin)), rng.standard_normal((Cin, Cout))
# linear_backward returns (dx, dW, db); without a bias we check the first two
errs = check_op(
    linear_forward, lambda dy, cache: linear_backward(dy, cache)[:2], [x, W, None], wrt=[0, 1], eps=1e-5
)
print("rel errors dx, dW:", {k: f"{v:.1e}" for k, v in errs.items()})
assert max(errs.values()) <= 1e-6
dy = rng.standard_normal((Ntok, Cout))
dx, dW, _ = linear_backward(dy, linear_forward(x, W, None)[1])
assert np.allclose(dx, dy @ W.T) and np.allclose(dW, x.T @ dy)


def matmul_flops(a_shape, b_shape):
    """FLOPs of (n, k) @ (k, m): one multiply and one add per (n, m, k)."""
    (n, k), (_, m) = a_shape, b_shape
    return 2 * n * k * m


fwd = matmul_flops(x.shape, W.shape)
bwd = matmul_flops(dy.shape, W.T.shape) + matmul_flops(x.T.shape, dy.shape)
print(f"forward {fwd} FLOPs, backward {bwd} FLOPs: backward / forward = {bwd / fwd:.0f}")
assert bwd == 2 * fwd

# %% [markdown]
# ## 5. Training compute
#
# With $N$ the **active** parameters, $C \approx 6 N D$. A first sanity check: GPT-3 175B was trained on
# 300B tokens, and Brown et al. (2020, table D.1) report $3.14 \times 10^{23}$ FLOPs.


# %%
def train_flops(name, tokens):
    """6 N D with N = active parameters of preset `name`."""
    return 6 * count_params(get_preset(name))["active"] * tokens


print(f"GPT-3: 6 N D = {train_flops('gpt3-175b', 300e9):.3g} FLOPs (reported 3.14e23)")
assert abs(train_flops("gpt3-175b", 300e9) / 3.14e23 - 1) < 0.01

# %% [markdown]
# The same estimate for every model: at a common budget of 1T tokens, and at the budgets the authors
# reported (Mixtral's was not disclosed; GPT-4's ~13T is again the **unconfirmed** leak). The last
# column converts the reported budget to days on 1024 H100 GPUs at 989 TFLOP/s (bf16 dense peak) and
# 40% utilisation — a typical model-FLOPs utilisation for large runs. `count_params` also gives the
# training FLOPs per token *including* the attention term at full context ($3\times$ the forward), shown
# as the ratio to $6N$: attention adds a few percent at contexts of 2k–8k tokens, but two thirds more
# for Mixtral counted at its full 32k context.

# %%
budgets = {
    "gpt3-175b": 300e9,
    "mixtral-8x7b": None,
    "deepseek-moe-16b": 2e12,
    "olmoe-1b-7b": 5e12,
    "gpt4-rumoured-full": 13e12,
}
h100 = 1024 * 989e12 * 0.40  # FLOP/s of the cluster
print(
    f"{'model':20s} {'6ND @ 1T':>10s} {'tokens':>8s} {'6ND @ reported':>15s} {'1024 H100 days':>15s}"
    f" {'attn-incl / 6N':>15s}"
)
for name in full_size:
    r = count_params(get_preset(name))
    at_1t = train_flops(name, 1e12)
    D = budgets[name]
    rep = f"{train_flops(name, D):15.2e}" if D else f"{'n/a':>15s}"
    days = f"{train_flops(name, D) / h100 / 86400:15.1f}" if D else f"{'n/a':>15s}"
    tokens = f"{D / 1e12:7.1f}T" if D else f"{'?':>8s}"
    flag = "  <- UNCONFIRMED" if "gpt4" in name else ""
    attn_ratio = r["train_flops_per_token"] / (6 * r["active"])
    print(f"{name:20s} {at_1t:10.2e} {tokens} {rep} {days} {attn_ratio:15.2f}{flag}")

# %% [markdown]
# The rumoured GPT-4 figure (about $2 \times 10^{25}$ FLOPs, three months on ~25,000 A100s in the leak)
# is of the same order as our $6ND$ estimate — which only shows that the leak is arithmetically
# consistent with itself, not that it is true.
#
# What the counts say, in one line each:
# * **memory** follows the total: serving Mixtral in bf16 needs $2 \times 46.7$B bytes ≈ 87 GiB of
#   weights, like a 47B dense model;
# * **compute** follows the active count: each token costs what a 13B dense model costs, in training
#   and in inference;
# * so a MoE model trades memory (and the communication to reach its experts) for capacity at a fixed
#   FLOP budget — the trade-off the toy presets of this course let you measure on a laptop.

# %% [markdown]
# ## Exercises
#
# 1. **A dense model of your choice.** Build the `Config` of Llama-3 70B (`flavour="llama"`, 80 layers,
#    $C = 8192$, 64 heads, 8 key/value heads, $F = 28672$, vocabulary 128,256, `counted_only=True`) and
#    count it with your `model_params`. Meta reports 70B; what fraction is attention?
# 2. **Where does Mixtral keep its weights?** Split Mixtral's total into embeddings + head, attention,
#    and experts. Which share would grouped-query attention with $H_{kv} = H$ (multi-head) change, and
#    by how much?
# 3. **Fine-grained experts.** DeepSeekMoE splits each expert into smaller ones and routes to more of
#    them at the same active count. Compare the number of possible expert combinations per token,
#    $\binom{E}{K}$, for Mixtral ($\binom{8}{2}$), OLMoE ($\binom{64}{8}$) and DeepSeekMoE ($\binom{64}{6}$)
#    with `math.comb`. Why might more combinations help?
# 4. **When does attention matter?** The attention term $4LTHD$ grows with the context $T$. At which
#    context length does it equal the matmul term $2N_{\text{active}}$ for GPT-3, and for Mixtral?
#    (Use `count_params(get_preset(name, block_size=T))`.)


# %% references
def references():
    """Expected counts for this lesson's checks: entries counted from built models' parameter dicts, and
    minimoe.count_params for every preset (run at build time)."""
    import json

    import numpy as np

    from minimoe import GPT, PRESETS, count_params, get_preset

    small = dict(
        n_layer=2, n_embd=32, n_head=4, n_kv_head=4, vocab_size=64, block_size=16, counted_only=False
    )
    def plain_layout(c):  # as the lesson's: the layouts it counts
        moe_extras = c.n_experts and (c.shared_gate or c.router_logit_bias)
        return c.attention == "mha" and c.qk_norm == "none" and c.qkv_bias == c.bias and not moe_extras

    plain = [n for n in PRESETS if plain_layout(get_preset(n))]
    built = {name: (name, {}) for name in plain if not get_preset(name).counted_only}  # the toy presets
    built.update({
        "gpt2-124m layout, small": ("gpt2-124m", dict(small, ffn_hidden=128)),
        "gpt4-rumoured-full layout, small": ("gpt4-rumoured-full", dict(small, expert_hidden=16)),
        "deepseek-moe-16b layout, small": ("deepseek-moe-16b", dict(small, ffn_hidden=64, expert_hidden=8, shared_hidden=8)),
        "mixtral, noisy router, 2 kv heads": ("mixtral", {"router": "noisy", "n_kv_head": 2}),
    })  # fmt: skip
    out = {"built": np.array(json.dumps(built))}
    for i, (preset, overrides) in enumerate(built.values()):
        c = get_preset(preset, **overrides)
        params = GPT(c, seed=0).params

        def size(prefix, params=params):
            return sum(v.size for k, v in params.items() if k.startswith(prefix))

        dense = [b for b in range(c.n_layer) if not c.is_moe_block(b)]
        out[f"built{i}_attn"] = np.array(size("blocks.0.attn."))
        out[f"built{i}_ffn"] = np.array(size(f"blocks.{dense[0]}.mlp.") if dense else -1)
        moe = [b for b in range(c.n_layer) if c.is_moe_block(b)]
        out[f"built{i}_shared"] = np.array(size(f"blocks.{moe[0]}.moe.shared.") if c.n_shared_experts else -1)
        out[f"built{i}_blocks"] = np.array([size(f"blocks.{b}.") for b in range(c.n_layer)])
    for name in plain:
        n = count_params(get_preset(name))
        out["count_" + name.replace("-", "_")] = np.array([n["total"], n["active"]])
    return out
