# %% [markdown]
# # Lesson 05 — The router
#
# A Mixture-of-Experts (MoE) layer replaces one big feed-forward network by $E$ smaller ones, the
# *experts*, and sends each token to only $K$ of them. The piece that decides *which* $K$, and *how
# much* each of them counts, is the **router**. It is tiny (one $C \times E$ matrix), but almost every
# subtle bug of an MoE model lives in it.
#
# For a token $x \in \mathbb{R}^C$ the router computes $E$ logits and a probability for each expert:
#
# $$\ell = x W_r \in \mathbb{R}^E, \qquad p = \mathrm{softmax}(\ell), \qquad
#   S = \mathrm{TopK}(\ell) \subset \{0, \dots, E-1\},\ |S| = K .$$
#
# The layer's output is a weighted sum of the chosen experts, with **gate** values $g_e$:
#
# $$y = \sum_{e \in S} g_e \, \mathrm{Expert}_e(x).$$
#
# In this lesson you build the two gate functions in use today, their hand-derived backward pass,
# and look at the three properties that make routers tricky: the choice $S$ is piecewise constant,
# $K=1$ with renormalisation kills the router's gradient, and noise can make the choice explore.
#
# Shapes: N tokens, E experts, K experts per token.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minimoe import GPT, Config, backend
from minimoe.gradcheck import check_op
from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference
from minimoe.ops import router

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## Two gate functions
#
# **Not renormalised** — Switch Transformer (Fedus et al. 2021, eqs. 1–2), OLMoE (Muennighoff et
# al. 2024), DeepSeekMoE (Dai et al. 2024): the gate is the full-softmax probability of the chosen
# expert,
#
# $$g_e = p_e = \frac{e^{\ell_e}}{\sum_{j=1}^{E} e^{\ell_j}}, \qquad e \in S .$$
#
# The gates of a token sum to $\sum_{e \in S} p_e < 1$: the mass of the experts *not* chosen is lost.
#
# **Renormalised** — Mixtral (Jiang et al. 2024, eq. 2): $G(x) = \mathrm{softmax}(\mathrm{TopK}(x W_g))$,
# where TopK sets the logits outside $S$ to $-\infty$. Equivalently (Hugging Face's implementation):
# softmax over all $E$, keep the top $K$, divide by their sum. The two recipes agree because the full
# normaliser $Z = \sum_j e^{\ell_j}$ cancels:
#
# $$g_e = \frac{p_e}{\sum_{j \in S} p_j} = \frac{e^{\ell_e}/Z}{\sum_{j \in S} e^{\ell_j}/Z}
#       = \frac{e^{\ell_e}}{\sum_{j \in S} e^{\ell_j}}, \qquad e \in S .$$
#
# So the renormalised gates depend **only on the chosen logits**, while Switch's gates depend on
# all $E$ of them. Let us see both on a few tokens, using the package's reference router.

# %%
rng = np.random.default_rng(0)
N, E, K = 4, 6, 2
logits = rng.standard_normal((N, E))  # (N, E)

g_mix, idx, _ = router.softmax_topk_forward(logits, K, renormalize=True)  # Mixtral
g_sw, idx_sw, _ = router.softmax_topk_forward(logits, K, renormalize=False)  # Switch / OLMoE
assert (idx == idx_sw).all()  # same experts chosen, different weights

p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # full softmax (N, E)
p_sel = np.take_along_axis(p, idx, axis=-1)  # (N, K)
l_sel = np.take_along_axis(logits, idx, axis=-1)
softmax_of_chosen = np.exp(l_sel) / np.exp(l_sel).sum(-1, keepdims=True)

print("chosen experts (best first):\n", idx)
print("renormalised gates:         \n", g_mix, "  sums:", g_mix.sum(-1))
print("not renormalised gates:     \n", g_sw, "  sums:", g_sw.sum(-1))
assert np.allclose(g_mix, p_sel / p_sel.sum(-1, keepdims=True))  # softmax -> top-k -> renormalise
assert np.allclose(g_mix, softmax_of_chosen)  # == softmax over the top-k logits
assert np.allclose(g_sw, p_sel)
assert not np.allclose(g_mix, g_sw)  # different functions

# %% [markdown]
# They are different *functions*, not just differently scaled numbers: raise a logit that was **not**
# chosen (without letting it enter the top $K$) and Switch's gates shrink, while Mixtral's do not move.

# %%
bumped = logits.copy()
loser = [e for e in range(E) if e not in idx[0]][0]  # an expert outside the top K of token 0
bumped[0, loser] += 0.5 * (l_sel[0, -1] - logits[0, loser])  # halfway to the K-th logit: still not chosen
g_mix2, idx2, _ = router.softmax_topk_forward(bumped, K, renormalize=True)
g_sw2, _, _ = router.softmax_topk_forward(bumped, K, renormalize=False)
assert (idx2 == idx).all()
print("token 0, renormalised:    ", g_mix[0], "->", g_mix2[0])
print("token 0, not renormalised:", g_sw[0], "->", g_sw2[0])

# %% [markdown]
# ## The backward pass, by hand
#
# Write $\delta_k = \partial L / \partial g_k$ for the $K$ gates of a token (`dgates`, shape (N, K)).
# The choice $S$ is a step function of the logits, so it has zero derivative almost everywhere:
# **gradients flow through the gate values only** (the chosen experts are treated as constants).
#
# *Renormalised.* $g = \mathrm{softmax}(\ell_S)$ is a softmax over the $K$ chosen logits, whose
# Jacobian is $\partial g_k / \partial \ell_{S_j} = g_k(\mathbb{1}[k=j] - g_j)$. Hence
#
# $$\frac{\partial L}{\partial \ell_{S_j}} = g_j\Big(\delta_j - \sum_k \delta_k g_k\Big), \qquad
#   \frac{\partial L}{\partial \ell_e} = 0 \ \text{ for } e \notin S .$$
#
# *Not renormalised.* $g_k = p_{S_k}$: scatter $\delta$ into a length-$E$ vector $\tilde\delta$ (zeros
# outside $S$), then go back through the full softmax:
#
# $$\frac{\partial L}{\partial \ell_e} = p_e\Big(\tilde\delta_e - \sum_{j} \tilde\delta_j p_j\Big) .$$
#
# For an expert $e \notin S$ this is $-p_e \sum_k \delta_k g_k \ne 0$: Switch's router learns something
# about every expert, not only the chosen ones.
#
# **Your turn.** Implement both, in NumPy. Take the top $K$ with a *stable* sort of $-\ell$ (ties go to
# the lower expert index, as in `minimoe.backend.topk_indices`); compute softmaxes stably (subtract
# the row max); `np.take_along_axis` / `np.put_along_axis` gather and scatter along the expert axis.


# %%
def softmax_topk_forward(logits, k, renormalize=True):
    """logits (N, E) -> gates (N, K), idx (N, K) best first, cache."""
    ### BEGIN SOLUTION
    idx = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # (N, K) the K largest logits
    if renormalize:
        sel = np.take_along_axis(logits, idx, axis=-1)  # (N, K) chosen logits
        e = np.exp(sel - sel.max(axis=-1, keepdims=True))
        gates = e / e.sum(axis=-1, keepdims=True)  # softmax over the chosen K
        cache = (True, gates, idx, logits.shape[1])
    else:
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True)  # (N, E) full softmax
        gates = np.take_along_axis(probs, idx, axis=-1)
        cache = (False, probs, idx, logits.shape[1])
    return gates, idx, cache
    ### END SOLUTION


# %%
def softmax_topk_backward(dgates, cache):
    """dgates (N, K) -> dlogits (N, E)."""
    ### BEGIN SOLUTION
    renormalize, y, idx, E = cache
    N = dgates.shape[0]
    if renormalize:  # y = gates (N, K): softmax backward over the chosen K, zero elsewhere
        dsel = y * (dgates - (dgates * y).sum(axis=-1, keepdims=True))
        dlogits = np.zeros((N, E))
        np.put_along_axis(dlogits, idx, dsel, axis=-1)
        return dlogits
    dprobs = np.zeros((N, E))  # y = probs (N, E): scatter, then the full softmax backward
    np.put_along_axis(dprobs, idx, dgates, axis=-1)
    return y * (dprobs - (dprobs * y).sum(axis=-1, keepdims=True))
    ### END SOLUTION


# %% [markdown]
# **Check the forward** for both variants and $K = 1, 2, 3$ against the values of
# `minimoe.ops.router.softmax_topk_forward` (stored in `05_router.npz`), on three kinds of logits:
# O(1) random ones; logits with **ties** (small integers), where the stable sort must give the lower
# expert index; and **large** logits (around 800), where a softmax that does not subtract the max
# overflows.

# %% check id=softmax_topk_forward points=2
FN = "softmax_topk_forward"
for kind in ("random", "ties", "large"):
    logits = reference("05", f"logits_{kind}")
    N, E = logits.shape
    for k in (1, 2, 3):
        for renorm in (True, False):
            CASE = f"{kind} logits ({N}, {E}) k={k} renormalize={renorm}"
            with case(FN, CASE):
                gates, idx, _ = softmax_topk_forward(logits, k, renorm)
            check_shape(FN, CASE, "gates", gates, (N, k), "f")
            check_shape(FN, CASE, "idx", idx, (N, k), "iu")
            check_close(FN, CASE, "idx", idx, reference("05", f"idx_{kind}_k{k}"), 0)
            check_close(FN, CASE, "gates", gates, reference("05", f"gates_{kind}_k{k}_{renorm}"), 1e-10)
print("softmax_topk_forward is correct")

# %% [markdown]
# **Check the backward**: for every case, first a float64 numerical gradient check of
# $L = \sum_{n,k} g_{n,k}\, \delta_{n,k}$ (central differences, $\epsilon = 10^{-6}$) through *your*
# forward, then the values of `minimoe.ops.router.softmax_topk_backward`. A finite difference across
# the top-$K$ boundary would see the jump, so we use O(1) random logits: their gaps are far larger than
# $\epsilon$ and $S$ does not change while we probe.

# %% check id=softmax_topk_backward points=3
FN = "softmax_topk_backward"


def check_softmax_topk_backward(k, renorm):
    logits, dgates = reference("05", "logits_random"), reference("05", f"dgates_k{k}")
    N, E = logits.shape
    CASE = f"k={k} renormalize={renorm}"
    with case(FN, CASE):
        dlogits = softmax_topk_backward(dgates, softmax_topk_forward(logits, k, renorm)[2])
    check_shape(FN, CASE, "dlogits", dlogits, (N, E), "f")
    loss = lambda: float((softmax_topk_forward(logits, k, renorm)[0] * dgates).sum())
    check_gradient(FN, CASE, loss, logits, dlogits, 1e-6, name="dlogits")
    check_close(FN, CASE, "dlogits", dlogits, reference("05", f"dlogits_k{k}_{renorm}"), 1e-10)
    print(f"{CASE:28s} OK")


for k in (1, 2, 3):
    for renorm in (True, False):
        check_softmax_topk_backward(k, renorm)
print("softmax_topk_backward is correct")

# %% [markdown]
# ## K = 1 with renormalisation: a router that cannot learn
#
# With $K = 1$ the renormalised gate is a softmax over a single logit: $g = e^{\ell_S}/e^{\ell_S} = 1$,
# whatever the logits. Its derivative is $g(\delta - g\delta) = 0$. The router then receives **no
# gradient from the language-modelling loss** — only from auxiliary losses, if there are any. That is
# why Switch (top-1) uses the unrenormalised $p_e$ as its gate: it lets the loss say "this expert
# helped, trust it more".
#
# First on the op, then on a whole (tiny) model with both auxiliary losses switched off.

# %%
logits = rng.standard_normal((5, 4))
g1, _, c1 = router.softmax_topk_forward(logits, 1, renormalize=True)
print("K=1 renormalised gates:", g1.ravel())
print("their gradient:", router.softmax_topk_backward(rng.standard_normal((5, 1)), c1).ravel()[:8], "...")

idx_ids = rng.integers(0, 16, size=(2, 8))
for renorm in (True, False):
    cfg = Config(
        flavour="llama",
        vocab_size=16,
        block_size=8,
        n_layer=1,
        n_head=2,
        n_embd=8,
        n_experts=4,
        top_k=1,
        expert_hidden=8,
        renormalize=renorm,
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
    )
    model = GPT(cfg, seed=0, dtype="float64")
    model.forward(idx_ids, idx_ids)
    gw = model.backward()["blocks.0.moe.router.w"]
    print(f"K=1, renormalize={renorm!s:5}: |d loss / d W_router| max = {np.abs(gw).max():.2e}")
    if renorm:
        assert np.abs(gw).max() == 0.0
    else:
        assert np.abs(gw).max() > 0.0

# %% [markdown]
# ## Top-K is piecewise constant
#
# Sweep one logit of a token across the top-$K$ boundary and watch the weight every expert receives
# (the gate where chosen, 0 otherwise). Four experts, $K = 2$, logits $(1.5, 0.8, 0, \ell_3)$: when
# $\ell_3$ passes $0.8$, expert 3 replaces expert 1 in $S$ and the weights **jump** (expert 2 is never
# chosen: its line stays at 0). The layer's output
# $y = \sum_e w_e \mathrm{Expert}_e(x)$ jumps with them; the gradient, which only sees the smooth
# pieces, knows nothing about the jump. Note also the difference below the boundary: Switch's gate of
# expert 0 already drops as $\ell_3$ rises (through $Z$), Mixtral's stays flat until expert 3 is chosen.


# %%
def dense_weights(logits, k, renormalize):
    """(N, E) -> (N, E): each expert's weight for each token, 0 where not chosen."""
    gates, idx, _ = router.softmax_topk_forward(logits, k, renormalize)
    w = np.zeros_like(logits)
    np.put_along_axis(w, idx, gates, axis=-1)
    return w


sweep = np.linspace(-2.0, 3.0, 501)
grid = np.tile([1.5, 0.8, 0.0, 0.0], (sweep.size, 1))
grid[:, 3] = sweep  # (501, 4): one row per value of l_3

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, renorm, name in zip(axes, (True, False), ("renormalised (Mixtral)", "not renormalised (Switch)")):
    w = dense_weights(grid, 2, renorm)
    left, right = sweep < 0.8, sweep > 0.8  # draw the two smooth pieces apart: the jump is real
    for e in range(4):
        (line,) = ax.plot(sweep[left], w[left, e], label=f"expert {e}")
        ax.plot(sweep[right], w[right, e], color=line.get_color())
    ax.axvline(0.8, color="grey", ls=":", lw=1)
    ax.set_title(name)
    ax.set_xlabel(r"logit $\ell_3$")
axes[0].set_ylabel("weight $w_e$ (0 = not chosen)")
axes[1].legend()
plt.tight_layout()
plt.show()

w_mix = dense_weights(grid, 2, True)
i = np.searchsorted(sweep, 0.8)
print("jump of expert 3's weight at the boundary:", w_mix[i + 1, 3] - w_mix[i - 1, 3])

# %% [markdown]
# A consequence for initialisation: if the router starts at exactly zero, every logit ties, the
# stable top-$K$ picks experts $0..K-1$ for every token, and the gradient has no reason to break the
# tie evenly. A small random router init (minimoe uses $\mathcal{N}(0, \sigma^2)$ with
# `router_init_std`) or noise breaks the symmetry.

# %%
print("zero router, 5 tokens, K=2 ->", backend.topk_indices(np.zeros((5, 4)), 2).tolist())

# %% [markdown]
# ## Noisy top-K gating
#
# Shazeer et al. (2017, eqs. 3–5), the paper that brought MoE to deep learning, add noise to the
# logits before choosing, with a **learned** per-expert scale:
#
# $$H(x)_e = (x W_g)_e + \varepsilon_e \cdot \mathrm{softplus}\big((x W_\text{noise})_e\big), \qquad
#   \varepsilon_e \sim \mathcal{N}(0, 1), \qquad G(x) = \mathrm{softmax}(\mathrm{KeepTopK}(H(x), K)).$$
#
# $\mathrm{softplus}(z) = \log(1 + e^z) > 0$ keeps the scale positive; its derivative is the sigmoid, so
# $\partial H_e / \partial (x W_\text{noise})_e = \varepsilon_e\, \sigma((x W_\text{noise})_e)$. During
# training the noise lets an expert just below the boundary be chosen now and then (exploration) and
# the router can learn to turn the noise down where it hurts; at evaluation the noise is off.
#
# In expectation over $\varepsilon$ the hard step of the previous plot becomes smooth: below is the
# probability that expert 3 is chosen, estimated by sampling, for three noise scales.

# %%
rng = np.random.default_rng(2)
fig, ax = plt.subplots(figsize=(6, 3.4))
for scale in (0.0, 0.3, 1.0):
    # softplus(z) = scale  <=>  z = log(e^scale - 1); scale 0 means no noise
    noise_logit = np.log(np.expm1(scale)) if scale > 0 else -np.inf
    chosen = np.zeros(sweep.size)
    for _ in range(400):
        eps = rng.standard_normal(grid.shape)
        if scale > 0:
            H, _ = router.noisy_logits_forward(grid, np.full(grid.shape, noise_logit), eps)
        else:
            H = grid
        chosen += (backend.topk_indices(H, 2) == 3).any(axis=-1)
    ax.plot(sweep, chosen / 400, label=f"softplus scale {scale}")
ax.set_xlabel(r"logit $\ell_3$")
ax.set_ylabel("P(expert 3 in top-2)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The noisy logits' backward (from `minimoe.ops.router`) passes a gradient to both the clean logits and
# the noise logits; a gradient check with a fixed draw of $\varepsilon$:

# %%
rng = np.random.default_rng(3)
clean, noise_logits, eps = (rng.standard_normal((6, 4)) for _ in range(3))
errs = check_op(
    lambda c, z: router.noisy_logits_forward(c, z, eps),
    router.noisy_logits_backward,
    [clean, noise_logits],
    eps=1e-5,
)
print("noisy logits gradient check:", errs)
assert max(errs.values()) <= 1e-6

# %% [markdown]
# ## Summary
#
# - The renormalised gate (Mixtral) is the softmax of the top-$K$ logits; the unrenormalised gate
#   (Switch, OLMoE, DeepSeekMoE) is the full-softmax probability. Different functions, different
#   gradients: only the latter moves the logits of experts that were not chosen.
# - Which experts are chosen has no gradient. The gate values carry all of it.
# - $K = 1$ with renormalisation gives a constant gate of 1 and a router that never learns from the LM
#   loss.
# - Noise (Shazeer et al. 2017) smooths the choice in expectation and makes the router explore.
#
# ## Exercises
#
# 1. For the unrenormalised gate, derive $\partial g_k / \partial \ell_e$ for an expert $e \notin S$
#    (answer: $-g_k p_e$) and confirm it numerically with `minimoe.gradcheck.numerical_gradient`. Why is
#    the same derivative exactly zero for Mixtral's gate?
# 2. DeepSeek-V3 (DeepSeek-AI 2024, eqs. 13–16) uses sigmoid scores $s = \sigma(\ell)$, chooses by
#    $s + b$ with a balancing bias $b$, and renormalises the *unbiased* $s$ over the chosen experts
#    (`router.sigmoid_bias_topk_forward`). Build a token for which a bias changes the chosen set, and
#    show that with $b = 0$ its gates differ from Mixtral's softmax gates for the same logits.
# 3. Shazeer et al. (2017, eqs. 8–9) turn the smooth curves above into a differentiable *load* estimate:
#    $P(x, e) = \Phi\big((\ell_e - \mathrm{kth}_{-e}(H)) / \mathrm{softplus}((x W_\text{noise})_e)\big)$,
#    where $\mathrm{kth}_{-e}(H)$ is the $K$-th largest noisy logit among the *other* experts.
#    Implement it for the sweep above and compare it with the sampled curves.
# 4. Train the tiny model of the K = 1 section for a few steps with `AdamW(..., weight_decay=0.0)` and
#    `renormalize=True`: confirm that the router weights never change. Then set `aux_loss_coef=0.01`
#    and watch them move — from the balancing loss alone (Lesson 07).


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe's own router (run at build time)."""
    import numpy as np

    from minimoe.ops import router

    rng = np.random.default_rng(1)
    out = {
        "logits_random": rng.standard_normal((7, 5)),
        "logits_ties": rng.integers(0, 3, (7, 5)).astype(np.float64),  # many ties
        "logits_large": 800.0 + 30.0 * rng.standard_normal((7, 5)),  # exp() overflows without the max
    }
    for kind in ("random", "ties", "large"):
        for k in (1, 2, 3):
            for renorm in (True, False):
                gates, idx, cache = router.softmax_topk_forward(out[f"logits_{kind}"], k, renorm)
                out[f"gates_{kind}_k{k}_{renorm}"] = gates
                out[f"idx_{kind}_k{k}"] = idx
    for k in (1, 2, 3):
        dgates = rng.standard_normal((7, k))
        out[f"dgates_k{k}"] = dgates
        for renorm in (True, False):
            cache = router.softmax_topk_forward(out["logits_random"], k, renorm)[2]
            out[f"dlogits_k{k}_{renorm}"] = router.softmax_topk_backward(dgates, cache)
    return out
