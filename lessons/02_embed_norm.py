# %% [markdown]
# # Lesson 02 — Embeddings and normalisation: lookup tables, LayerNorm, RMSNorm
#
# A language model reads integer token ids, not vectors. The **embedding** turns each id into a
# learned row of a table; its backward has one classic trap. Then, before every attention and MLP
# layer, a transformer **normalises** each token's vector: GPT-2 uses LayerNorm (Ba, Kiros & Hinton
# 2016), Llama and Mixtral use RMSNorm (Zhang & Sennrich 2019). You derive and build both, forward and
# backward, and see what they do to the statistics of the activations.
#
# Shapes: B batch, T time, C channels, V vocabulary.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference
from minimoe.ops import norm

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The embedding table
#
# The table is $W \in \mathbb{R}^{V \times C}$, and the forward is a lookup,
# $y_{bt} = W_{\mathrm{ids}_{bt}}$, `(B, T) -> (B, T, C)`. It equals a one-hot vector times $W$,
# $y_{bt} = \mathrm{onehot}(\mathrm{ids}_{bt})\,W$, so by Lesson 01 the backward is
# $dW = \sum_{b,t} \mathrm{onehot}(\mathrm{ids}_{bt})^\top dy_{bt}$: row $v$ of $dW$ is the **sum** of
# $dy_{bt}$ over every position that holds token $v$,
#
# $$dW_v = \sum_{(b,t):\ \mathrm{ids}_{bt} = v} dy_{bt}.$$
#
# Rows of tokens that do not occur get zero gradient. Token ids repeat all the time (think of the
# space character), so the sum matters, and the obvious NumPy line gets it wrong:

# %%
ids = np.array([[1, 3, 1, 1]])  # token 1 appears three times
dy = np.ones((1, 4, 2))  # (B, T, C): every position sends gradient 1
dw_wrong = np.zeros((5, 2))
dw_wrong[ids] += dy  # fancy-index "+=": reads once, writes once per row -> duplicates are lost
dw_right = np.zeros((5, 2))
np.add.at(dw_right, ids, dy)  # unbuffered: every occurrence adds
print("row 1 with dw[ids] += dy:", dw_wrong[1], "  with np.add.at:", dw_right[1])

# %% [markdown]
# `dw[ids] += dy` is `dw[ids] = dw[ids] + dy`: NumPy gathers the rows, adds, then scatters the results
# back, and when an index repeats the last write wins. `np.add.at` (on the GPU, `cupyx.scatter_add`;
# minimoe wraps both as `backend.scatter_add`) accumulates. Write the backward with it. (GPT-2 also has
# a learned **position** table `wpe (block_size, C)`, added to the token rows; its gradient is simply
# $dy$ summed over the batch, because position $t$ appears once per sequence.)


# %%
def embedding_forward(ids, w):
    """ids (B, T) integer, w (V, C) -> y (B, T, C)."""
    return w[ids], (ids, w.shape)


# %% [markdown]
# **Your turn.** The cache holds the ids and the table's shape `(V, C)`.


# %%
def embedding_backward(dy, cache):
    """dy (B, T, C) -> dw (V, C): dy summed into the rows of the ids that produced it."""
    ids, (V, C) = cache
    ### BEGIN SOLUTION
    dw = np.zeros((V, C), dtype=dy.dtype)
    np.add.at(dw, ids.reshape(-1), dy.reshape(-1, C))
    ### END SOLUTION
    return dw


# %% [markdown]
# **Check**: shapes, a float64 numerical gradient check, then the values of `minimoe.ops.embedding`
# (stored in `02_embed_norm.npz`). Two cases: many repeated ids ($V = 4$, 12 positions), and a
# larger table where some rows are never used (their gradient must be exactly zero).

# %% check id=embedding_backward points=2
FN = "embedding_backward"


def check_embedding_backward(key):
    ids, w, dy = (reference("02", f"emb_{key}_{v}") for v in ("ids", "w", "dy"))
    CASE = f"ids {ids.shape} V={w.shape[0]}"
    with case(FN, CASE):
        dw = embedding_backward(dy, embedding_forward(ids, w)[1])
    check_shape(FN, CASE, "dw", dw, w.shape, "f")
    check_gradient(FN, CASE, lambda: float((embedding_forward(ids, w)[0] * dy).sum()), w, dw, 1e-6, name="dw")
    check_close(FN, CASE, "dw", dw, reference("02", f"emb_{key}_dw"), 1e-12)


for key in ("repeats", "unused"):
    check_embedding_backward(key)
print("embedding_backward is correct")

# %% [markdown]
# ## 2. LayerNorm
#
# For one token's vector $x \in \mathbb{R}^C$ (the statistics are over the channels, separately for
# every position):
#
# $$\mu = \frac1C \sum_i x_i, \quad \sigma^2 = \frac1C \sum_i (x_i - \mu)^2, \quad
#   r = \frac{1}{\sqrt{\sigma^2 + \epsilon}}, \quad \hat x = (x - \mu)\, r, \quad
#   y = \hat x \odot \gamma + \beta .$$
#
# ($\epsilon = 10^{-5}$ keeps $r$ finite for a constant vector.) The gain $\gamma$ and bias $\beta$
# are learned, shape `(C,)`, shared by all positions, so their gradients sum over positions:
# $d\gamma = \sum_{bt} dy \odot \hat x$, $d\beta = \sum_{bt} dy$.
#
# **The backward for $x$.** Let $g = dy \odot \gamma$, the gradient at $\hat x$. Every $\hat x_i$
# depends on every $x_j$, through $x_j$ itself, through $\mu$, and through $r$. With
# $\partial \mu/\partial x_j = 1/C$ and $\partial \sigma^2/\partial x_j = 2(x_j - \mu)/C$ (the term
# through $\mu$ vanishes because $\sum_i (x_i - \mu) = 0$), hence
# $\partial r/\partial x_j = -r^3 (x_j - \mu)/C$:
#
# $$\frac{\partial \hat x_i}{\partial x_j}
#   = r\left([i=j] - \frac1C\right) - (x_i - \mu)\, \frac{r^3 (x_j-\mu)}{C}
#   = r\left([i=j] - \frac1C - \frac{\hat x_i \hat x_j}{C}\right).$$
#
# Contract with $g$, $dx_j = \sum_i g_i\, \partial \hat x_i/\partial x_j$, and write means over the
# channels as $\overline{\,\cdot\,}$:
#
# $$dx = r \left( g - \overline{g} - \hat x\ \overline{g \odot \hat x} \right).$$
#
# The two subtracted terms are the paths through the mean and through the variance. They make $dx$
# (nearly) orthogonal to both $\mathbf 1$ and $\hat x$: moving $x$ along those directions does not
# change $\hat x$ (up to the tiny $\epsilon$). Keep `xhat` and `r` in the cache: with $\gamma$, they
# are all the backward needs.


# %% [markdown]
# **Your turn.** Write the forward (return `y, cache`; what you put in the cache is up to you) and the
# backward, which returns `dx, dw, db`.


# %%
def layernorm_forward(x, w, b, eps=1e-5):
    """x (..., C), gain w (C,), bias b (C,) -> y (..., C), normalised over the last axis."""
    ### BEGIN SOLUTION
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    r = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * r
    y = xhat * w + b
    cache = (xhat, r, w)
    ### END SOLUTION
    return y, cache


# %%
def layernorm_backward(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,), db (C,)."""
    ### BEGIN SOLUTION
    xhat, r, w = cache
    C = w.shape[0]
    g = dy * w
    dx = r * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)
    db = dy.reshape(-1, C).sum(axis=0)
    ### END SOLUTION
    return dx, dw, db


# %% [markdown]
# **Check** against the values of `minimoe.ops.norm` and numerically. The input has a large offset and
# scale, as real activations do; the gain and bias are random so that every term of the backward
# matters. A second case has a single token (`(1, C)`), where the sums over positions are trivial.

# %% check id=layernorm_forward points=1
FN = "layernorm_forward"
for key in ("btc", "one"):
    x, w, b = (reference("02", f"norm_{key}_{v}") for v in ("x", "w", "b"))
    CASE = f"x {x.shape}"
    with case(FN, CASE):
        y, _ = layernorm_forward(x, w, b)
    check_shape(FN, CASE, "y", y, x.shape, "f")
    check_close(FN, CASE, "y", y, reference("02", f"ln_{key}_y"), 1e-10)
print("layernorm_forward is correct")

# %% check id=layernorm_backward points=2
FN = "layernorm_backward"


def check_layernorm_backward(key):
    x, w, b, dy = (reference("02", f"norm_{key}_{v}") for v in ("x", "w", "b", "dy"))
    CASE = f"x {x.shape}"
    with case(FN, CASE):
        dx, dw, db = layernorm_backward(dy, layernorm_forward(x, w, b)[1])
    grads = {"dx": (dx, x), "dw": (dw, w), "db": (db, b)}
    for name, (grad, wrt) in grads.items():
        check_shape(FN, CASE, name, grad, wrt.shape, "f")
    loss = lambda: float((layernorm_forward(x, w, b)[0] * dy).sum())
    for name, (grad, wrt) in grads.items():
        check_gradient(FN, CASE, loss, wrt, grad, 1e-6, name=name)
    for name, (grad, _) in grads.items():
        check_close(FN, CASE, name, grad, reference("02", f"ln_{key}_{name}"), 1e-9)


for key in ("btc", "one"):
    check_layernorm_backward(key)
print("layernorm_backward is correct")

# %% [markdown]
# The two subtracted terms make $dx$ (nearly) orthogonal to $\mathbf 1$ and to $\hat x$:

# %%
x, w, b, dy = (reference("02", f"norm_btc_{v}") for v in ("x", "w", "b", "dy"))
dx = layernorm_backward(dy, layernorm_forward(x, w, b)[1])[0]
xhat = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
dx_dot_1, dx_dot_xhat = np.abs(dx.sum(-1)).max(), np.abs((dx * xhat).sum(-1)).max()
print(f"|dx . 1| = {dx_dot_1:.0e},  |dx . xhat| = {dx_dot_xhat:.0e}  (not 0: with eps, sum(xhat^2) < C)")

# %% [markdown]
# ## 3. RMSNorm
#
# Zhang & Sennrich (2019, eq. 4) argue that re-centring is not what makes LayerNorm work, only
# re-scaling, and drop the mean (and the bias):
#
# $$r = \frac{1}{\sqrt{\overline{x^2} + \epsilon}}, \qquad \hat x = x\, r, \qquad y = \hat x \odot \gamma .$$
#
# One fewer reduction per token, the same quality in practice; Llama, Mixtral and DeepSeek use it.
# The derivation is the one above without the path through $\mu$:
# $\partial \hat x_i/\partial x_j = r\,([i=j] - \hat x_i \hat x_j / C)$, so with $g = dy \odot \gamma$
#
# $$dx = r\left(g - \hat x\ \overline{g \odot \hat x}\right), \qquad d\gamma = \sum_{bt} dy \odot \hat x .$$


# %%
def rmsnorm_forward(x, w, eps=1e-5):
    """x (..., C), gain w (C,) -> y (..., C)."""
    ### BEGIN SOLUTION
    r = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * r
    y = xhat * w
    cache = (xhat, r, w)
    ### END SOLUTION
    return y, cache


# %%
def rmsnorm_backward(dy, cache):
    """dy (..., C) -> dx (..., C), dw (C,)."""
    ### BEGIN SOLUTION
    xhat, r, w = cache
    C = w.shape[0]
    g = dy * w
    dx = r * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)
    ### END SOLUTION
    return dx, dw


# %% [markdown]
# **Check** (the same inputs as for LayerNorm).

# %% check id=rmsnorm_forward points=1
FN = "rmsnorm_forward"
for key in ("btc", "one"):
    x, w = reference("02", f"norm_{key}_x"), reference("02", f"norm_{key}_w")
    CASE = f"x {x.shape}"
    with case(FN, CASE):
        y, _ = rmsnorm_forward(x, w)
    check_shape(FN, CASE, "y", y, x.shape, "f")
    check_close(FN, CASE, "y", y, reference("02", f"rms_{key}_y"), 1e-10)
print("rmsnorm_forward is correct")

# %% check id=rmsnorm_backward points=2
FN = "rmsnorm_backward"


def check_rmsnorm_backward(key):
    x, w, dy = (reference("02", f"norm_{key}_{v}") for v in ("x", "w", "dy"))
    CASE = f"x {x.shape}"
    with case(FN, CASE):
        dx, dw = rmsnorm_backward(dy, rmsnorm_forward(x, w)[1])
    grads = {"dx": (dx, x), "dw": (dw, w)}
    for name, (grad, wrt) in grads.items():
        check_shape(FN, CASE, name, grad, wrt.shape, "f")
    loss = lambda: float((rmsnorm_forward(x, w)[0] * dy).sum())
    for name, (grad, wrt) in grads.items():
        check_gradient(FN, CASE, loss, wrt, grad, 1e-6, name=name)
    for name, (grad, _) in grads.items():
        check_close(FN, CASE, name, grad, reference("02", f"rms_{key}_{name}"), 1e-9)


for key in ("btc", "one"):
    check_rmsnorm_backward(key)
print("rmsnorm_backward is correct")

# %% [markdown]
# ## 4. What normalisation does to activations
#
# Left: 2000 token vectors ($C = 64$) whose mean and scale vary from token to token, plotted as
# (mean, standard deviation) over their channels. LayerNorm sends every token to the same point
# (0, 1). RMSNorm fixes only the root mean square, and since $\overline{x^2} = \mu^2 + \sigma^2$, it
# sends every token onto the unit circle: the mean survives.
#
# Right: why transformers normalise at all. Push a vector through 24 random linear layers whose
# weights are only 20 % too large ($\mathrm{std} = 1.2/\sqrt C$): the activations grow like
# $1.2^{\ell}$. With an RMSNorm (gain 1) after each layer they stay at scale 1, however deep the
# stack. (The package's reference ops are used here.)

# %%
rng = np.random.default_rng(2)
C = 64
acts = rng.normal(0, 1.0, (2000, 1)) + np.exp(rng.normal(0, 0.4, (2000, 1))) * rng.standard_normal((2000, C))
ones, zeros = np.ones(C), np.zeros(C)
after_ln = norm.layernorm_forward(acts, ones, zeros)[0]
after_rms = norm.rmsnorm_forward(acts, ones)[0]

depth, n_layers = np.arange(25), 24
h_plain = h_norm = rng.standard_normal((256, C))
rms_plain, rms_norm = [1.0], [1.0]
for _ in range(n_layers):
    W = rng.standard_normal((C, C)) * 1.2 / np.sqrt(C)
    h_plain = h_plain @ W
    h_norm = norm.rmsnorm_forward(h_norm @ W, ones)[0]
    rms_plain.append(np.sqrt((h_plain**2).mean()))
    rms_norm.append(np.sqrt((h_norm**2).mean()))

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
for data, label, s in (
    (acts, "before", 4),
    (after_rms, "after RMSNorm", 4),
    (after_ln, "after LayerNorm", 40),
):
    axes[0].scatter(data.mean(-1), data.std(-1), s=s, alpha=0.5, label=label)
axes[0].set_xlabel("per-token mean over channels")
axes[0].set_ylabel("per-token standard deviation")
axes[0].set_title("token statistics")
axes[0].legend()
axes[0].set(xlim=(-3.5, 3.5), ylim=(0, 3.5), aspect="equal")
axes[1].semilogy(depth, rms_plain, "o-", label="plain stack")
axes[1].semilogy(depth, rms_norm, "o-", label="RMSNorm after each layer")
axes[1].set_xlabel("layer")
axes[1].set_ylabel("RMS of activations")
axes[1].set_title("24 random layers, weights 1.2 / sqrt(C)")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# In a transformer the norm sits at the *input* of each sub-layer ("pre-norm", GPT-2 and later:
# $x \leftarrow x + f(\mathrm{Norm}(x))$), so the residual stream $x$ itself is never normalised and
# gradients flow straight through the additions (Xiong et al. 2020). Lesson 04 assembles that block.
#
# ## Exercises
#
# 1. Show that LayerNorm's output is unchanged when $x$ is replaced by $a x + c$ for any $a > 0$ and
#    constant $c$, and that RMSNorm's is unchanged only under $a x$. What does each invariance imply
#    for the gradient $dx$ (compute `dx @ x` for RMSNorm)?
# 2. Write `embedding_backward` without `np.add.at`, as a one-hot matrix product
#    $\mathrm{onehot}(\mathrm{ids})^\top dy$. Compare its speed with `np.add.at` for $V = 5000$.
# 3. Remove the $-\hat x\,\overline{g \odot \hat x}$ term from your LayerNorm backward. Which check
#    fails, and what does its message say? Then remove $-\overline g$ instead.
# 4. With $\epsilon = 10^{-5}$, what does LayerNorm do to a token whose channels are all equal? What
#    is its gradient?


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe's own ops (run at build time)."""
    import numpy as np

    from minimoe.ops import embedding, norm

    rng = np.random.default_rng(0)
    out = {}
    for key, V, shape in (("repeats", 4, (2, 6)), ("unused", 9, (3, 2))):
        ids, w = rng.integers(0, min(V, 4), shape), rng.standard_normal((V, 3))
        dy = rng.standard_normal((*shape, 3))
        dw = embedding.embedding_backward(dy, embedding.embedding_forward(ids, w)[1])
        out.update({f"emb_{key}_ids": ids, f"emb_{key}_w": w, f"emb_{key}_dy": dy, f"emb_{key}_dw": dw})
    for key, shape in (("btc", (2, 3, 6)), ("one", (1, 6))):
        x = 3.0 + 2.0 * rng.standard_normal(shape)
        w, b = 1.0 + 0.5 * rng.standard_normal(6), rng.standard_normal(6)
        dy = rng.standard_normal(shape)
        out.update({f"norm_{key}_x": x, f"norm_{key}_w": w, f"norm_{key}_b": b, f"norm_{key}_dy": dy})
        y, cache = norm.layernorm_forward(x, w, b)
        dx, dw, db = norm.layernorm_backward(dy, cache)
        out.update({f"ln_{key}_y": y, f"ln_{key}_dx": dx, f"ln_{key}_dw": dw, f"ln_{key}_db": db})
        y, cache = norm.rmsnorm_forward(x, w)
        dx, dw = norm.rmsnorm_backward(dy, cache)
        out.update({f"rms_{key}_y": y, f"rms_{key}_dx": dx, f"rms_{key}_dw": dw})
    return out
