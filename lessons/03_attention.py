# %% [markdown]
# # Lesson 03 — Causal self-attention, RoPE and grouped-query attention
#
# Attention is the only place in a transformer where positions talk to each other. Each position $t$
# emits a **query** $q_t$, a **key** $k_t$ and a **value** $v_t$; it then averages the values of the
# positions it may see, weighted by how well its query matches their keys (Vaswani et al. 2017, eq. 1):
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{D}} + M\right) V,$$
#
# where $M$ is the **causal mask**: $M_{ij} = 0$ for $j \le i$ and $-\infty$ for $j > i$, so that a
# language model predicting token $i + 1$ never sees tokens after $i$. With **multi-head** attention
# the $C$ channels are split into $H$ heads of size $D = C/H$, each attending independently.
#
# You build the attention core, forward and backward. Then two refinements used by Llama and
# Mixtral: rotary position embeddings (RoPE) and grouped-query attention (GQA).
#
# Shapes: B batch, H heads, T time, D head size, C = H·D channels.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minimoe.gradcheck import check_op
from minimoe.layers.attention import self_attention_forward
from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference
from minimoe.ops import activation, attention

np.set_printoptions(precision=3, suppress=True)

# %% [markdown]
# ## 1. The attention core
#
# For one head, with $q, k, v \in \mathbb{R}^{T \times D}$:
#
# $$s = \frac{q k^\top}{\sqrt D} + M \in \mathbb{R}^{T \times T}, \qquad
#   p = \mathrm{softmax}_{\text{rows}}(s), \qquad y = p\, v \in \mathbb{R}^{T \times D}.$$
#
# The $1/\sqrt D$ keeps the scores at unit scale: a dot product of two random unit-variance vectors of
# length $D$ has variance $D$, and a softmax of large scores saturates into a one-hot with vanishing
# gradients. Batches and heads are leading axes, `(B, H, T, D)`; `@` batches over them.
#
# **Backward.** Go through the three steps in reverse. $y = pv$ is a matrix product (Lesson 01):
# $dv = p^\top dy$ and $dp = dy\, v^\top$. The row-wise softmax has Jacobian
# $\partial p_j / \partial s_l = p_j([j = l] - p_l)$, so for each row
#
# $$ds_l = \sum_j dp_j\, p_j ([j=l] - p_l) = p_l \Big(dp_l - \sum_j dp_j\, p_j\Big).$$
#
# Masked entries have $p = 0$, hence $ds = 0$: no gradient flows to the future, as it should.
# Finally $s = q k^\top / \sqrt D$ gives $dq = ds\, k / \sqrt D$ and $dk = ds^\top q / \sqrt D$.
# The forward's cache needs $q, k, v$ and $p$.


# %% [markdown]
# **Your turn.** Write the forward (return `y, cache`) and the backward (return `dq, dk, dv`).


# %%
def attention_forward(q, k, v):
    """q, k, v (B, H, T, D) -> y (B, H, T, D): causal softmax(q k^T / sqrt(D)) v for every head."""
    ### BEGIN SOLUTION
    T, D = q.shape[-2:]
    scale = 1.0 / np.sqrt(D)
    s = (q @ k.swapaxes(-1, -2)) * scale  # (B, H, T, T) scores: query i (row) vs key j (column)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # True where j > i
    s = np.where(future, -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)  # the diagonal is never masked, so each row has a finite max
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    y = p @ v
    cache = (q, k, v, p, scale)
    ### END SOLUTION
    return y, cache


# %%
def attention_backward(dy, cache):
    """dy (B, H, T, D) -> dq, dk, dv, each (B, H, T, D)."""
    ### BEGIN SOLUTION
    q, k, v, p, scale = cache
    dv = p.swapaxes(-1, -2) @ dy
    dp = dy @ v.swapaxes(-1, -2)  # (B, H, T, T)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # softmax backward, row by row
    dq = (ds @ k) * scale
    dk = (ds.swapaxes(-1, -2) @ q) * scale
    ### END SOLUTION
    return dq, dk, dv


# %% [markdown]
# **Check** the forward against the values of `minimoe.ops.attention.causal_attention_forward`
# (stored in `03_attention.npz`), and for causality: changing the last position's key and value must
# not change any earlier output. Then the backward, numerically and against the package's values.

# %% check id=attention_forward points=2
FN = "attention_forward"
for key in ("main", "short"):
    q, k, v = (reference("03", f"att_{key}_{n}") for n in "qkv")
    CASE = f"q, k, v {q.shape}"
    with case(FN, CASE):
        y, _ = attention_forward(q, k, v)
    check_shape(FN, CASE, "y", y, q.shape, "f")
    check_close(FN, CASE, "y", y, reference("03", f"att_{key}_y"), 1e-10)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, -1] += 10.0
    v2[:, :, -1] -= 10.0
    with case(FN, CASE + " last key and value changed"):
        y2, _ = attention_forward(q, k2, v2)
    check_close(FN, CASE + " last key and value changed", "y[:, :, :-1]", y2[:, :, :-1], y[:, :, :-1], 1e-12)
print("attention_forward is correct, and causal")

# %% check id=attention_backward points=2
FN = "attention_backward"


def check_attention_backward(key):
    q, k, v, dy = (reference("03", f"att_{key}_{n}") for n in ("q", "k", "v", "dy"))
    CASE = f"q, k, v {q.shape}"
    with case(FN, CASE):
        dq, dk, dv = attention_backward(dy, attention_forward(q, k, v)[1])
    grads = {"dq": (dq, q), "dk": (dk, k), "dv": (dv, v)}
    for name, (grad, wrt) in grads.items():
        check_shape(FN, CASE, name, grad, wrt.shape, "f")
    loss = lambda: float((attention_forward(q, k, v)[0] * dy).sum())
    for name, (grad, wrt) in grads.items():
        check_gradient(FN, CASE, loss, wrt, grad, 1e-6, name=name)
    for name, (grad, _) in grads.items():
        check_close(FN, CASE, name, grad, reference("03", f"att_{key}_{name}"), 1e-9)


for key in ("main", "short"):
    check_attention_backward(key)
print("attention_backward is correct")

# %% [markdown]
# ## 2. The whole layer
#
# Around the core, a self-attention layer has two linear maps (Lesson 01): `wqkv (C, 3C)` makes
# $q, k, v$ for all heads at once from $x$ `(B, T, C)`; the result is split and reshaped into heads
# `(B, T, 3C) -> 3 x (B, H, T, D)`; after the core, the heads are concatenated back to `(B, T, C)` and
# mixed by `wo (C, C)`. The backward undoes each reshape. The package's `self_attention_forward`
# (`minimoe/layers/attention.py`) does exactly this (the lessons from here on use it); its shapes:

# %%
rng = np.random.default_rng(0)
B, T, C, H = 2, 5, 8, 2
x = rng.standard_normal((B, T, C))
wqkv, wo = rng.standard_normal((C, 3 * C)) / np.sqrt(C), rng.standard_normal((C, C)) / np.sqrt(C)
y, _ = self_attention_forward(x, wqkv, None, wo, None, n_head=H, n_kv_head=H)
print("x", x.shape, "-> qkv", (B, T, 3 * C), "-> q, k, v 3 x", (B, H, T, C // H), "-> y", y.shape)

# %% [markdown]
# ## 3. Rotary position embeddings
#
# Attention by itself is blind to order: permute the keys and values together and each output is
# unchanged. GPT-2 adds a learned position vector to each token embedding. **RoPE** (Su et al. 2021,
# RoFormer, eq. 34) instead *rotates* queries and keys by an angle proportional to their position.
# Split a head vector into pairs $(x_i, x_{i + D/2})$ (the "rotate halves" layout of GPT-NeoX and
# Llama) and rotate pair $i$ at position $m$ by $m\,\theta_i$, with $\theta_i = 10000^{-2i/D}$:
#
# $$\begin{pmatrix} y_i \\ y_{i+D/2} \end{pmatrix} =
#   \begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
#   \begin{pmatrix} x_i \\ x_{i+D/2} \end{pmatrix}.$$
#
# Because rotations compose, $\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle$: the score of
# query position $m$ and key position $n$ depends on their **offset** only. And since a rotation's
# inverse is its transpose, the backward is the rotation by $-m\theta_i$. Both facts, checked with the
# package's `rope_tables` / `rope_forward` / `rope_backward`:

# %%
D, T = 8, 12
cos, sin = attention.rope_tables(T, D, dtype="float64")  # (T, D/2) each
u, w_ = rng.standard_normal(D), rng.standard_normal(D)
# the same query u and key w_ placed at every position: (1, 1, T, D)
qr = attention.rope_forward(np.tile(u, (1, 1, T, 1)), cos, sin)[0][0, 0]
kr = attention.rope_forward(np.tile(w_, (1, 1, T, 1)), cos, sin)[0][0, 0]
scores = qr @ kr.T  # (T, T): entry (m, n) = <R_m u, R_n w_>
print("score at (m, n) = (7, 4), (10, 7), (3, 0):", scores[7, 4], scores[10, 7], scores[3, 0])
assert np.isclose(scores[7, 4], scores[10, 7]) and np.isclose(scores[7, 4], scores[3, 0])
xr = rng.standard_normal((2, 2, T, D))
errs = check_op(lambda a: attention.rope_forward(a, cos, sin), attention.rope_backward, [xr], eps=1e-5)
print(f"RoPE numerical check: {errs[0]:.1e}")
assert errs[0] < 1e-6

# %% [markdown]
# **Attention patterns.** Left: one head of random queries and keys; the causal mask leaves the lower
# triangle, and the first rows are forced to attend to the few keys they have. Right: the *same*
# content vector at every position, with RoPE: every score now depends only on the distance $i - j$, so
# the pattern is constant along diagonals, and for this vector it favours nearby tokens (RoFormer §3.4.3
# shows such a decay with distance on average).


# %%
def attention_weights(q, k):
    """Causal attention probabilities (T, T) of one head, with the package's softmax."""
    T, D = q.shape
    s = q @ k.T / np.sqrt(D)
    s = np.where(np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf, s)
    return activation.softmax_forward(s)[0]


T, D = 24, 32
cos, sin = attention.rope_tables(T, D, dtype="float64")
p_random = attention_weights(rng.standard_normal((T, D)), rng.standard_normal((T, D)))
u = np.ones(D) * 0.8  # one content vector for every position
ur = attention.rope_forward(np.tile(u, (1, 1, T, 1)), cos, sin)[0][0, 0]
p_rope = attention_weights(ur, ur)

fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
for ax, p, title in ((axes[0], p_random, "random q, k"), (axes[1], p_rope, "same content + RoPE")):
    im = ax.imshow(p, cmap="viridis", vmin=0, vmax=0.6)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(title)
fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight p[i, j]")
plt.show()

# %% [markdown]
# ## 4. Grouped-query attention
#
# When generating text, a model keeps the keys and values of all earlier tokens (the **KV cache**,
# Lesson 10), per layer: $2 \cdot H \cdot D$ numbers per token. At large scale that cache, not the
# weights, limits the batch size and the context. **Multi-query attention** (Shazeer 2019) lets all
# $H$ query heads share **one** key/value head; **grouped-query attention** (Ainslie et al. 2023) is in
# between: $H_{kv}$ key/value heads, each shared by a group of $g = H / H_{kv}$ query heads. Llama-2-70B
# and Mixtral use $H = 32$ or $64$ with $H_{kv} = 8$.
#
# GQA is MHA with every key/value head *repeated* $g$ times. minimoe does not copy them: it stacks the
# $g$ query heads of a group along time, so one matmul per key/value head serves the whole group. In
# the backward, a shared key/value head receives the **sum** of its group's gradients. Check both:

# %%
B, H, Hkv, T, D = 2, 4, 2, 5, 4
q = rng.standard_normal((B, H, T, D))
k, v = rng.standard_normal((B, Hkv, T, D)), rng.standard_normal((B, Hkv, T, D))
y_gqa = attention.causal_attention_forward(q, k, v)[0]
k_rep, v_rep = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)  # head h uses kv head h // g
y_mha = attention.causal_attention_forward(q, k_rep, v_rep)[0]
print("GQA == MHA with repeated key/value heads:", np.allclose(y_gqa, y_mha))
errs = check_op(attention.causal_attention_forward, attention.causal_attention_backward, [q, k, v], eps=1e-5)
print("GQA numerical check (q, k, v):", {key: f"{e:.1e}" for key, e in errs.items()})
assert np.allclose(y_gqa, y_mha) and max(errs.values()) < 1e-6

# %% [markdown]
# What the sharing saves, for a Llama-2-70B-sized attention ($C = 8192$, $H = 64$, $D = 128$,
# 80 layers, 16-bit numbers, one sequence of 4096 tokens):

# %%
C, H, D, L, T_ctx, bytes_per = 8192, 64, 128, 80, 4096, 2
print(f"{'':>10} {'H_kv':>5} {'qkv+out params/layer':>21} {'KV cache/token':>15} {'KV cache, 4096 tok':>19}")
for name, Hkv in (("MHA", 64), ("GQA-8", 8), ("MQA", 1)):
    params = C * (H + 2 * Hkv) * D + H * D * C
    per_token = 2 * L * Hkv * D * bytes_per  # keys and values, every layer
    cache_gb = per_token * T_ctx / 1e9
    print(f"{name:>10} {Hkv:>5} {params / 1e6:>19.1f} M {per_token / 1e6:>12.2f} MB {cache_gb:>16.2f} GB")

# %% [markdown]
# GQA-8 cuts the cache 8 times (and the attention weights by 44 %), and Ainslie et al. report quality
# close to MHA; MQA saves more but loses more quality.
#
# ## Exercises
#
# 1. Remove the $1/\sqrt D$ scaling and plot the entropy of the attention rows of random $q, k$ for
#    $D = 4, 64, 1024$. What happens to the gradients $ds$ as the softmax saturates?
# 2. Write the backward of GQA by repeating $k, v$ (`np.repeat`), calling your `attention_backward`, and
#    summing `dk`, `dv` over each group (`reshape(B, Hkv, g, T, D).sum(2)`). Check it against
#    `causal_attention_backward`.
# 3. Show that RoPE preserves vector norms and that `rope_backward` is `rope_forward` with `sin`
#    replaced by `-sin`.
# 4. The attention scores are a $(T \times T)$ array per head: how much memory do they need for
#    $B = 8$, $H = 32$, $T = 8192$ in float32? (This is the problem FlashAttention solves.)


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe's own ops (run at build time)."""
    import numpy as np

    from minimoe.ops import attention

    rng = np.random.default_rng(0)
    out = {}
    for key, shape in (("main", (2, 3, 5, 4)), ("short", (1, 2, 2, 3))):
        q, k, v, dy = (rng.standard_normal(shape) for _ in range(4))
        y, cache = attention.causal_attention_forward(q, k, v)
        dq, dk, dv = attention.causal_attention_backward(dy, cache)
        out.update({f"att_{key}_{n}": a for n, a in zip(("q", "k", "v", "dy", "y"), (q, k, v, dy, y))})
        out.update({f"att_{key}_{n}": a for n, a in zip(("dq", "dk", "dv"), (dq, dk, dv))})
    return out
