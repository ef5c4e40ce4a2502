# %% [markdown]
# # Lesson 00 — Setup: arrays, backends and checking a gradient
#
# In these lessons you build a GPT-style language model, dense and then with a Mixture of Experts,
# out of NumPy arrays. There is no autograd: every layer has a **forward** function and a
# hand-written **backward** function, and the only thing that tells us a backward is right is a
# comparison with a numerical derivative. This lesson sets up the three tools used everywhere after:
#
# 1. arrays, and the switch between NumPy (CPU) and CuPy (GPU);
# 2. the one-letter shape legend;
# 3. float32 versus float64, and how to check a gradient numerically. **You build**
#    `numerical_gradient`, the function every later check rests on.
#
# How to use a lesson: read each cell, run it, and look at what it prints. The piece you write sits
# between two marker comments, BEGIN&nbsp;SOLUTION and END&nbsp;SOLUTION; in the handout it is
# `raise NotImplementedError`, and the **check** cell after it tells you when your piece is right. A
# check tests shapes first, then (for a backward pass) a numerical gradient, then the values the
# package computes; when it fails, its one-line message names your function, the case that failed
# and the numbers, e.g. `numerical_gradient, case x (3, 4): grad has shape (12,), expected (3, 4)`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minimoe
from minimoe import backend, gradcheck
from minimoe.lessons.checks import CheckFailed, case, check_close, check_shape, reference
from minimoe.ops import linear

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. Arrays and the backend switch
#
# Every op in `minimoe.ops` asks the arrays it receives which library they belong to
# (`backend.xp_of(x)` returns the module `numpy` or `cupy`) and does its math with that module,
# called `xp` by convention. CuPy copies NumPy's interface, so the *same* code runs on a GPU when
# its inputs are CuPy arrays. New arrays (model parameters, random numbers) are made by the
# *current* backend, chosen with `minimoe.set_backend("numpy" | "cupy")` or the environment
# variable `MINIMOE_BACKEND=cupy`.

# %%
x = np.arange(6.0).reshape(2, 3)  # a (2, 3) array on the host
w = np.ones((3, 4))
y, _ = linear.linear_forward(x, w)  # y = x @ w, computed with the module of x
print("current backend:", minimoe.get_backend(), "| module of x:", backend.xp_of(x).__name__)
print("y =", y.shape, "\n", y)

# %% [markdown]
# Asking for CuPy on a machine without it (or without a GPU) fails with one clear sentence rather
# than a deep traceback. On a laptop you will see that message; on a machine with an NVIDIA GPU and
# `pip install cupy-cuda12x` the switch succeeds, and `backend.to_device` / `backend.to_numpy` move
# arrays across. Either way we switch back to NumPy: all lessons run on the CPU.

# %%
try:
    minimoe.set_backend("cupy")
    xg = backend.to_device(x)  # host -> GPU
    print("CuPy works: x lives in", type(xg).__module__, "| its sum on the host:", backend.to_numpy(xg).sum())
except minimoe.BackendError as err:
    print("No GPU backend on this machine:\n ", err)
finally:
    minimoe.set_backend("numpy")

try:
    minimoe.set_backend("jax")  # not a backend we know
except ValueError as err:
    print("A typo is caught too:\n ", err)
print("back on:", minimoe.get_backend())

# %% [markdown]
# ## 2. The shape legend
#
# Every docstring and comment in minimoe gives shapes with the same letters:
#
# | letter | meaning | letter | meaning |
# |---|---|---|---|
# | B | batch (sequences per step) | V | vocabulary size |
# | T | time (tokens per sequence) | E | experts per MoE layer |
# | C | channels (model width) | K | experts chosen per token |
# | H | attention heads | N | tokens, $N = B \cdot T$ |
# | D | head size, $C = H \cdot D$ | F | hidden width of an MLP / expert |
#
# A batch of token ids is `(B, T)`; after the embedding it is `(B, T, C)`; attention splits the
# channels into heads, `(B, T, C) -> (B, T, H, D) -> (B, H, T, D)`; the experts see the tokens
# flattened, `(N, C)`. Reshapes and transposes are where shapes go wrong, so we print them often.

# %%
B, T, C, H = 2, 5, 12, 3
D = C // H
ids = np.random.default_rng(0).integers(0, 50, (B, T))  # (B, T) token ids
acts = np.random.default_rng(1).standard_normal((B, T, C))  # (B, T, C) activations
heads = acts.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
tokens = acts.reshape(B * T, C)  # (N, C)
print("ids", ids.shape, "| acts", acts.shape, "| heads", heads.shape, "| tokens", tokens.shape)
# the same number, found three ways: batch 1, time 2, head 1, dimension 3
print(acts[1, 2, 1 * D + 3], heads[1, 1, 2, 3], tokens[1 * T + 2, 1 * D + 3])

# %% [markdown]
# ## 3. float32 and float64
#
# A float32 has a 24-bit mantissa: numbers are stored with a relative precision of
# $\varepsilon_{32} = 2^{-23} \approx 1.2\times10^{-7}$. float64 has $\varepsilon_{64} = 2^{-52}
# \approx 2.2\times10^{-16}$. We **train** in float32 (half the memory, and much faster on a GPU),
# but we **check gradients** in float64, for the reason the next section makes visible.

# %%
for dt in (np.float32, np.float64):
    eps = np.finfo(dt).eps
    one = dt(1.0)
    print(f"{np.dtype(dt).name}: eps = {eps:.2e}; 1 + 1e-8 == 1 ? {one + dt(1e-8) == one}")

# %% [markdown]
# ## 4. Checking a gradient numerically
#
# For a scalar function $f$ of an array $x$, the derivative with respect to one entry is
# approximated by the **central difference**
#
# $$\frac{\partial f}{\partial x_i} \approx \frac{f(x + h\,e_i) - f(x - h\,e_i)}{2h},$$
#
# where $e_i$ is the unit vector of entry $i$. A Taylor expansion shows its error: the even terms
# cancel, leaving a **truncation error** $\frac{h^2}{6} f'''$. But $f$ itself is only computed to a
# relative precision $\varepsilon$, and dividing that **round-off** by $2h$ gives an error of about
# $\varepsilon |f| / h$. The total, $\sim h^2 + \varepsilon / h$, is smallest near
# $h \approx \varepsilon^{1/3}$: about $5\times10^{-3}$ in float32 (where the best we can get is an
# error near $10^{-5}$, useless for telling a subtle bug from noise) and about $6\times10^{-6}$ in
# float64, with errors near $10^{-11}$. That is why every check in these lessons runs in float64
# with $h = 10^{-5}$. The picture: the error of the central difference of $f(x) = \tanh(x)$ at
# $x = 0.7$, against the exact derivative $1 - \tanh^2 x$, for many step sizes $h$.

# %%
hs = np.logspace(-12, -0.5, 60)
x0, exact = 0.7, 1.0 - np.tanh(0.7) ** 2
fig, ax = plt.subplots(figsize=(6, 3.8))
for dt, colour in ((np.float32, "tab:red"), (np.float64, "tab:blue")):
    xv = dt(x0)
    err = [abs(float((np.tanh(xv + dt(h)) - np.tanh(xv - dt(h))) / (dt(2) * dt(h))) - exact) for h in hs]
    ax.loglog(hs, np.maximum(err, 1e-17), ".-", color=colour, label=np.dtype(dt).name)
ax.axvline(1e-5, color="grey", ls=":", label="h = 1e-5 (our checks)")
ax.set_xlabel("step h")
ax.set_ylabel("|central difference - exact|")
ax.set_title("round-off (left) vs truncation (right)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ### The error measure
#
# How far apart are an analytic gradient $a$ and a numerical one $n$? An absolute difference means
# nothing without a scale, and a per-entry relative error $|a_i - n_i| / |n_i|$ explodes wherever a
# gradient entry happens to be near 0. minimoe's `gradcheck.rel_error` uses one scale for the whole
# tensor, its largest entry:
#
# $$\mathrm{rel\_error}(a, n) = \frac{\max_i |a_i - n_i|}{\max\left(\max_i |a_i|,\ \max_i |n_i|\right)}.$$
#
# How to read it (float64, $h = 10^{-5}$, inputs of size about 1): below $10^{-8}$ is typical for a
# correct backward; we accept $\le 10^{-6}$; a bug (a missing term, a wrong sign, a transpose)
# gives $10^{-2}$ or much more.

# %%
a = np.array([1.0, 2.0, 1e-12])
n = np.array([1.0, 2.0, 2e-12])  # the last entries differ by 100 % but are negligible
per_entry = np.max(np.abs(a - n) / np.abs(n))
print(f"rel_error: {gradcheck.rel_error(a, n):.1e} | worst per-entry relative error: {per_entry:.1f}")

# %% [markdown]
# ### Your turn: `numerical_gradient`
#
# Write the central difference for every entry of `x`. The function `f` takes **no arguments**: it
# reads `x`, which you perturb **in place** (and must restore afterwards), so it works for a weight
# deep inside a model without rebuilding anything. Hints: `x.reshape(-1)` of a contiguous array is a
# *view*, so writing `flat[i] = ...` changes `x`; remember the old value before perturbing it.


# %%
def numerical_gradient(f, x, h=1e-5):
    """Central-difference gradient of the scalar function f() with respect to the float64 array x.

    x is perturbed in place, one entry at a time, and restored. Returns an array shaped like x.
    """
    grad = np.zeros_like(x)
    ### BEGIN SOLUTION
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views of x and grad
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        f_plus = f()
        flat[i] = old - h
        f_minus = f()
        flat[i] = old  # restore
        gflat[i] = (f_plus - f_minus) / (2 * h)
    ### END SOLUTION
    return grad


# %% [markdown]
# **Check.** A function whose gradient we know by hand, $f(x) = \sum_{ij} u_{ij} \tanh(x_{ij})$ with
# $\partial f / \partial x_{ij} = u_{ij} (1 - \tanh^2 x_{ij})$, on a `(3, 4)` array and on a single
# number; then the central differences that `minimoe.gradcheck` computes for the same function
# (stored in `00_setup.npz`). And `x` must be exactly as it was before.

# %% check id=numerical_gradient points=2
FN = "numerical_gradient"


def check_numerical_gradient(key):
    xc, u = reference("00", f"{key}_x"), reference("00", f"{key}_u")
    x_before = xc.copy()
    CASE = f"x {xc.shape}, f = sum(u * tanh(x))"
    with case(FN, CASE):
        num = numerical_gradient(lambda: float((u * np.tanh(xc)).sum()), xc)
    check_shape(FN, CASE, "grad", num, xc.shape, "f")
    check_close(FN, CASE, "x after the call (it must be restored)", xc, x_before, 0)
    check_close(FN, CASE, "grad (vs the exact gradient)", num, u * (1 - np.tanh(xc) ** 2), 1e-8)
    check_close(FN, CASE, "grad (vs minimoe.gradcheck)", num, reference("00", f"{key}_grad"), 1e-8)


for key in ("matrix", "scalar"):
    check_numerical_gradient(key)
print("numerical_gradient is correct")

# %% [markdown]
# ### Using it on a layer
#
# A layer is a pair `y, cache = forward(x, ...)` and `dx, ... = backward(dy, cache)`, where `dy` is
# $\partial L / \partial y$ for whatever scalar loss $L$ sits downstream. To test a backward we pick
# $L = \sum y \odot g$ for a random fixed $g$: then $\partial L / \partial y = g$ exactly, so the
# backward's answer for `dy = g` must match the numerical gradient of $L$. Here it is for the linear
# layer $y = xW + b$ of the package (Lesson 01 derives its backward), with your function:

# %%
rng = np.random.default_rng(1)
xl, wl, bl = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal(5)
g = rng.standard_normal((4, 5))  # plays dL/dy
_, cache = linear.linear_forward(xl, wl, bl)
dx, dw, db = linear.linear_backward(g, cache)


def loss_linear():
    return float((linear.linear_forward(xl, wl, bl)[0] * g).sum())


for name, arr, ana in (("x", xl, dx), ("W", wl, dw), ("b", bl, db)):
    print(f"d{name}: rel_error = {gradcheck.rel_error(ana, numerical_gradient(loss_linear, arr)):.1e}")

# %% [markdown]
# `gradcheck.check_op` packages exactly this recipe (random $g$, every input, float64) and is what
# the later lessons call. And here is what a bug looks like: a backward that forgot the transpose in
# $\partial L/\partial x = g W^\top$ (using a square weight, so the shapes still fit) is off by
# order 1, not by $10^{-6}$. Finally, the same check in float32 refuses to run: its round-off
# would drown the comparison.

# %%
errs = gradcheck.check_op(linear.linear_forward, linear.linear_backward, [xl, wl, bl], eps=1e-5)
print("check_op, correct backward:", {k: f"{v:.1e}" for k, v in errs.items()})

ws = rng.standard_normal((3, 3))


def buggy_backward(dy, cache):
    x, w, _ = cache
    return dy @ w, x.T @ dy, dy.sum(0)  # bug: dy @ w instead of dy @ w.T


errs = gradcheck.check_op(linear.linear_forward, buggy_backward, [xl, ws, np.zeros(3)], eps=1e-5)
print("check_op, buggy backward:  ", {k: f"{v:.1e}" for k, v in errs.items()})
assert errs[0] > 1e-2 and errs[1] < 1e-6

try:
    gradcheck.check_op(linear.linear_forward, linear.linear_backward, [xl.astype(np.float32), wl, bl])
except ValueError as err:
    print("float32:", err)

# %% [markdown]
# A numerical gradient costs two evaluations of $f$ per entry. That is fine for the tiny tensors of a
# check, and hopeless for training, which is why we write backward passes at all:

# %%
xs = rng.standard_normal((40, 40))
t0 = time.perf_counter()
numerical_gradient(lambda: float((np.tanh(xs) @ xs).sum()), xs)
t_num = time.perf_counter() - t0
print(f"{xs.size} entries: {t_num * 1e3:.0f} ms numerically, i.e. {2 * xs.size} evaluations of f;")
print(f"a model with 124M parameters would need {2 * 124e6:.1e} evaluations for ONE gradient")

# %% [markdown]
# ## Exercises
#
# 1. Plot `rel_error` of the `tanh` check above against $h$ for $h$ from $10^{-1}$ to $10^{-12}$, in
#    float64. Where is the bottom of the "V"? Does it match $\varepsilon^{1/3}$?
# 2. Change `numerical_gradient` to the *forward* difference $(f(x + h e_i) - f(x))/h$. How does the
#    best achievable error change, and why (Taylor-expand it)?
# 3. Find a gradient for which the per-entry relative error reports a failure but `rel_error` does
#    not, and explain which of the two you would trust.
# 4. If you have an NVIDIA GPU: `pip install cupy-cuda12x`, run `minimoe.set_backend("cupy")`, and
#    time a `(2048, 2048) @ (2048, 2048)` float32 matmul against NumPy. (Synchronise with
#    `cupy.cuda.Device().synchronize()` before stopping the clock.)


# %% references
def references():
    """Inputs and expected values of this lesson's check, from minimoe.gradcheck (run at build time)."""
    import numpy as np

    from minimoe import gradcheck

    rng = np.random.default_rng(0)
    out = {}
    for key, shape in (("matrix", (3, 4)), ("scalar", ())):
        x, u = rng.standard_normal(shape), rng.standard_normal(shape)
        _, grad = gradcheck.numerical_gradient(lambda x=x, u=u: float((u * np.tanh(x)).sum()), x, eps=1e-5)
        out.update({f"{key}_x": np.asarray(x), f"{key}_u": np.asarray(u), f"{key}_grad": grad.reshape(shape)})
    return out
