# %% [markdown]
# # Lesson 01 — Backpropagation by hand: the linear layer and softmax cross-entropy
#
# A neural network is a chain of functions $x \to h_1 \to h_2 \to \dots \to L$ ending in a scalar
# loss $L$. Backpropagation (Rumelhart, Hinton & Williams 1986) is the chain rule applied from the
# end: if we know $\partial L/\partial y$ for a layer's output $y = f(x)$, the layer alone can turn
# it into $\partial L/\partial x$ (to pass on) and $\partial L/\partial W$ (to learn from), without
# knowing anything about the rest of the network.
#
# So every layer in minimoe is a **pair** of functions:
#
# ```python
# y, cache = layer_forward(x, w)       # cache: what the backward will need
# dx, dw = layer_backward(dy, cache)   # dy = dL/dy  ->  dL/dx, dL/dw
# ```
#
# We write `dy` for $\partial L/\partial y$: an array of the **same shape as** $y$. In this lesson you
# write the backward of the two layers at the two ends of a language model, the **linear layer** and
# the **softmax cross-entropy loss**, check them numerically, and train a small classifier with them.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minimoe.gradcheck import check_op, rel_error
from minimoe.ops import activation, linear, loss

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The linear layer
#
# $$y = x W + b, \qquad x \in \mathbb{R}^{N \times C_{in}},\ W \in \mathbb{R}^{C_{in} \times C_{out}},
#   \ b \in \mathbb{R}^{C_{out}},\ y \in \mathbb{R}^{N \times C_{out}}.$$
#
# In a transformer $x$ is `(B, T, C_in)`: every position is one row, and the same $W$ serves all
# $N = B \cdot T$ of them. Element by element, $y_{nj} = \sum_i x_{ni} W_{ij} + b_j$. The chain rule
# sums over every output that an input touches:
#
# $$\frac{\partial L}{\partial x_{ni}} = \sum_j \frac{\partial L}{\partial y_{nj}} W_{ij}
#   \;\Rightarrow\; dx = dy\, W^\top, \qquad
#   \frac{\partial L}{\partial W_{ij}} = \sum_n x_{ni} \frac{\partial L}{\partial y_{nj}}
#   \;\Rightarrow\; dW = x^\top dy, \qquad
#   \frac{\partial L}{\partial b_j} = \sum_n \frac{\partial L}{\partial y_{nj}}.$$
#
# A handy way to remember them: each gradient has the shape of its variable, and there is only one
# way to multiply `dy (N, C_out)` with `W (C_in, C_out)` or `x (N, C_in)` to get that shape. The sum
# over $n$ in $dW$ and $db$ is the sum over **every** position: with `(B, T, C)` inputs, flatten the
# leading axes first.


# %%
def linear_forward(x, w, b):
    """x (..., C_in), w (C_in, C_out), b (C_out,) -> y (..., C_out)."""
    y = x @ w + b
    return y, (x, w)


def linear_backward(dy, cache):
    """dy (..., C_out) -> dx (..., C_in), dw (C_in, C_out), db (C_out,)."""
    x, w = cache
    ### BEGIN SOLUTION
    c_in, c_out = w.shape
    dx = dy @ w.T
    dw = x.reshape(-1, c_in).T @ dy.reshape(-1, c_out)  # sums over all leading positions
    db = dy.reshape(-1, c_out).sum(axis=0)
    ### END SOLUTION
    return dx, dw, db


# %% [markdown]
# **Check** against the package's `minimoe.ops.linear`, then numerically (float64, $h = 10^{-5}$), on a
# `(B, T, C)` input so that the sum over positions is exercised.

# %%
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 4))  # (B, T, C_in)
w = rng.standard_normal((4, 5))  # (C_in, C_out)
b = rng.standard_normal(5)
dy = rng.standard_normal((2, 3, 5))

y, cache = linear_forward(x, w, b)
mine = linear_backward(dy, cache)
ref = linear.linear_backward(dy, linear.linear_forward(x, w, b)[1])
for name, m, r in zip(("dx", "dw", "db"), mine, ref):
    assert m.shape == r.shape, f"{name} has shape {m.shape}, expected {r.shape}"
    assert rel_error(m, r) < 1e-12, f"{name} differs from minimoe.ops.linear: {rel_error(m, r):.1e}"
errs = check_op(linear_forward, linear_backward, [x, w, b], eps=1e-5)
print("numerical check, rel errors:", {k: f"{v:.1e}" for k, v in errs.items()})
assert max(errs.values()) < 1e-6
print("linear_backward is correct")

# %% [markdown]
# ## 2. Softmax and cross-entropy
#
# A language model's last layer gives **logits** $z \in \mathbb{R}^V$ for each position, one per
# vocabulary entry. Softmax turns them into probabilities and cross-entropy scores the probability
# given to the correct next token $t$:
#
# $$p_i = \frac{e^{z_i}}{\sum_j e^{z_j}}, \qquad \ell = -\log p_t = -z_t + \log \sum_j e^{z_j}.$$
#
# The loss $L$ is the mean of $\ell$ over the $N$ positions. **Stability:** $e^{z}$ overflows in
# float32 for $z > 88$; since softmax is unchanged by subtracting a constant, we subtract
# $m = \max_j z_j$ first, and compute $\log \sum_j e^{z_j} = m + \log \sum_j e^{z_j - m}$.
#
# **The backward** is the famous one-liner. Differentiate the second form of $\ell$:
#
# $$\frac{\partial \ell}{\partial z_i} = -[i = t] + \frac{e^{z_i}}{\sum_j e^{z_j}} = p_i - [i = t],
#   \qquad\text{i.e.}\qquad \frac{\partial \ell}{\partial z} = \mathrm{softmax}(z) - \mathrm{onehot}(t).$$
#
# The softmax Jacobian $\partial p_i/\partial z_k = p_i([i = k] - p_k)$ never has to be formed: its
# product with $\partial \ell/\partial p = -[i=t]/p_t$ collapses to the line above. With the mean over
# $N$ positions, each row gets a factor $1/N$, and an upstream `dloss` (usually 1) scales everything.


# %%
def cross_entropy_forward(logits, targets):
    """logits (N, V), targets (N,) integer -> loss (scalar): mean of -log softmax(logits)[target]."""
    N = logits.shape[0]
    z = logits - logits.max(axis=-1, keepdims=True)  # stable: the max logit becomes 0
    log_sum = np.log(np.exp(z).sum(axis=-1, keepdims=True))
    logp = z - log_sum  # log softmax (N, V)
    loss_value = -logp[np.arange(N), targets].mean()
    return loss_value, (np.exp(logp), targets)


def cross_entropy_backward(dloss, cache):
    """dloss (scalar) -> dlogits (N, V) = dloss * (softmax(logits) - onehot(targets)) / N."""
    probs, targets = cache
    ### BEGIN SOLUTION
    N = probs.shape[0]
    dlogits = probs.copy()
    dlogits[np.arange(N), targets] -= 1.0
    dlogits *= dloss / N
    ### END SOLUTION
    return dlogits


# %% [markdown]
# **Check** against `minimoe.ops.loss` (which also handles `(B, T, V)` logits and ignored targets), and
# numerically. `check_op` draws a random upstream `dloss`, a 0-d array, and checks the gradient with
# respect to input 0, the logits (integer targets have no gradient).

# %%
rng = np.random.default_rng(1)
N, V = 6, 5
logits = rng.standard_normal((N, V)) * 2
targets = rng.integers(0, V, N)

l_mine, c_mine = cross_entropy_forward(logits, targets)
l_ref, c_ref = loss.cross_entropy_forward(logits, targets)
assert abs(l_mine - float(l_ref)) < 1e-12
d_mine = cross_entropy_backward(1.0, c_mine)
d_ref = loss.cross_entropy_backward(1.0, c_ref)
assert d_mine.shape == (N, V), f"dlogits must have shape {(N, V)}, got {d_mine.shape}"
assert rel_error(d_mine, d_ref) < 1e-12, f"differs from minimoe.ops.loss: {rel_error(d_mine, d_ref):.1e}"
assert np.allclose(d_mine.sum(axis=-1), 0.0)  # each row of p - onehot sums to 1 - 1 = 0
errs = check_op(cross_entropy_forward, cross_entropy_backward, [logits, targets], wrt=[0], eps=1e-5)
print(f"numerical check, rel error: {errs[0]:.1e}")
assert errs[0] < 1e-6
print("cross_entropy_backward is correct")

# huge logits: the stable forward does not overflow
big = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
print("logits", big[0], "-> loss for target 1:", cross_entropy_forward(big, np.array([1]))[0])

# %% [markdown]
# The gradient $p - \mathrm{onehot}(t)$ has a pleasant reading: it pushes the correct logit up by
# $1 - p_t$ (a lot when the model was wrong, little when it was right) and every other logit down by
# its probability. Note also what a loss value means: a model that guesses uniformly among $V$
# classes scores $\log V$ (here $\log 5 \approx 1.61$); a perfect one scores 0.
#
# ## 3. Training with your two layers
#
# A classifier of 2-D points into 3 classes, on a spiral data set that no straight line separates
# (after cs231n's classic example). Model A is **softmax regression**: logits $= xW + b$. Model B
# puts a hidden layer with the GELU non-linearity in between (`minimoe.ops.activation`, derived in a
# later lesson): logits $= \mathrm{GELU}(x W_1 + b_1) W_2 + b_2$. Its backward visits the same
# layers in **reverse order**, each passing its `dx` on as the next one's `dy`. Full-batch gradient
# descent, $W \leftarrow W - \eta\, dW$.


# %%
def spiral(n_per_class=100, n_classes=3, seed=0):
    """Points (N, 2) on n_classes interleaved spiral arms, labels (N,)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for k in range(n_classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        angle = np.linspace(k * 4.0, (k + 1) * 4.0, n_per_class) + rng.standard_normal(n_per_class) * 0.2
        xs.append(np.stack([r * np.sin(angle), r * np.cos(angle)], axis=1))
        ys.append(np.full(n_per_class, k))
    return np.concatenate(xs), np.concatenate(ys)


X, Y = spiral()
rng = np.random.default_rng(0)
HID = 64
params_a = {"w": rng.standard_normal((2, 3)) * 0.1, "b": np.zeros(3)}
params_b = {"w1": rng.standard_normal((2, HID)), "b1": np.zeros(HID),
            "w2": rng.standard_normal((HID, 3)) * 0.1, "b2": np.zeros(3)}  # fmt: skip


def model_a(p, x):
    logits, c = linear_forward(x, p["w"], p["b"])

    def backward(dlogits):
        _, dw, db = linear_backward(dlogits, c)
        return {"w": dw, "b": db}

    return logits, backward


def model_b(p, x):
    h, c1 = linear_forward(x, p["w1"], p["b1"])  # (N, HID)
    a, ca = activation.gelu_forward(h)
    logits, c2 = linear_forward(a, p["w2"], p["b2"])  # (N, 3)

    def backward(dlogits):  # the forward, read from the bottom up
        da, dw2, db2 = linear_backward(dlogits, c2)
        dh = activation.gelu_backward(da, ca)
        _, dw1, db1 = linear_backward(dh, c1)
        return {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}

    return logits, backward


def train(model, p, steps=1500, lr=1.0):
    history = []
    for _ in range(steps):
        logits, backward = model(p, X)
        loss_value, c = cross_entropy_forward(logits, Y)
        grads = backward(cross_entropy_backward(1.0, c))
        for k in p:
            p[k] -= lr * grads[k]
        history.append(loss_value)
    return history


hist_a, hist_b = train(model_a, params_a), train(model_b, params_b)
acc_a = (model_a(params_a, X)[0].argmax(1) == Y).mean()
acc_b = (model_b(params_b, X)[0].argmax(1) == Y).mean()
print(f"softmax regression: loss {hist_a[-1]:.3f}, accuracy {acc_a:.0%}")
print(f"one hidden layer:   loss {hist_b[-1]:.3f}, accuracy {acc_b:.0%}")
assert hist_b[-1] < hist_a[-1] < np.log(3)

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
axes[0].plot(hist_a, label="softmax regression")
axes[0].plot(hist_b, label="one hidden layer (GELU)")
axes[0].axhline(np.log(3), color="grey", ls=":", label="uniform guess, log 3")
axes[0].set_xlabel("step")
axes[0].set_ylabel("cross-entropy")
axes[0].legend()
g = np.linspace(-1.1, 1.1, 200)
grid = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
for ax, model, p, title in ((axes[1], model_a, params_a, "softmax regression"),
                            (axes[2], model_b, params_b, "one hidden layer")):  # fmt: skip
    regions = model(p, grid)[0].argmax(1).reshape(200, 200)
    ax.contourf(g, g, regions, levels=[-0.5, 0.5, 1.5, 2.5], colors=["#fbb4ae", "#b3cde3", "#ccebc5"])
    ax.scatter(X[:, 0], X[:, 1], c=np.array(["#e41a1c", "#377eb8", "#4daf4a"])[Y], s=8)
    ax.set_title(f"decision regions: {title}")
    ax.set_aspect("equal")
plt.tight_layout()
plt.show()

# %% [markdown]
# The linear model can only cut the plane with straight lines, so its loss stalls well above zero;
# one hidden layer bends the boundaries around the arms. The whole "deep learning" machinery of the
# coming lessons is this loop at a larger scale: forward, loss, backward in reverse, update.
#
# ## Exercises
#
# 1. Derive $\partial \ell / \partial z$ again, this time through the softmax Jacobian
#    $\partial p_i/\partial z_k = p_i([i=k] - p_k)$ and $\partial \ell/\partial p_i = -[i=t]/p_t$,
#    and check that you get the same $p - \mathrm{onehot}(t)$.
# 2. Break `linear_backward` on purpose (drop the transpose, or forget to sum over the batch in
#    `db`). Which assertions catch it, and how big is the numerical `rel_error`?
# 3. *Label smoothing* (Szegedy et al. 2016) trains against the target distribution
#    $(1-\alpha)\,\mathrm{onehot}(t) + \alpha / V$. Derive its gradient with respect to $z$
#    (answer: $p$ minus that distribution) and check it with `check_op`.
# 4. Train model B with learning rates 0.1, 1 and 5. What happens to the loss curve at 5?
