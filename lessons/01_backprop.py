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
import math

import matplotlib.pyplot as plt
import numpy as np

from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference

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


# %% [markdown]
# **Your turn.** Write the backward. The cache holds `(x, w)`; return `dx, dw, db`.


# %%
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
# **Check.** Shapes first; then a float64 numerical gradient check (central differences,
# $h = 10^{-6}$) of $L = \sum y \odot dy$, whose gradient with respect to $y$ is exactly $dy$; then the
# values the package's `minimoe.ops.linear` gives on the same inputs (stored in `01_backprop.npz`).
# The input is `(B, T, C)`, so that the sum over positions is exercised.

# %% check id=linear_backward points=2
FN = "linear_backward"


def check_linear_backward(CASE, key):
    x, w, b, dy = (reference("01", f"{key}_{v}") for v in ("x", "w", "b", "dy"))
    with case(FN, CASE):
        dx, dw, db = linear_backward(dy, linear_forward(x, w, b)[1])
    grads = {"dx": (dx, x), "dw": (dw, w), "db": (db, b)}
    for name, (grad, wrt) in grads.items():
        check_shape(FN, CASE, name, grad, wrt.shape, "f")
    for name, (grad, wrt) in grads.items():
        check_gradient(
            FN, CASE, lambda: float((linear_forward(x, w, b)[0] * dy).sum()), wrt, grad, 1e-6, name=name
        )
    for name, (grad, _) in grads.items():
        check_close(FN, CASE, name, grad, reference("01", f"{key}_{name}_ref"), 1e-10)


for CASE, key in (("x (2, 3, 4) w (4, 5)", "lin3d"), ("x (6, 4) w (4, 5)", "lin2d")):
    check_linear_backward(CASE, key)
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


# huge logits: the stable forward does not overflow
big = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
print("logits", big[0], "-> loss for target 1:", cross_entropy_forward(big, np.array([1]))[0])

# %% [markdown]
# **Your turn.** The cache holds the probabilities `probs` (N, V) and the `targets` (N,). Return
# `dlogits` (N, V), including the factor `dloss / N`.


# %%
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
# **Check** (shapes, numerical gradient, then the values of `minimoe.ops.loss`), with an upstream
# `dloss` of 1 and of 0.5.

# %% check id=cross_entropy_backward points=2
FN = "cross_entropy_backward"


def check_cross_entropy_backward(dloss):
    logits, targets = reference("01", "ce_logits"), reference("01", "ce_targets")
    N, V = logits.shape
    CASE = f"N={N} V={V} dloss={dloss}"
    with case(FN, CASE):
        dlogits = cross_entropy_backward(dloss, cross_entropy_forward(logits, targets)[1])
    check_shape(FN, CASE, "dlogits", dlogits, (N, V), "f")
    loss = lambda: dloss * float(cross_entropy_forward(logits, targets)[0])
    check_gradient(FN, CASE, loss, logits, dlogits, 1e-6, name="dlogits")
    check_close(FN, CASE, "dlogits", dlogits, dloss * reference("01", "ce_dlogits_ref"), 1e-10)


for dloss in (1.0, 0.5):
    check_cross_entropy_backward(dloss)
print("cross_entropy_backward is correct")

# %% [markdown]
# The gradient $p - \mathrm{onehot}(t)$ has a pleasant reading: it pushes the correct logit up by
# $1 - p_t$ (a lot when the model was wrong, little when it was right) and every other logit down by
# its probability; each row sums to $1 - 1 = 0$. Note also what a loss value means: a model that
# guesses uniformly among $V$ classes scores $\log V$ (here $\log 5 \approx 1.61$); a perfect one
# scores 0.
#
# ## 3. Non-linearities: GELU and SwiGLU
#
# Between two linear layers sits an elementwise non-linearity (without it, two linear layers are one
# linear layer). GPT-2 uses **GELU**, Llama and Mixtral use **SwiGLU**. Both are smooth, so their
# backward is one derivative each, by the chain rule: for $y = f(x)$ elementwise,
# $dx = dy \odot f'(x)$.
#
# **GELU** (Hendrycks & Gimpel 2016) weights its input by the probability that a standard normal
# variable lies below it:
#
# $$\mathrm{GELU}(x) = x\,\Phi(x), \qquad \Phi(x) = \tfrac12\big(1 + \mathrm{erf}(x/\sqrt2)\big), \qquad
#   \phi(x) = \Phi'(x) = \frac{e^{-x^2/2}}{\sqrt{2\pi}} .$$
#
# *Exact derivative*, by the product rule:
#
# $$\frac{d}{dx}\,x\Phi(x) = \Phi(x) + x\,\phi(x).$$
#
# *The tanh approximation* (GPT-2's `gelu_new`; Hendrycks & Gimpel, sec. 2) replaces $\Phi$ by a tanh
# curve with the same slope at 0 and a cubic correction fitted to the tails:
#
# $$\Phi(x) \approx \tfrac12\big(1 + \tanh u\big), \qquad u = \sqrt{2/\pi}\,\big(x + 0.044715\,x^3\big).$$
#
# With $t = \tanh u$, $\mathrm{GELU}(x) \approx \tfrac12 x (1 + t)$. Product rule again, with
# $\frac{d}{dx}\tanh u = (1 - t^2)\,u'$ and $u' = \sqrt{2/\pi}\,(1 + 3 \cdot 0.044715\,x^2)$:
#
# $$\frac{d}{dx}\,\tfrac12 x(1 + t) = \tfrac12(1 + t) + \tfrac12 x\,(1 - t^2)\,\sqrt{2/\pi}\,\big(1 + 3 \cdot
#   0.044715\,x^2\big).$$
#
# Keep in the cache what the backward needs: $x$, and $t$ (tanh) or $\Phi(x)$ (exact). NumPy has no
# `erf`; we vectorise Python's `math.erf` (slow, but fine at this size; the package has a fast one).
#
# **SwiGLU** (Shazeer 2020) is a *gated* unit with two inputs: the gate projection $a = xW_1$ and the
# up projection $b = xW_3$ of the same token,
#
# $$\mathrm{SwiGLU}(a, b) = \mathrm{SiLU}(a) \odot b, \qquad \mathrm{SiLU}(a) = a\,\sigma(a), \qquad
#   \sigma(a) = \frac{1}{1 + e^{-a}} .$$
#
# With $\sigma' = \sigma(1 - \sigma)$ the product rule gives $\mathrm{SiLU}'(a) = \sigma(a) + a\,\sigma(a)
# (1 - \sigma(a))$, and since the output is a product of two factors,
#
# $$da = dy \odot b \odot \big(\sigma(a) + a\,\sigma(a)(1 - \sigma(a))\big), \qquad db = dy \odot a\,\sigma(a).$$
#
# In the MLP $y = \mathrm{SwiGLU}(xW_1, xW_3)\,W_2$, $x$ feeds both projections, so its gradient is the
# *sum* of what comes back through $W_1$ and through $W_3$ (Lesson 06 uses this MLP for every expert).

# %%
erf = np.vectorize(math.erf, otypes=[float])  # the error function, elementwise
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# %% [markdown]
# **Your turn.** Write `gelu_forward` for both variants (`approximate="tanh"` and `"none"`, exact),
# returning `y, cache`, and `gelu_backward`.


# %%
def gelu_forward(x, approximate="tanh"):
    """x (...) -> y (...) = x * Phi(x), Phi exact (approximate="none") or its tanh approximation."""
    ### BEGIN SOLUTION
    if approximate == "tanh":
        t = np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
        return 0.5 * x * (1.0 + t), (x, t, approximate)
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))  # Phi(x)
    return x * cdf, (x, cdf, approximate)
    ### END SOLUTION


# %%
def gelu_backward(dy, cache):
    """dy (...) -> dx (...) = dy * GELU'(x), for the variant the forward used."""
    ### BEGIN SOLUTION
    x, aux, approximate = cache
    if approximate == "tanh":
        t = aux
        du = SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
        return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)  # phi(x)
    return dy * (aux + x * pdf)
    ### END SOLUTION


# %% [markdown]
# **Check** both variants on 40 points in $[-5, 5]$ (`(4, 10)`), against the values of
# `minimoe.ops.activation.gelu_forward` and `gelu_backward`.

# %% check id=gelu_forward points=1
FN = "gelu_forward"
x = reference("01", "gelu_x")
for approximate in ("tanh", "none"):
    CASE = f"approximate={approximate!r}"
    with case(FN, CASE):
        y, _ = gelu_forward(x, approximate)
    check_shape(FN, CASE, "y", y, x.shape, "f")
    check_close(FN, CASE, "y", y, reference("01", f"gelu_y_{approximate}"), 1e-10)
print("gelu_forward is correct")

# %% check id=gelu_backward points=2
FN = "gelu_backward"


def check_gelu_backward(approximate):
    x, dy = reference("01", "gelu_x"), reference("01", "gelu_dy")
    CASE = f"approximate={approximate!r}"
    with case(FN, CASE):
        dx = gelu_backward(dy, gelu_forward(x, approximate)[1])
    check_shape(FN, CASE, "dx", dx, x.shape, "f")
    check_gradient(
        FN, CASE, lambda: float((gelu_forward(x, approximate)[0] * dy).sum()), x, dx, 1e-6, name="dx"
    )
    check_close(FN, CASE, "dx", dx, reference("01", f"gelu_dx_{approximate}"), 1e-10)


for approximate in ("tanh", "none"):
    check_gelu_backward(approximate)
print("gelu_backward is correct")

# %% [markdown]
# **Your turn.** The forward of SwiGLU is given; write its backward, returning `da, db`.


# %%
def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def swiglu_forward(a, b):
    """a, b (...) -> y (...) = SiLU(a) * b = a * sigmoid(a) * b."""
    s = sigmoid(a)
    return a * s * b, (a, b, s)


# %%
def swiglu_backward(dy, cache):
    """dy (...) -> da (...), db (...)."""
    a, b, s = cache
    ### BEGIN SOLUTION
    da = dy * b * (s + a * s * (1.0 - s))
    db = dy * a * s
    ### END SOLUTION
    return da, db


# %% check id=swiglu_backward points=2
FN = "swiglu_backward"
a, b, dy = reference("01", "swiglu_a"), reference("01", "swiglu_b"), reference("01", "swiglu_dy")
CASE = f"a, b {a.shape}"
with case(FN, CASE):
    da, db = swiglu_backward(dy, swiglu_forward(a, b)[1])
check_shape(FN, CASE, "da", da, a.shape, "f")
check_shape(FN, CASE, "db", db, b.shape, "f")
check_gradient(FN, CASE, lambda: float((swiglu_forward(a, b)[0] * dy).sum()), a, da, 1e-6, name="da")
check_gradient(FN, CASE, lambda: float((swiglu_forward(a, b)[0] * dy).sum()), b, db, 1e-6, name="db")
check_close(FN, CASE, "da", da, reference("01", "swiglu_da"), 1e-10)
check_close(FN, CASE, "db", db, reference("01", "swiglu_db"), 1e-10)
print("swiglu_backward is correct")

# %% [markdown]
# The three curves and their slopes. The tanh GELU stays within $10^{-3}$ of the exact one
# everywhere; SiLU (the gate of SwiGLU) has the same shape with a softer knee. All three dip slightly
# below zero for negative inputs, and their slopes exceed 1 a little for positive ones: unlike ReLU,
# they are smooth, so a gradient check sees no kink.

# %%
xs = np.linspace(-4, 4, 401)
curves = {
    "GELU (exact)": gelu_forward(xs, "none"),
    "GELU (tanh)": gelu_forward(xs, "tanh"),
    "SiLU": (xs * sigmoid(xs), None),
}
slopes = {
    "GELU (exact)": gelu_backward(np.ones_like(xs), curves["GELU (exact)"][1]),
    "GELU (tanh)": gelu_backward(np.ones_like(xs), curves["GELU (tanh)"][1]),
    "SiLU": swiglu_backward(np.ones_like(xs), swiglu_forward(xs, np.ones_like(xs))[1])[0],
}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for name in curves:
    axes[0].plot(xs, curves[name][0], label=name, ls="--" if "tanh" in name else "-")
    axes[1].plot(xs, slopes[name], label=name, ls="--" if "tanh" in name else "-")
axes[0].set_title("activation")
axes[1].set_title("derivative")
for ax in axes:
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("x")
    ax.legend()
plt.tight_layout()
plt.show()
gap = np.abs(curves["GELU (exact)"][0] - curves["GELU (tanh)"][0]).max()
print(f"largest gap between the exact and the tanh GELU on [-4, 4]: {gap:.1e}")

# %% [markdown]
# ## 4. Training with your layers
#
# A classifier of 2-D points into 3 classes, on a spiral data set that no straight line separates
# (after cs231n's classic example). Model A is **softmax regression**: logits $= xW + b$. Model B
# puts a hidden layer with your tanh GELU in between: logits $= \mathrm{GELU}(x W_1 + b_1) W_2 + b_2$.
# Its backward visits the same layers in **reverse order**, each passing its `dx` on as the next one's
# `dy`. Full-batch gradient descent, $W \leftarrow W - \eta\, dW$.


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
    a, ca = gelu_forward(h)
    logits, c2 = linear_forward(a, p["w2"], p["b2"])  # (N, 3)

    def backward(dlogits):  # the forward, read from the bottom up
        da, dw2, db2 = linear_backward(dlogits, c2)
        dh = gelu_backward(da, ca)
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
#    `db`). Which step of the check catches it, and what does its message say?
# 3. *Label smoothing* (Szegedy et al. 2016) trains against the target distribution
#    $(1-\alpha)\,\mathrm{onehot}(t) + \alpha / V$. Derive its gradient with respect to $z$
#    (answer: $p$ minus that distribution) and check it with `minimoe.gradcheck.check_op`.
# 4. Train model B with learning rates 0.1, 1 and 5. What happens to the loss curve at 5?
# 5. Train model B with the exact GELU and with ReLU, $\max(x, 0)$ (derivative: 1 where $x > 0$).
#    Why does a numerical gradient check of ReLU fail near $x = 0$, and not for GELU?


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe's own ops (run at build time)."""
    import numpy as np

    from minimoe.ops import activation, linear, loss

    rng = np.random.default_rng(0)
    out = {}
    for key, shape in (("lin3d", (2, 3, 4)), ("lin2d", (6, 4))):
        x, w, b = rng.standard_normal(shape), rng.standard_normal((4, 5)), rng.standard_normal(5)
        dy = rng.standard_normal((*shape[:-1], 5))
        grads = linear.linear_backward(dy, linear.linear_forward(x, w, b)[1])
        out.update({f"{key}_x": x, f"{key}_w": w, f"{key}_b": b, f"{key}_dy": dy})
        out.update({f"{key}_{n}_ref": g for n, g in zip(("dx", "dw", "db"), grads)})
    logits, targets = rng.standard_normal((6, 5)) * 2, rng.integers(0, 5, 6)
    out.update(ce_logits=logits, ce_targets=targets)
    out["ce_dlogits_ref"] = loss.cross_entropy_backward(1.0, loss.cross_entropy_forward(logits, targets)[1])
    x = np.linspace(-5, 5, 40).reshape(4, 10) + 0.01 * rng.standard_normal((4, 10))
    dy = rng.standard_normal((4, 10))
    out.update(gelu_x=x, gelu_dy=dy)
    for approximate in ("tanh", "none"):
        y, cache = activation.gelu_forward(x, approximate)
        out[f"gelu_y_{approximate}"] = y
        out[f"gelu_dx_{approximate}"] = activation.gelu_backward(dy, cache)
    a, b, dy = (rng.standard_normal((3, 7)) * 2 for _ in range(3))
    da, db = activation.swiglu_backward(dy, activation.swiglu_forward(a, b)[1])
    out.update(swiglu_a=a, swiglu_b=b, swiglu_dy=dy, swiglu_da=da, swiglu_db=db)
    return out
