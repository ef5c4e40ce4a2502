# %% [markdown]
# # Lesson 10 — Generation with a KV cache
#
# A language model generates text one token at a time: it reads the context $x_1 \dots x_t$, predicts
# $p(x_{t+1} \mid x_{\le t})$, picks a token, appends it, and repeats. The obvious loop runs the whole
# model on the whole context at every step. This lesson shows why that is wasteful (quadratic in the
# length), what can be kept from one step to the next (the **keys and values** of every layer), and
# the two details that make the cached version give *exactly* the same tokens as full recomputation:
# positions that start at an **offset**, and a causal mask for **fewer queries than keys**.
#
# You will build:
# 1. the causal mask for $T_q < T_k$,
# 2. a greedy generation loop that uses `minimoe`'s `KVCache`, checked token for token against full
#    recomputation on a dense and a Mixture-of-Experts model,
# 3. the formula for the cache's memory, and use it to compare multi-head, grouped-query and
#    multi-query attention at the size of real models.
#
# References: Vaswani et al. 2017 (attention, eq. 1); Shazeer 2019, *Fast Transformer Decoding: One
# Write-Head is All You Need* (multi-query attention); Ainslie et al. 2023, *GQA* (grouped-query
# attention); Pope et al. 2022, *Efficiently Scaling Transformer Inference* (the memory cost of the
# cache); Su et al. 2021, *RoFormer* (rotary positions).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minimoe
from minimoe.data import builtin_corpus
from minimoe.gradcheck import check_op, rel_error
from minimoe.layers.attention import KVCache
from minimoe.lessons.checks import CheckFailed, case, check_close, check_shape, reference
from minimoe.ops.attention import (
    causal_attention_backward,
    causal_attention_forward,
    rope_forward,
    rope_tables,
)
from minimoe.tokenizer import CharTokenizer

text = builtin_corpus()
tok = CharTokenizer.from_text(text)
V = tok.vocab_size
print(f"{len(text):,} characters of Python documentation, vocabulary of {V} characters")

# %% [markdown]
# ## 1. Recomputation is quadratic
#
# Here is the loop that needs no new idea: at every step, run the model on everything so far and take
# the most likely next token (greedy decoding). `model.forward(idx)` returns logits $(B, T, V)$; only
# the last position's row predicts the next token.


# %%
def generate_recompute(model, idx, max_new_tokens):
    """idx (B, T0) integer -> (B, T0 + max_new_tokens): greedy decoding, the whole context every step."""
    for _ in range(max_new_tokens):
        logits, _ = model.forward(idx)  # (B, T, V): T grows by one each step
        nxt = logits[:, -1, :].argmax(axis=-1)[:, None]  # (B, 1) the most likely next token
        idx = np.concatenate([idx, nxt], axis=1)
    return idx


# %% [markdown]
# Count the work. A model with $P$ weights in its matrices spends about $2P$ multiply-adds per token
# in its matmuls, plus about $4\,L\,t\,C$ for the attention scores and their weighted sum over $t$
# earlier tokens ($L$ layers, $C$ channels). Generating step $t$ by recomputation runs all $t$ tokens:
#
# $$\text{cost}(t) \approx 2P\,t + 4LC\,t^2, \qquad
#   \sum_{t=1}^{n} \text{cost}(t) \approx P\,n^2 + \tfrac{4}{3} L C\, n^3 .$$
#
# But almost all of it was computed before. In a causal transformer the hidden state of position $j$ in
# every layer depends only on tokens $\le j$ (the mask sees to that), so it **never changes** when
# later tokens arrive. When the new token at position $t$ passes through layer $l$, the only things it
# needs from the past are the **keys and values** of earlier positions in that layer:
#
# $$y_t = \sum_{j \le t} \operatorname{softmax}_j\!\Big(\frac{q_t \cdot k_j}{\sqrt{D}}\Big)\, v_j .$$
#
# The past queries are never used again, and nor are the past hidden states. So we keep, per layer,
# $K$ and $V$ of shape $(B, H_{kv}, T, D)$ — the **KV cache** — and each step runs the model on *one*
# token: cost $2P + 4LC\,t$, and $Pn\cdot 2 + 2LC\,n^2$ in total: linear in $n$ for the weights.
#
# `minimoe.layers.attention.KVCache` is exactly that: two lists (keys, values) of zero arrays
# $(B, H_{kv}, T_{max}, D)$, one pair per layer, and a counter `pos` of filled positions. The attention
# layer writes this call's keys and values at `pos .. pos+T-1` and attends over `0 .. pos+T-1`; the model
# advances `pos` by $T$ after the last layer.

# %%
cache = KVCache(n_layer=2, B=1, n_kv_head=2, T_max=16, D=8)
print("per layer: k", cache.k[0].shape, "v", cache.v[0].shape, "filled:", cache.pos)

# %% [markdown]
# ## 2. Positions start at an offset
#
# A token fed alone at step $t$ is still at position $t$, not 0. `model.forward(idx, kv_cache=cache)`
# reads the offset $p_0$ = `cache.pos` and uses the positions $p_0 \dots p_0 + T - 1$:
#
# * learned positions (GPT-2): add rows $p_0 \dots p_0+T-1$ of `wpe`;
# * rotary positions (RoPE, Llama/Mixtral): rotate pair $i$ of each query and key by the angle
#   $(p_0 + t)\,\theta^{-2i/D}$, i.e. take rows $p_0 \dots p_0+T-1$ of the cos/sin tables.
#
# Keys are rotated **before** they are stored, at their own position, and never touched again. That
# works because RoPE makes the score depend only on the *distance* between query and key:
# $\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle$ (a rotation by $m$ then the inverse rotation
# by $m$). Both facts, checked:

# %%
D = 8
cos_all, sin_all = rope_tables(32, D, dtype="float64")
cos_off, sin_off = rope_tables(5, D, offset=20, dtype="float64")  # positions 20..24 only
assert np.array_equal(cos_off, cos_all[20:25]) and np.array_equal(sin_off, sin_all[20:25])

rng = np.random.default_rng(0)
q, k = rng.standard_normal((1, 1, 1, D)), rng.standard_normal((1, 1, 1, D))


def rotated_score(m, n):
    """q at position m, k at position n, both rotated by RoPE: <R_m q, R_n k>."""
    qm, _ = rope_forward(q, cos_all[m : m + 1], sin_all[m : m + 1])
    kn, _ = rope_forward(k, cos_all[n : n + 1], sin_all[n : n + 1])
    return float((qm * kn).sum())


scores = [rotated_score(m, m - 4) for m in (7, 17, 27)]
print("<R_m q, R_n k> at (m, n) = (7, 3), (17, 13), (27, 23):", np.round(scores, 12))
assert abs(rotated_score(7, 3) - rotated_score(27, 23)) < 1e-12

# %% [markdown]
# ## 3. The causal mask with fewer queries than keys
#
# In training, $T_q = T_k = T$ and query $i$ may see keys $j \le i$: a lower-triangular mask. With a
# cache, the $T_q$ queries of this call are the **last** $T_q$ of the $T_k$ positions: query $i$ sits at
# absolute position $T_k - T_q + i$ and may see keys $j \le T_k - T_q + i$. With $T_q = 1$ (one new
# token) it may see everything; with $T_q = T_k$ (the first call, "prefill" of the prompt) it is the
# usual triangle. A mask that ignores the offset would hide all but the first key from the new token.
#
# **Your turn:** write the mask.


# %%
def causal_mask(Tq, Tk):
    """(Tq, Tk) bool: True where query i (absolute position Tk - Tq + i) may attend to key j."""
    ### BEGIN SOLUTION
    query_pos = np.arange(Tq)[:, None] + (Tk - Tq)  # (Tq, 1) absolute positions of the queries
    key_pos = np.arange(Tk)[None, :]  # (1, Tk)
    return key_pos <= query_pos
    ### END SOLUTION


# %% [markdown]
# **Check.** Your mask against the keys that the package's `causal_attention_forward` lets each query
# see (stored in `10_kv_cache.npz`), for several $(T_q, T_k)$. Then attention written out with your
# mask (softmax over allowed keys, Vaswani et al. eq. 1) must give the package's outputs for
# $T_q < T_k$ with grouped-query heads ($H = 4$ query heads sharing $H_{kv} = 2$ key/value heads:
# head $h$ reads key/value head $h // 2$), which are also the **last $T_q$ rows** of full attention
# over all $T_k$ positions: that is the statement "the cache changes nothing".


# %%
def attention_with_mask(q, k, v, mask):
    """q (B, H, Tq, D), k and v (B, Hkv, Tk, D), mask (Tq, Tk) -> (B, H, Tq, D)."""
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # (B, H, Tk, D): head h reads kv head h // g
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ v


MASK_SIZES = ((3, 7), (1, 5), (4, 4), (1, 1), (2, 9))

# %% check id=causal_mask points=2
FN = "causal_mask"
for Tq, Tk in MASK_SIZES:
    CASE = f"Tq={Tq} Tk={Tk}"
    with case(FN, CASE):
        m = causal_mask(Tq, Tk)
    check_shape(FN, CASE, "mask", m, (Tq, Tk), "b")
    check_close(FN, CASE, "mask", m, reference("10", f"mask_{Tq}_{Tk}"), 0)
q, k, v = (reference("10", f"att_{n}") for n in "qkv")
Tq, Tk = q.shape[2], k.shape[2]
CASE = f"attention with your mask, q {q.shape} k, v {k.shape}"
with case(FN, CASE):
    ours = attention_with_mask(q, k, v, causal_mask(Tq, Tk))
check_close(FN, CASE, "output", ours, reference("10", "att_y"), 1e-12)
check_close(
    FN,
    CASE,
    "output (vs the last rows of full attention)",
    ours,
    reference("10", "att_full_last_rows"),
    1e-12,
)
print("causal_mask: OK")

# %% [markdown]
# The two masks side by side: training ($T_q = T_k = 8$) and a cached call that adds $T_q = 3$ tokens
# after 5 cached ones ($T_k = 8$). The rows of the right-hand mask are the bottom three rows of the left.

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
for ax, (tq, tk) in zip(axes, [(8, 8), (3, 8)]):
    ax.imshow(causal_mask(tq, tk), cmap="Greens", vmin=0, vmax=1.3)
    ax.set_title(f"Tq = {tq}, Tk = {tk}")
    ax.set_xlabel("key position j")
    ax.set_ylabel("query i")
    ax.set_yticks(range(tq))
    ax.set_yticklabels([f"{i} (pos {tk - tq + i})" for i in range(tq)], fontsize=7)
fig.suptitle("allowed (green): key j <= the query's absolute position")
plt.tight_layout()
plt.show()

# %% [markdown]
# The backward of this attention also handles $T_q < T_k$ (useful when a long prompt is fed in chunks
# and trained on, or for gradients with respect to a cached prefix). A float64 gradient check of
# `causal_attention_backward` with $T_q = 3 < T_k = 7$ and grouped-query heads: the gradients for
# $k$ and $v$ sum over the 2 query heads that read each key/value head.

# %%
q, k, v = (reference("10", f"att_{n}") for n in "qkv")  # Tq = 3 queries, Tk = 7 keys
errs = check_op(causal_attention_forward, causal_attention_backward, [q, k, v], eps=1e-5)
print("rel errors dq, dk, dv:", {i: f"{e:.1e}" for i, e in errs.items()})
assert max(errs.values()) <= 1e-6

# %% [markdown]
# ## 4. The generation loop with a cache
#
# Two phases:
#
# * **prefill**: one `model.forward(prompt, kv_cache=cache)` over all $T_0$ prompt tokens
#   ($T_q = T_k = T_0$) fills positions $0 \dots T_0-1$ of every layer's cache and gives the logits of
#   the first new token;
# * **decode**: then, per new token, `model.forward(next_token, kv_cache=cache)` with shape $(B, 1)$:
#   it is written at position `cache.pos` and attends to everything before it.
#
# The cache must have room for every position that is fed in (the last generated token is never fed
# back), be on the model's backend (`xp=model.xp`), and have the model's dtype (`dtype=model.dtype`: a
# float32 cache under a float64 model would silently round the keys). Use `model.config` for the sizes
# (`n_layer`, `n_kv_head`, `head_size`). The model must be in `eval()` mode (no dropout) — which the
# check below does for you.
#
# **Your turn:** write greedy generation with a cache.


# %%
def generate_cached(model, idx, max_new_tokens):
    """idx (B, T0) integer -> (B, T0 + max_new_tokens): greedy decoding with a KV cache."""
    ### BEGIN SOLUTION
    c = model.config
    B, T0 = idx.shape
    T_max = T0 + max_new_tokens  # room for every position fed in
    cache = KVCache(c.n_layer, B, c.n_kv_head, T_max, c.head_size, xp=model.xp, dtype=model.dtype)
    logits, _ = model.forward(idx, kv_cache=cache)  # prefill: (B, T0, V), cache.pos = T0
    out = [idx]
    for step in range(max_new_tokens):
        nxt = logits[:, -1, :].argmax(axis=-1)[:, None]  # (B, 1)
        out.append(nxt)
        if step + 1 < max_new_tokens:
            logits, _ = model.forward(nxt, kv_cache=cache)  # decode: (B, 1, V), cache.pos += 1
    return np.concatenate(out, axis=1)
    ### END SOLUTION


# %% [markdown]
# **Check.** Four tiny models — a GPT-2-style dense model (learned positions, multi-head), a
# Llama-style dense model (RoPE, grouped-query), a Mixtral-style MoE (top-2 of 8) and a DeepSeek-style
# MoE (fine-grained top-3 of 16 + a shared expert) — must generate **exactly** the tokens of full
# recomputation (`generate_recompute` above, run here on the same model), for a batch of two prompts.
#
# Why float64? The cached and the recomputed logits are mathematically equal but not bit-identical:
# a matmul over 1 row and one over $T$ rows may sum in different orders. In float64 they agree to
# ~1e-13, far below any gap between the two best tokens; in float32 (~1e-6) a near-tie could, very
# rarely, flip an argmax. The weights have a large init (`init_std=0.5`) so that the models' outputs
# depend strongly on position and context: a loop that gets the positions or the mask wrong then
# produces different tokens, as the last lines show.

# %%
tiny = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32, init_std=0.5)
models = {
    "gpt2 dense": minimoe.Config(flavour="gpt2", ffn_hidden=64, **tiny),
    "llama dense, GQA": minimoe.get_preset("dense", n_kv_head=2, ffn_hidden=64, **tiny),
    "mixtral MoE": minimoe.get_preset("mixtral", n_kv_head=2, expert_hidden=32, **tiny),
    "deepseek MoE": minimoe.get_preset("deepseek", expert_hidden=16, shared_hidden=16, **tiny),
}
prompts = np.array([tok.encode("def f(x):\n    return"), tok.encode("The import statement")[:20]])
n_new = 30

# %% check id=generate_cached points=3
FN = "generate_cached"
for name, config in models.items():
    model = minimoe.GPT(config, seed=0, dtype="float64").eval()
    want = generate_recompute(model, prompts, n_new)
    CASE = f"{name}, prompts {prompts.shape}, {n_new} new tokens"
    with case(FN, CASE):
        got = generate_cached(model, prompts, n_new)
    check_shape(FN, CASE, "tokens", got, want.shape, "iu")
    check_close(FN, CASE, "tokens (vs recomputation)", got, want, 0)
    print(f"{name:18s} identical: {tok.decode(got[0, -n_new:])!r}")
print("generate_cached: OK")

# %% [markdown]
# The same check catches a loop that forgets the cache: each new token then sees only itself, at
# position 0.

# %%
model = minimoe.GPT(models["llama dense, GQA"], seed=0, dtype="float64").eval()
want = generate_recompute(model, prompts, n_new)
logits, _ = model.forward(prompts)
forgetful = [prompts]
for _ in range(n_new):
    nxt = logits[:, -1].argmax(-1)[:, None]
    forgetful.append(nxt)
    logits, _ = model.forward(nxt)
print("without the cache the tokens differ:", not np.array_equal(np.concatenate(forgetful, 1), want))

# %% [markdown]
# How close are the logits? Prefill 40 tokens with the cache, feed the 41st alone, and compare its
# logits with those of one forward over all 41 — in float64 and in float32.

# %%
ids = np.array([tok.encode("for i in range(10): print(i) # comment here")[:41]])
for dtype in ("float64", "float32"):
    model = minimoe.GPT(models["mixtral MoE"], seed=0, dtype=dtype).eval()
    full, _ = model.forward(ids)
    c = model.config
    kv = KVCache(c.n_layer, 1, c.n_kv_head, 41, c.head_size, dtype=dtype)
    model.forward(ids[:, :40], kv_cache=kv)
    last, _ = model.forward(ids[:, 40:], kv_cache=kv)
    print(f"{dtype}: max |cached - full| / max |full| = {rel_error(last[:, 0], full[:, -1]):.1e}")

# %% [markdown]
# ## 5. Time per generated token
#
# Now the payoff, measured on a small float32 model (2 layers, $C = 64$, context up to 256). For each
# length $t$ we time one decoding step both ways: recomputation runs `forward` on all $t$ tokens; the
# cached step runs `forward` on one token after a cache of $t - 1$ (we reset `cache.pos` to repeat the
# same step; the minimum over repeats filters out noise from other programs).

# %%
cfg_t = minimoe.get_preset("dense", vocab_size=V, block_size=256, n_layer=2, n_embd=64, ffn_hidden=256)
model_t = minimoe.GPT(cfg_t, seed=0).eval()
seq = np.random.default_rng(0).integers(0, V, (1, 256))
lengths = [1, 32, 64, 96, 128, 160, 192, 224, 256]
t_full, t_cached = [], []
for t in lengths:
    reps = []
    for _ in range(3):
        t0 = time.perf_counter()
        model_t.forward(seq[:, :t])
        reps.append(time.perf_counter() - t0)
    t_full.append(min(reps))
    kv = KVCache(cfg_t.n_layer, 1, cfg_t.n_kv_head, 256, cfg_t.head_size)
    if t > 1:
        model_t.forward(seq[:, : t - 1], kv_cache=kv)
    reps = []
    for _ in range(5):
        kv.pos = t - 1  # rewind: the same step again
        t0 = time.perf_counter()
        model_t.forward(seq[:, t - 1 : t], kv_cache=kv)
        reps.append(time.perf_counter() - t0)
    t_cached.append(min(reps))

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(lengths, np.array(t_full) * 1e3, "o-", label="recompute all t tokens")
ax.plot(lengths, np.array(t_cached) * 1e3, "s-", label="one token + KV cache")
ax.set_xlabel("position t of the generated token")
ax.set_ylabel("time for this token (ms)")
ax.set_yscale("log")
ax.legend()
ax.set_title("cost of one decoding step")
plt.tight_layout()
plt.show()
print(
    "total for 256 tokens (trapezoid over the curve): recompute "
    f"{np.trapezoid(t_full, lengths):.2f} s, cached {np.trapezoid(t_cached, lengths):.3f} s"
)

# %% [markdown]
# The recomputed step grows with $t$ (here mostly the matmuls over $t$ rows; the $t^2$ attention term
# takes over at long contexts), while the cached step barely moves: at this size it is dominated by a
# fixed cost per call (Python and ~50 small array operations), and its $O(t)$ attention over the cache
# is tiny. On a GPU the cached step is limited by *reading* the weights and the cache from memory,
# which is why the cache's size matters — the next section.
#
# If your recompute curve jumps by 100x somewhere instead of rising smoothly, other programs are
# competing for your CPU cores: once the matrices are big enough, the BLAS library splits each matmul
# over several threads, and those threads then wait for each other. Restart the kernel with the
# environment variable `OPENBLAS_NUM_THREADS=1` (or `OMP_NUM_THREADS=1`) for a clean curve.

# %% [markdown]
# ## 6. How big is the cache?
#
# Per token, every layer stores one key and one value vector per key/value head:
#
# $$\text{bytes} = 2 \times L \times H_{kv} \times D \times T \times B \times \text{bytes per number}$$
#
# (2 for K and V). Multi-head attention has $H_{kv} = H$; **multi-query** attention (Shazeer 2019)
# shares one key/value head among all query heads ($H_{kv} = 1$); **grouped-query** attention (Ainslie
# et al. 2023) sits in between ($H_{kv}$ groups, e.g. 8 in Mixtral), cutting the cache by $H / H_{kv}$.
#
# **Your turn:** write the formula.


# %%
def kv_cache_bytes(config, T, B=1, bytes_per_number=2):
    """Bytes of the keys and values of all layers for B sequences of T tokens (fp16/bf16 by default)."""
    ### BEGIN SOLUTION
    c = config
    return 2 * c.n_layer * c.n_kv_head * c.head_size * T * B * bytes_per_number
    ### END SOLUTION


# %% [markdown]
# **Check** against the arrays that `KVCache` really allocates (float32: 4 bytes) for the four tiny
# models, and against a number computed by hand: Mixtral 8x7B stores
# $2 \cdot 32 \cdot 8 \cdot 128 \cdot 2 = 131{,}072$ bytes = 128 KiB per token in bf16.

# %% check id=kv_cache_bytes points=1
FN = "kv_cache_bytes"
for name, c in models.items():
    kv = KVCache(c.n_layer, 3, c.n_kv_head, 50, c.head_size, dtype="float32")
    allocated = sum(a.nbytes for a in kv.k + kv.v)
    CASE = f"{name} (n_layer={c.n_layer} n_head={c.n_head} n_kv_head={c.n_kv_head}) T=50 B=3 float32"
    with case(FN, CASE):
        n_bytes = kv_cache_bytes(c, T=50, B=3, bytes_per_number=4)
    check_shape(FN, CASE, "bytes", n_bytes, (), "iuf")
    check_close(FN, CASE, "bytes (vs the KVCache arrays)", n_bytes, np.asarray(allocated), 0)
CASE = "mixtral-8x7b T=1 bf16"
with case(FN, CASE):
    n_bytes = kv_cache_bytes(minimoe.get_preset("mixtral-8x7b"), T=1)
check_close(FN, CASE, "bytes", n_bytes, np.asarray(131072), 0)
print("kv_cache_bytes: OK")

# %% [markdown]
# The same attention shapes with $H_{kv} = H$ (MHA), 8 groups (GQA-8) and $H_{kv} = 1$ (MQA), for one
# sequence of 32k tokens in bf16, next to the model's own weights in bf16. The full-size configurations
# are only counted, never built (`minimoe.count_params`; lesson 12 builds that count by hand).

# %%
T_long = 32768
names = ["olmoe-1b-7b", "deepseek-moe-16b", "mixtral-8x7b", "gpt3-175b"]
rows = {}
print(f"GiB for one sequence of T = {T_long} tokens in bf16")
print(f"{'model':18s} {'H':>4s} {'Hkv':>4s} {'weights':>9s} {'MHA':>9s} {'GQA-8':>9s} {'MQA':>9s}")
for n in names:
    c = minimoe.get_preset(n)
    variants = {
        "MHA": c.replace(n_kv_head=c.n_head),
        "GQA-8": c.replace(n_kv_head=8),
        "MQA": c.replace(n_kv_head=1),
    }
    gib = {k: kv_cache_bytes(v, T_long) / 2**30 for k, v in variants.items()}
    weights = 2 * minimoe.count_params(c)["total"] / 2**30
    rows[n] = gib
    print(
        f"{n:18s} {c.n_head:4d} {c.n_kv_head:4d} {weights:9.1f} {gib['MHA']:9.2f} {gib['GQA-8']:9.2f} "
        f"{gib['MQA']:9.3f}"
    )

fig, ax = plt.subplots(figsize=(7, 3.5))
w = 0.27
for j, kind in enumerate(["MHA", "GQA-8", "MQA"]):
    ax.bar(np.arange(len(names)) + (j - 1) * w, [rows[n][kind] for n in names], w, label=kind)
ax.set_xticks(range(len(names)))
ax.set_xticklabels(names, fontsize=8)
ax.set_yscale("log")
ax.set_ylabel(f"KV cache, GiB (T = {T_long}, bf16)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# GPT-3's multi-head cache for one 32k sequence (~144 GiB) is larger than an 80 GB GPU; even at its own
# 2k context a batch of 16 needs as much. Mixtral, which uses GQA-8, needs 4 GiB for the same 32k
# tokens. Note also that a Mixture of Experts does not change the cache at all: the experts replace the
# feed-forward layers, and only attention keeps state.
#
# `minimoe.sample.generate` does what you just built for one sequence, plus temperature and top-$k$
# sampling, streaming, and a fallback to recomputation once the context outgrows `block_size`.
# With temperature 0 it is greedy:

# %%
try:
    from minimoe.sample import generate
except ImportError:
    print("minimoe.sample is not available in this version; the loop above is the whole idea")
else:
    model = minimoe.GPT(models["mixtral MoE"], seed=0, dtype="float64").eval()
    new_ids = generate(model, prompts[0], 30, temperature=0.0)  # a list of the 30 new ids
    print(
        "minimoe.sample.generate == recomputation:",
        new_ids == generate_recompute(model, prompts[:1], 30)[0, -30:].tolist(),
    )

# %% [markdown]
# ## Exercises
#
# 1. **Sampling.** Change `generate_cached` to sample from $\operatorname{softmax}(\text{logits}/\tau)$
#    restricted to the top-$k$ tokens. With a fixed random seed, do the cached and recomputed loops still
#    give the same tokens? (They should, if both draw the same random numbers in the same order.)
# 2. **Capacity breaks the promise.** Repeat the check with the Switch preset
#    (`minimoe.get_preset("switch", ...)`, capacity factor 1.25). Do the tokens still match? Explain with
#    `minimoe.ops.experts.capacity_for`: the number of slots per expert depends on how many tokens are in
#    the call ($N = B T$), so the same token may be dropped in one forward and not in the other. What
#    does that say about capacity-limited MoE at inference?
# 3. **Prompts of different lengths.** Our batch of prompts had equal lengths. Pad the shorter prompt
#    on the left and describe which entries of the mask (and which positions) must change so that the
#    padded sequence generates what it would generate alone.
# 4. **Sliding window.** Mistral 7B attends to the last 4096 tokens only. Change `kv_cache_bytes` for a
#    window $W$ and recompute the table for $W = 4096$. How would you store such a cache without copying
#    it at every step? (Hint: a ring buffer indexed by position mod $W$ — RoPE already encodes positions.)


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe's attention (run at build time)."""
    import numpy as np

    from minimoe.ops.attention import causal_attention_forward

    out = {}
    for Tq, Tk in ((3, 7), (1, 5), (4, 4), (1, 1), (2, 9)):
        # which keys each query sees, read off the package's attention: with q = k = 0 every allowed
        # key gets the same weight, and with one-hot values each output row shows the keys it averaged
        q, k = np.zeros((1, 1, Tq, Tk)), np.zeros((1, 1, Tk, Tk))
        y, _ = causal_attention_forward(q, k, np.eye(Tk)[None, None])
        out[f"mask_{Tq}_{Tk}"] = y[0, 0] > 0
    rng = np.random.default_rng(1)
    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 3, 7, 8
    q_all = rng.standard_normal((B, H, Tk, D))
    k, v = rng.standard_normal((B, Hkv, Tk, D)), rng.standard_normal((B, Hkv, Tk, D))
    q = q_all[:, :, -Tq:]  # the last Tq queries
    out.update(att_q=q, att_k=k, att_v=v, att_y=causal_attention_forward(q, k, v)[0])
    out["att_full_last_rows"] = causal_attention_forward(q_all, k, v)[0][:, :, -Tq:]
    return out
