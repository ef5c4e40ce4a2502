# %% [markdown]
# # Lesson 11 — The same model on a GPU with CuPy
#
# Every operation in `minimoe` is NumPy code. CuPy (Okuta et al. 2017, *CuPy: A NumPy-Compatible
# Library for NVIDIA GPU Calculations*) offers the same API — `cupy.matmul`, `cupy.exp`,
# `cupy.zeros`, ... — with arrays that live in GPU memory. So the whole model, backward included,
# runs on a GPU if every op takes its array module from its inputs instead of importing NumPy. This
# lesson is about the few rules that make that true, and the few mistakes that make a GPU slower
# than the CPU:
#
# 1. one switch selects the backend, and one helper (`xp_of`) tells an op which library its inputs
#    belong to;
# 2. data crosses between host (CPU) and device (GPU) memory in **one** place: the batch, once per step;
# 3. the host never waits for the device without a reason: no `float(loss)` every step.
#
# You will write a backend-agnostic op with its backward, and a training step that keeps the loss on
# the device. **This lesson runs without a GPU** (everything then runs on NumPy, and the GPU-only
# comparisons say that they were skipped); with an NVIDIA GPU and CuPy installed
# (`pip install minimoe[gpu]`, or the `cupy-cuda12x` wheel) it also compares the two backends.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minimoe
from minimoe import backend
from minimoe.gradcheck import rel_error
from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference

# %% [markdown]
# ## 1. The backend switch
#
# `minimoe.set_backend("cupy")` (or the environment variable `MINIMOE_BACKEND=cupy`) makes new
# parameters and buffers CuPy arrays. It raises `minimoe.BackendError`, with a one-sentence reason,
# when CuPy cannot be imported or no CUDA device is usable. We try it and carry on with NumPy if it
# fails.

# %%
try:
    minimoe.set_backend("cupy")
    GPU = True
    import cupy

    gpu_name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    print("CuPy", cupy.__version__, "on", gpu_name.decode() if isinstance(gpu_name, bytes) else gpu_name)
except minimoe.BackendError as e:
    GPU = False
    print("No GPU here, so this lesson runs on NumPy only. The reason given:")
    print("   ", e)
minimoe.set_backend("numpy")  # back to the default; each part below chooses explicitly
print("backend:", minimoe.get_backend(), "| array module:", minimoe.get_xp().__name__)

# %% [markdown]
# The backend is read **when a model is built**: `GPT(config)` creates its parameters with
# `backend.get_xp()`. After that the arrays themselves carry the choice, and every op asks its input:
#
# ```python
# xp = backend.xp_of(x)      # numpy for a numpy array, cupy for a cupy array
# y = xp.exp(x - x.max(axis=-1, keepdims=True))
# ```
#
# `xp_of` looks at the type of its arguments (CuPy arrays come from a module named `cupy...`) and never
# copies anything. Why not simply use `np` everywhere? Functions that *compute* on an array could often
# get away with it (CuPy implements NumPy's dispatch protocols for ufuncs like `np.exp`), but functions
# that *create* an array from a shape — `np.zeros((N, C))`, `np.arange(T)`, `np.random...` — have no
# array to learn the backend from, and always create host arrays. Mixing one with a device array then
# fails: CuPy refuses to copy between host and device behind your back and raises a `TypeError`
# instead. Hence the rule: **in an op, every array is created with the `xp` of the op's inputs.**
#
# The package's ops obey it. An audit with Python's own parser: no file in `minimoe/ops` imports NumPy.

# %%
import ast
from pathlib import Path

ops_dir = Path(minimoe.__file__).parent / "ops"
offenders = []
for path in sorted(ops_dir.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [f"{path.name}: import {n}" for n in names if n.split(".")[0] == "numpy"]
print(f"{len(list(ops_dir.glob('*.py')))} op files, numpy imports: {offenders or 'none'}")
assert not offenders
x = np.ones(3)
print("xp_of(numpy array) is", backend.xp_of(x).__name__)

# %% [markdown]
# ## 2. Your turn: a backend-agnostic op
#
# **Logit soft-capping** (used on the attention scores and the final logits of Gemma 2, Gemma Team
# 2024; and of Grok-1) squashes values smoothly into $(-c, c)$ instead of clipping them:
#
# $$y = c \tanh(x / c), \qquad \frac{\partial y}{\partial x} = 1 - \tanh^2(x/c) = 1 - (y/c)^2 .$$
#
# Near 0 it is the identity (slope 1); large logits saturate at $\pm c$, so a single logit cannot run
# away and dominate a softmax. Write the forward and backward pair in `minimoe`'s style: take `xp`
# from the input, keep the input's dtype, and save what the backward needs in `cache`.


# %%
def softcap_forward(x, cap):
    """x (...) -> y (...) = cap * tanh(x / cap), on x's backend and in x's dtype; returns y, cache."""
    ### BEGIN SOLUTION
    xp = backend.xp_of(x)
    t = xp.tanh(x / cap)  # (...) in (-1, 1)
    return cap * t, (t,)
    ### END SOLUTION


# %%
def softcap_backward(dy, cache):
    """dy (...) -> dx (...) = dy * (1 - tanh^2(x / cap))."""
    ### BEGIN SOLUTION
    (t,) = cache
    return dy * (1.0 - t * t)
    ### END SOLUTION


# %% [markdown]
# **Check the forward**: values against the formula (stored in `11_gpu_cupy.npz`) on inputs from
# $O(1)$ to $O(50)$, both the linear and the saturated regime; float32 in must give float32 out, as a
# NumPy array; and — if a GPU is present — the same op on a CuPy array must stay on the device and
# agree with NumPy's answer after one copy back (`minimoe.to_numpy`).

# %% check id=softcap_forward points=1
FN = "softcap_forward"
x64 = reference("11", "x")
CASE = f"x {x64.shape} float64 cap=30"
with case(FN, CASE):
    y64, _ = softcap_forward(x64, 30.0)
check_shape(FN, CASE, "y", y64, x64.shape, "f")
check_close(FN, CASE, "y", y64, reference("11", "y_cap30"), 1e-14)
CASE = f"x {x64.shape} float32 cap=30"
with case(FN, CASE):
    y32, _ = softcap_forward(x64.astype(np.float32), 30.0)
if type(y32) is not np.ndarray or y32.dtype != np.float32:
    raise CheckFailed(
        f"{FN}, case {CASE}: float32 NumPy in must give float32 NumPy out, got {type(y32).__name__} {getattr(y32, 'dtype', '')}"
    )
check_close(FN, CASE, "y", y32, reference("11", "y_cap30"), 1e-6)
if GPU:
    CASE = f"x {x64.shape} float32 cap=30 on the GPU"
    minimoe.set_backend("cupy")
    try:
        with case(FN, CASE):
            yd, cache_d = softcap_forward(
                backend.to_device(x64.astype(np.float32)), 30.0
            )  # host -> device, once
        if backend.xp_of(yd).__name__ != "cupy":
            raise CheckFailed(
                f"{FN}, case {CASE}: a CuPy array in must give a CuPy array out, got {type(yd).__name__}"
            )
        check_close(FN, CASE, "y (vs NumPy)", yd, y32, 1e-6)  # check_close copies to the host itself
    finally:
        minimoe.set_backend("numpy")
else:
    print("(no GPU: the CuPy half of this check was skipped)")
print("softcap_forward: OK")

# %% [markdown]
# **Check the backward**: a float64 gradient check on $O(1)$ inputs with `cap = 3`, then the values of
# the formula.

# %% check id=softcap_backward points=2
FN = "softcap_backward"
x, dy = reference("11", "x_small"), reference("11", "dy_small")
CASE = f"x {x.shape} float64 cap=3"
with case(FN, CASE):
    dx = softcap_backward(dy, softcap_forward(x, 3.0)[1])
check_shape(FN, CASE, "dx", dx, x.shape, "f")
check_gradient(FN, CASE, lambda: float((softcap_forward(x, 3.0)[0] * dy).sum()), x, dx, 1e-6, name="dx")
check_close(FN, CASE, "dx", dx, reference("11", "dx_cap3"), 1e-12)
print("softcap_backward: OK")

# %% [markdown]
# ## 3. What must never happen
#
# A GPU is fast at big array operations and slow at everything around them. Two facts matter:
#
# * **Copies between host and device are slow** — tens of GB/s over PCIe against a few TB/s inside
#   GPU memory — and each one is a synchronisation point. A `to_numpy` (or `.get()`) inside an op, or
#   a `cupy.asarray(host_array)` in every layer, can cost more than the layer itself. So the
#   parameters are created on the device once, stay there, and only the batch moves: two small
#   integer arrays $(B, T)$, **once per step**.
# * **The GPU runs asynchronously.** `y = x @ w` on CuPy puts a kernel into a queue and returns at
#   once; Python races ahead, queueing the next operations, while the GPU works. The host waits only
#   when it needs a *value*: `float(loss)`, `int(x)`, `x.item()`, `print(x)`, `if x > 0:`, `to_numpy(x)`.
#   A `float(loss)` after every step therefore stops the queue every step: the GPU finishes its work
#   and idles while Python launches the next step's first kernels. Keep the losses on the device and
#   copy them to the host every few dozen steps, all at once (`xp.stack` + one `to_numpy`).
#
# ```python
# for step in range(n_steps):                 # the slow way
#     xb, yb = cupy.asarray(xb), cupy.asarray(yb)
#     _, loss = model.forward(xb, yb)
#     ...
#     print(step, float(loss))                # a sync every step
# ```
#
# Some synchronisations are deliberate. The model checks that token ids are in range (two small
# reads, `int(idx.min())` and `int(idx.max())`, per forward), and each MoE layer reads how many tokens
# each expert received, because the host must know the size of each expert's matmul before launching
# it. Count the copies (`backend.to_numpy` calls) during one forward and backward of a 4-layer MoE:

# %%
V = 96
cfg = minimoe.get_preset("mixtral", vocab_size=V)  # 4 layers, each one a MoE layer (8 experts, top-2)
model = minimoe.GPT(cfg, seed=0)
rng = np.random.default_rng(0)
xb, yb = rng.integers(0, V, (2, 32)), rng.integers(0, V, (2, 32))
copies = []
original = backend.to_numpy
backend.to_numpy = lambda a: copies.append(getattr(a, "shape", None)) or original(a)
try:
    model.forward(xb, yb)
    model.backward()
finally:
    backend.to_numpy = original
print(f"{len(copies)} copies to the host, shapes {copies}: one per MoE layer (the expert offsets)")

# %% [markdown]
# ## 4. Your turn: a training step that does not wait
#
# Write one training step on a batch that arrives as host (NumPy) arrays: move the batch to the
# model's device once (`backend.to_device(a, model.xp)`), forward with targets, backward, clip the
# gradients' global norm to 1.0 (`minimoe.clip_grad_norm`, which returns the norm as a 0-d array, no
# sync), one `opt.step(grads, lr)` — and return the loss **as the 0-d array the model returned**, not a
# Python float.


# %%
def train_step(model, opt, xb, yb, lr):
    """xb, yb (B, T) host integer arrays -> the loss, a 0-d array on the model's device."""
    ### BEGIN SOLUTION
    xb = backend.to_device(xb, model.xp)  # the one host -> device copy of this step
    yb = backend.to_device(yb, model.xp)
    _, loss = model.forward(xb, yb)
    grads = model.backward()
    minimoe.clip_grad_norm(grads, 1.0)
    opt.step(grads, lr)
    return loss
    ### END SOLUTION


# %% [markdown]
# **Check:** the loss is a 0-d array of the model's backend (not a float), and the step does exactly
# what a reference step does (same loss, same new weights) on two identical models.


# %%
def reference_step(model, opt, xb, yb, lr):
    _, loss = model.forward(backend.to_device(xb, model.xp), backend.to_device(yb, model.xp))
    minimoe.clip_grad_norm(model.backward(), 1.0)
    opt.step(model.grads, lr)
    return loss


small = minimoe.get_preset("mixtral", vocab_size=V, n_layer=2, n_embd=32, expert_hidden=32, block_size=16)

# %% check id=train_step points=2
FN = "train_step"
m_ref, m_you = minimoe.GPT(small, seed=0), minimoe.GPT(small, seed=0)
o_ref, o_you = minimoe.AdamW(m_ref.params, lr=1e-2), minimoe.AdamW(m_you.params, lr=1e-2)
batch_rng = np.random.default_rng(0)
for step in range(2):
    xs, ys = batch_rng.integers(0, V, (2, 16)), batch_rng.integers(0, V, (2, 16))
    CASE = f"step {step + 1}, batch {xs.shape}, toy mixtral (2 layers)"
    loss_ref = reference_step(m_ref, o_ref, xs, ys, 1e-2)
    with case(FN, CASE):
        loss_you = train_step(m_you, o_you, xs, ys, 1e-2)
    if getattr(loss_you, "ndim", None) != 0 or backend.xp_of(loss_you) is not m_you.xp:
        raise CheckFailed(
            f"{FN}, case {CASE}: return the loss as the 0-d array the model returned, got {type(loss_you).__name__} "
            "(float(loss) would force a sync on a GPU)"
        )
    check_close(FN, CASE, "loss", loss_you, backend.to_numpy(loss_ref), 0)
    for k in m_ref.params:
        check_close(FN, CASE, f"updated weights {k}", m_you.params[k], backend.to_numpy(m_ref.params[k]), 0)
print("train_step: OK")

# %% [markdown]
# With that step, the training loop keeps the losses in a list on the device and copies them to the
# host once per log interval — exactly what `minimoe.train` does. A short run on the built-in corpus
# (more steps give better results; this is only to show the loop):

# %%
from minimoe.data import builtin_corpus, get_batch
from minimoe.tokenizer import CharTokenizer

text = builtin_corpus()[:200_000]
tok = CharTokenizer.from_text(text)
ids = np.array(tok.encode(text), dtype=np.int64)
cfg_run = minimoe.get_preset("mixtral", vocab_size=tok.vocab_size, n_layer=2, n_embd=64, expert_hidden=128)
model = minimoe.GPT(cfg_run, seed=0)
opt = minimoe.AdamW(model.params, lr=3e-3)
data_rng = np.random.default_rng(0)
pending, logged = [], []
for step in range(1, 61):
    xb, yb = get_batch(ids, 4, 32, data_rng)  # host arrays, built by NumPy
    pending.append(reference_step(model, opt, xb, yb, 3e-3))  # the same step as your train_step
    if step % 20 == 0:
        losses = backend.to_numpy(model.xp.stack(pending))  # the one sync of these 20 steps
        logged.append((step, float(losses.mean())))
        print(f"step {step:3d}  mean loss of the last 20 steps {losses.mean():.3f}")
        pending = []
assert logged[-1][1] < logged[0][1]

# %% [markdown]
# ## 5. NumPy against CuPy on the same weights
#
# The two backends must compute the same function. We build the model on one backend, copy its
# weights to a model on the other (`to_device` one way, `to_numpy` the other), and compare logits,
# loss and every gradient in float64, where the only differences are the order of floating-point sums
# inside the libraries' matmuls (~1e-12 relative).


# %%
def forward_backward_on(name, host_params, config, x, y):
    """Build `config` on backend `name`, load the host weights, run forward + backward; host copies out."""
    minimoe.set_backend(name)
    try:
        m = minimoe.GPT(config, seed=123, dtype="float64")  # seed irrelevant: the weights are replaced
        for k, v in host_params.items():
            m.params[k][...] = backend.to_device(v, m.xp)
        logits, loss = m.forward(x, y)
        grads = m.backward()
        return backend.to_numpy(logits), float(loss), {k: backend.to_numpy(g) for k, g in grads.items()}
    finally:
        minimoe.set_backend("numpy")


cfg64 = minimoe.get_preset(
    "mixtral", vocab_size=V, n_layer=2, n_embd=32, n_kv_head=2, expert_hidden=32, block_size=16, init_std=0.2
)
host = {k: backend.to_numpy(v) for k, v in minimoe.GPT(cfg64, seed=0, dtype="float64").params.items()}
x, y = rng.integers(0, V, (2, 16)), rng.integers(0, V, (2, 16))
logits_np, loss_np, grads_np = forward_backward_on("numpy", host, cfg64, x, y)
print(f"numpy: loss {loss_np:.6f}, {len(grads_np)} gradient tensors")
if GPU:
    logits_gpu, loss_gpu, grads_gpu = forward_backward_on("cupy", host, cfg64, x, y)
    worst = max(rel_error(grads_gpu[k], grads_np[k]) for k in grads_np)
    print(
        f"cupy : loss {loss_gpu:.6f}; rel error logits {rel_error(logits_gpu, logits_np):.1e}, "
        f"worst gradient {worst:.1e}"
    )
    assert rel_error(logits_gpu, logits_np) < 1e-10 and worst < 1e-8
else:
    print("(no GPU: the CuPy side of the comparison was skipped)")

# %% [markdown]
# ## 6. Timing a training step
#
# Timing on a GPU needs care: because launches are asynchronous, the clock must be read only after
# the device has finished (`cupy.cuda.Device().synchronize()`), or you time the queueing, not the work.
# The first steps also include one-off costs (CuPy compiles each elementwise kernel the first time it
# sees it), so we run a warm-up step before timing. We time the toy Mixtral preset (4 layers,
# $C = 128$, 8 experts, top-2) on batches of $B \times 64$ tokens.


# %%
def time_steps(name, batch_sizes, repeats=2):
    """Seconds per training step (the best of `repeats`) for each batch size, on backend `name`."""
    minimoe.set_backend(name)
    try:
        xp = backend.get_xp()
        sync = xp.cuda.Device().synchronize if name == "cupy" else (lambda: None)
        m = minimoe.GPT(minimoe.get_preset("mixtral", vocab_size=V), seed=0)
        o = minimoe.AdamW(m.params, lr=1e-3)
        out = []
        for B in batch_sizes:
            xs, ys = rng.integers(0, V, (B, 64)), rng.integers(0, V, (B, 64))
            reference_step(m, o, xs, ys, 1e-3)  # warm-up
            sync()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                reference_step(m, o, xs, ys, 1e-3)
                sync()  # wait for the device before reading the clock
                best = min(best, time.perf_counter() - t0)
            out.append(best)
        return out
    finally:
        minimoe.set_backend("numpy")


timings = {"numpy (CPU)": ([1, 2, 4], time_steps("numpy", [1, 2, 4]))}  # small: the CPU is slow
if GPU:
    gpu_batches = [1, 2, 4, 8, 16, 32, 64]
    timings["cupy (GPU)"] = (gpu_batches, time_steps("cupy", gpu_batches))
fig, ax = plt.subplots(figsize=(6, 3.5))
for label, (batch_sizes, secs) in timings.items():
    ax.plot([64 * b for b in batch_sizes], np.array(secs) * 1e3, "o-", label=label)
    print(label, " ".join(f"B={b}: {s * 1e3:.0f} ms" for b, s in zip(batch_sizes, secs)))
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("tokens per step (B x 64)")
ax.set_ylabel("ms per training step")
ax.set_title("toy Mixtral, one AdamW step" + ("" if GPU else " (no GPU here: CPU only)"))
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# On the CPU the time grows in proportion to the tokens once the batch holds more than a few sequences
# (below that, the fixed Python cost of a few hundred array operations per step dominates): every
# multiply-add is done by the same few cores. If the curve jumps around, other programs are competing
# for the cores (see lesson 10's note on `OPENBLAS_NUM_THREADS=1`).
#
# On a GPU a model this small cannot keep thousands of cores busy, so the time per step is nearly
# flat — set by the number of kernel launches (a few hundred per step, each costing a few
# microseconds) and the handful of synchronisations — until the batch is large enough to fill the
# device. That is why GPU training uses big batches, and why the per-step syncs of section 3 matter
# most exactly when the model is small.

# %% [markdown]
# ## Exercises
#
# 1. **One-hot on any backend.** Write `one_hot(ids, V)` returning a $(N, V)$ float array on the
#    backend of `ids`. Which line would break on a GPU if you wrote `np.zeros((N, V))`? Check your
#    version with NumPy (and CuPy if you have it).
# 2. **The cost of a sync.** With a GPU, change the loop of section 4 to call `float(loss)` after every
#    step and time 100 steps both ways, at $B = 1$ and at $B = 32$. When does the sync matter?
# 3. **Precision.** Time `time_steps` in float64 (`minimoe.set_default_dtype("float64")`) against float32
#    on the GPU. Data-centre GPUs have much lower float64 throughput than float32; what ratio do you see?
# 4. **A sync-free MoE?** Section 3 found one host copy per MoE layer: the expert offsets. Sketch a
#    layer that needs none, using a fixed capacity per expert (all shapes known in advance, padded
#    slots). What does it cost in wasted compute and dropped tokens?


# %% references
def references():
    """Inputs and expected values of this lesson's checks (the formula y = cap tanh(x / cap), in float64)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)) * 20  # O(1) to O(50): both the linear and the saturated regime
    x_small, dy_small = rng.standard_normal((4, 6)) * 2, rng.standard_normal((4, 6))
    return {
        "x": x,
        "y_cap30": 30.0 * np.tanh(x / 30.0),
        "x_small": x_small,
        "dy_small": dy_small,
        "dx_cap3": dy_small * (1.0 - np.tanh(x_small / 3.0) ** 2),
    }
