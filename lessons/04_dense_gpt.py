# %% [markdown]
# # Lesson 04 — A dense GPT: the block, the model, a training loop and sampling
#
# Lessons 01–03 built every piece. Now we assemble them into a GPT-2-style language model
# (Radford et al. 2019), train it on a small corpus and sample text from it. You build the
# **transformer block**, forward and backward; everything around it uses the package.
#
# A GPT maps token ids `(B, T)` to next-token logits `(B, T, V)`:
#
# $$x_0 = W_{te}[\mathrm{ids}] + W_{pe}[0{:}T], \qquad x_{\ell+1} = \mathrm{Block}_\ell(x_\ell), \qquad
#   \mathrm{logits} = \mathrm{LN}_f(x_L)\, W_{te}^\top,$$
#
# where the output layer reuses the embedding table ("weight tying", Press & Wolf 2017), and the
# loss is the cross-entropy of Lesson 01 against the ids shifted by one position.
#
# Shapes: B batch, T time, C channels, H heads, V vocabulary, F = 4C the MLP's hidden width.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from minimoe import GPT, AdamW, Config, clip_grad_norm, cosine_lr
from minimoe.data import builtin_corpus, get_batch, train_val_split
from minimoe.layers import attention
from minimoe.lessons.checks import CheckFailed, case, check_close, check_gradient, check_shape, reference
from minimoe.ops import embedding, ffn, linear, loss, norm
from minimoe.tokenizer import CharTokenizer

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The block
#
# GPT-2 uses the **pre-norm** block (Radford et al. 2019, §2.3; Xiong et al. 2020): each sub-layer
# reads a normalised copy of the *residual stream* $x$ and adds its result back,
#
# $$x \leftarrow x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad x \leftarrow x + \mathrm{MLP}(\mathrm{LN}_2(x)),
#   \qquad \mathrm{MLP}(h) = \mathrm{GELU}(h W_1 + b_1)\, W_2 + b_2$$
#
# (the position-wise feed-forward network of Vaswani et al. 2017, eq. 2, with GELU, $W_1$ `(C, F)`,
# $W_2$ `(F, C)`). **Backward of a residual connection:** $y = x + f(x)$ gives
# $dx = dy + \left(\partial f/\partial x\right)^\top dy$. The gradient reaches $x$ *unchanged* along the
# identity path, and each branch adds its contribution. This "gradient highway" is why deep residual
# networks train at all (He et al. 2016).
#
# Write `block_forward` with the package's `norm.layernorm_forward`, the attention layer
# `attention.self_attention_forward` (`minimoe/layers/attention.py`, with `n_kv_head = n_head`) and `ffn.gelu_mlp_forward`, and
# `block_backward` as the forward read from the bottom up. The block's weights come in a dict with the
# keys `ln1.w ln1.b attn.wqkv attn.bqkv attn.wo attn.bo ln2.w ln2.b mlp.w1 mlp.b1 mlp.w2 mlp.b2`, and
# the backward returns a dict of gradients with the same keys.


# %%
def block_forward(x, p, n_head):
    """x (B, T, C) -> y (B, T, C): one pre-norm GPT-2 block with weights p."""
    ### BEGIN SOLUTION
    h, c_ln1 = norm.layernorm_forward(x, p["ln1.w"], p["ln1.b"])
    a, c_attn = attention.self_attention_forward(
        h, p["attn.wqkv"], p["attn.bqkv"], p["attn.wo"], p["attn.bo"], n_head, n_head
    )
    x = x + a  # residual
    h, c_ln2 = norm.layernorm_forward(x, p["ln2.w"], p["ln2.b"])
    m, c_mlp = ffn.gelu_mlp_forward(h, p["mlp.w1"], p["mlp.b1"], p["mlp.w2"], p["mlp.b2"])
    y = x + m  # residual
    cache = (c_ln1, c_attn, c_ln2, c_mlp)
    ### END SOLUTION
    return y, cache


# %%
def block_backward(dy, cache):
    """dy (B, T, C) -> dx (B, T, C), and the weight gradients (a dict with the keys of p)."""
    g = {}
    ### BEGIN SOLUTION
    c_ln1, c_attn, c_ln2, c_mlp = cache
    # y = x1 + MLP(LN2(x1)): dy flows straight to x1, plus the MLP branch's contribution
    dh, g["mlp.w1"], g["mlp.b1"], g["mlp.w2"], g["mlp.b2"] = ffn.gelu_mlp_backward(dy, c_mlp)
    dh, g["ln2.w"], g["ln2.b"] = norm.layernorm_backward(dh, c_ln2)
    dx1 = dy + dh
    # x1 = x + Attn(LN1(x)): the same again
    dh, g["attn.wqkv"], g["attn.bqkv"], g["attn.wo"], g["attn.bo"] = attention.self_attention_backward(
        dx1, c_attn
    )
    dh, g["ln1.w"], g["ln1.b"] = norm.layernorm_backward(dh, c_ln1)
    dx = dx1 + dh
    ### END SOLUTION
    return dx, g


# %% [markdown]
# **Check 1: the block.** A tiny block in float64 (width 8, two heads) with weights of size
# $\sim 0.5$, so that no gradient is negligibly small (stored in `04_dense_gpt.npz`, with the values the
# package's model computes for them). The forward is compared with those values; the backward is
# checked numerically for the input and every weight tensor, then compared.

# %%
BLOCK_KEYS = ["ln1.w", "ln1.b", "attn.wqkv", "attn.bqkv", "attn.wo", "attn.bo",
              "ln2.w", "ln2.b", "mlp.w1", "mlp.b1", "mlp.w2", "mlp.b2"]  # fmt: skip
N_HEAD = 2

# %% check id=block_forward points=2
FN = "block_forward"
x = reference("04", "block_x")
bp = {k: reference("04", f"block.{k}") for k in BLOCK_KEYS}
CASE = f"x {x.shape} n_head={N_HEAD}"
with case(FN, CASE):
    y, _ = block_forward(x, bp, N_HEAD)
check_shape(FN, CASE, "y", y, x.shape, "f")
check_close(FN, CASE, "y", y, reference("04", "block_y"), 1e-10)
print("block_forward is correct")

# %% check id=block_backward points=3
FN = "block_backward"
x, dy = reference("04", "block_x"), reference("04", "block_dy")
bp = {k: reference("04", f"block.{k}") for k in BLOCK_KEYS}
CASE = f"x {x.shape} n_head={N_HEAD}"
with case(FN, CASE):
    dx, g = block_backward(dy, block_forward(x, bp, N_HEAD)[1])
check_shape(FN, CASE, "dx", dx, x.shape, "f")
missing = [k for k in BLOCK_KEYS if k not in g]
if missing:
    raise CheckFailed(f"{FN}, case {CASE}: the gradient dict has no {', '.join(missing)}")
for k in BLOCK_KEYS:
    check_shape(FN, CASE, f"g[{k!r}]", g[k], bp[k].shape, "f")


def block_loss():
    return float((block_forward(x, bp, N_HEAD)[0] * dy).sum())


check_gradient(FN, CASE, block_loss, x, dx, 1e-6, name="dx")
for k in BLOCK_KEYS:
    check_gradient(FN, CASE, block_loss, bp[k], g[k], 1e-6, name=f"g[{k!r}]")
check_close(FN, CASE, "dx", dx, reference("04", "block_dx"), 1e-9)
for k in BLOCK_KEYS:
    check_close(FN, CASE, f"g[{k!r}]", g[k], reference("04", f"block_grad.{k}"), 1e-9)
print(f"block_backward is correct: dx and {len(BLOCK_KEYS)} weight gradients")

# %% [markdown]
# **Check 2: the whole model.** With your block, the GPT is a few more lines of package ops. Its
# logits, loss and every gradient must match what `minimoe.GPT`, the package's model (which we use
# from here on), computed for the same weights and tokens.


# %%
def gpt_forward(params, idx, targets, cfg):
    """idx, targets (B, T) -> logits (B, T, V), loss, caches. GPT-2 layout: learned positions, tied head."""
    T = idx.shape[1]
    x, c_emb = embedding.embedding_forward(idx, params["wte"])
    x = x + params["wpe"][:T]
    block_caches = []
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}."
        x, c = block_forward(
            x, {k[len(pre) :]: v for k, v in params.items() if k.startswith(pre)}, cfg.n_head
        )
        block_caches.append(c)
    h, c_lnf = norm.layernorm_forward(x, params["ln_f.w"], params["ln_f.b"])
    logits, c_head = linear.linear_forward(h, params["wte"].T)
    loss_value, c_loss = loss.cross_entropy_forward(logits, targets)
    return logits, loss_value, (c_emb, block_caches, c_lnf, c_head, c_loss)


def gpt_backward(params, caches, cfg):
    """The gradient of the loss for every parameter: gpt_forward, read from the bottom up."""
    c_emb, block_caches, c_lnf, c_head, c_loss = caches
    grads = {}
    dlogits = loss.cross_entropy_backward(1.0, c_loss)
    dh, dhead, _ = linear.linear_backward(dlogits, c_head)
    dx, grads["ln_f.w"], grads["ln_f.b"] = norm.layernorm_backward(dh, c_lnf)
    for i in reversed(range(cfg.n_layer)):
        dx, g = block_backward(dx, block_caches[i])
        grads.update({f"blocks.{i}.{k}": v for k, v in g.items()})
    grads["wpe"] = np.zeros_like(params["wpe"])
    grads["wpe"][: dx.shape[1]] = dx.sum(axis=0)  # position t is used once per sequence
    grads["wte"] = embedding.embedding_backward(dx, c_emb) + dhead.T  # tied: input and output uses add
    return grads


cfg_tiny = Config(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, init_std=0.5)

# %% check id=block_in_gpt points=1
FN = "gpt_forward and gpt_backward with your block"
names = [str(n) for n in reference("04", "gpt_param_names")]
params = {n: reference("04", f"gpt_param.{n}") for n in names}
idx, targets = reference("04", "gpt_idx"), reference("04", "gpt_targets")
CASE = f"2-layer GPT, idx {idx.shape}"
with case(FN, CASE):
    logits, loss_value, caches = gpt_forward(params, idx, targets, cfg_tiny)
    grads = gpt_backward(params, caches, cfg_tiny)
check_close(FN, CASE, "logits", logits, reference("04", "gpt_logits"), 1e-10)
check_close(FN, CASE, "loss", loss_value, reference("04", "gpt_loss"), 1e-10)
for n in names:
    check_close(FN, CASE, f"gradient of {n}", grads.get(n), reference("04", f"gpt_grad.{n}"), 1e-9)
print(f"your block assembles into minimoe.GPT exactly: logits, loss and {len(names)} gradients")

# %% [markdown]
# ## 2. Data
#
# The corpus is CPython's own help text (`minimoe.data.builtin_corpus()`, about 465k characters of
# English about Python; it ships with Python, so nothing is downloaded), tokenized one character per
# token. The last 10 % is held out for validation. A training example is a window of $T$ tokens and the
# same window shifted by one: at every position the target is the next character.
#
# Two baselines tell us what a loss means. A model that ignores the context and predicts the
# character **frequencies** scores their entropy, $H = -\sum_v p_v \log p_v$ (the *unigram* loss). One
# that looks at the previous character only scores the conditional entropy of the **bigram** table.
# Anything below that uses longer context.

# %%
text = builtin_corpus()
tok = CharTokenizer.from_text(text)
ids = np.array(tok.encode(text), dtype=np.int64)
train_ids, val_ids = train_val_split(ids, 0.1)
V = tok.vocab_size

freq = np.bincount(train_ids, minlength=V) / len(train_ids)
unigram = -(freq[freq > 0] * np.log(freq[freq > 0])).sum()
pairs = np.zeros((V, V))
np.add.at(pairs, (train_ids[:-1], train_ids[1:]), 1)
cond = pairs / np.maximum(pairs.sum(1, keepdims=True), 1)  # p(next | current)
bigram = -(pairs[pairs > 0] * np.log(cond[pairs > 0])).sum() / pairs.sum()
print(f"{len(text):,} characters, vocabulary V = {V}: {tok.decode(range(V))[33:80]!r} ...")
# the bigram table's loss on the validation text (a little smoothing for unseen pairs)
cond_smooth = (pairs + 0.1) / (pairs + 0.1).sum(1, keepdims=True)
bigram_val = -np.log(cond_smooth[val_ids[:-1], val_ids[1:]]).mean()
print(f"uniform loss log V = {np.log(V):.3f} | unigram entropy = {unigram:.3f} nats")
print(f"bigram entropy = {bigram:.3f} nats (on the validation text: {bigram_val:.3f})")

# %% [markdown]
# ## 3. Training
#
# Two blocks of width 64 with four heads, a context of 64 characters: about 110k parameters. The loop
# is the standard one (nanoGPT's, say), each line a topic of its own:
#
# - **AdamW** (Loshchilov & Hutter 2019): Adam's per-parameter step size with weight decay applied
#   directly to the weights (matrices only, not gains and biases);
# - **gradient clipping** to global norm 1 (Pascanu et al. 2013), which tames the rare huge step;
# - a **learning-rate schedule**: linear warm-up for 30 steps (Adam's second-moment estimates are
#   noisy at first), then a cosine decay to a tenth of the peak (Loshchilov & Hutter 2017).
#
# 300 steps of 16 × 64 characters take about 10 s on a laptop; longer runs (and bigger models) keep
# improving, see the exercises. (If it takes minutes, your CPU is busy with other work and NumPy's BLAS
# threads are waiting on each other: start Jupyter with `OPENBLAS_NUM_THREADS=1`; matrices this small
# gain nothing from threads.)

# %%
cfg = Config(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=64)
model = GPT(cfg, seed=0)
opt = AdamW(model.params, lr=1e-2, weight_decay=0.1)
B, steps, warmup, max_lr = 16, 300, 30, 1e-2
batch_rng, val_rng = np.random.default_rng(0), np.random.default_rng(1)
val_batches = [get_batch(val_ids, 32, cfg.block_size, val_rng) for _ in range(4)]


def val_loss(model):
    model.eval()  # no dropout (we use none anyway) and no router noise
    out = np.mean([float(model.forward(x, y)[1]) for x, y in val_batches])
    model.train()
    return out


print(f"{model.num_params():,} parameters")
train_curve, val_curve = [], [(0, val_loss(model))]
t0 = time.perf_counter()
for step in range(steps):
    lr = cosine_lr(step, max_lr, warmup, steps)
    x, y = get_batch(train_ids, B, cfg.block_size, batch_rng)
    _, loss_value = model.forward(x, y)
    model.backward()
    clip_grad_norm(model.grads, 1.0)
    opt.step(model.grads, lr=lr)
    train_curve.append(float(loss_value))
    if (step + 1) % 50 == 0:
        val_curve.append((step + 1, val_loss(model)))
        train_mean = np.mean(train_curve[-50:])
        print(f"step {step + 1:4d} | lr {lr:.2e} | train {train_mean:.3f} | val {val_curve[-1][1]:.3f}")
print(f"{time.perf_counter() - t0:.1f} s")
assert val_curve[-1][1] < unigram, "after 300 steps the model should beat the unigram baseline"

# %%
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(train_curve, alpha=0.35, label="train (one batch)")
smooth = np.convolve(train_curve, np.ones(20) / 20, mode="valid")
ax.plot(np.arange(19, steps), smooth, label="train (20-step mean)")
ax.plot(*zip(*val_curve), "o-", label="validation")
for level, label, style in (
    (np.log(V), "uniform", ":"),
    (unigram, "unigram", "--"),
    (bigram, "bigram", "-."),
):
    ax.axhline(level, color="grey", ls=style, label=f"{label} baseline {level:.2f}")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats per character)")
ax.set_ylim(1.5, 5)
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The loss drops through the unigram level within a few dozen steps (character frequencies are the
# easiest thing to learn), and then below the bigram level: the model has started to use more than
# one character of context. The validation curve sits *below* the training curve because the held-out
# text (the last help topics) is simply easier to predict: even the bigram table scores lower on it.
#
# ## 4. Sampling
#
# To generate, feed the text so far (its last `block_size` characters), take the logits of the
# **last** position, turn them into probabilities and pick the next character; repeat. **Greedy**
# decoding takes the most likely character, and tends to loop; **sampling** at temperature $\tau$ draws
# from $\mathrm{softmax}(z/\tau)$: $\tau < 1$ sharpens the distribution, $\tau > 1$ flattens it. (This
# loop recomputes the whole window for every new token; Lesson 10 caches the keys and values instead.)


# %%
def generate(model, prompt, n_new, temperature=1.0, seed=0):
    """Continue the string `prompt` by n_new characters; temperature 0 means greedy."""
    rng = np.random.default_rng(seed)
    idx = np.array([tok.encode(prompt)], dtype=np.int64)  # (1, T)
    model.eval()
    for _ in range(n_new):
        logits, _ = model.forward(idx[:, -model.config.block_size :])  # (1, T, V)
        z = logits[0, -1].astype(np.float64)  # the last position's logits (V,)
        if temperature == 0:
            nxt = int(z.argmax())
        else:
            p = np.exp((z - z.max()) / temperature)
            nxt = int(rng.choice(V, p=p / p.sum()))
        idx = np.concatenate([idx, [[nxt]]], axis=1)
    model.train()
    return tok.decode(idx[0].tolist())


prompt = "The function "
for temperature in (0, 0.8):
    print(f"--- temperature {temperature}:\n{generate(model, prompt, 200, temperature)}\n")

# %% [markdown]
# Not Python documentation yet: greedy decoding falls into a loop of the most frequent words, and the
# samples are word-sized chunks with spaces, quotes and underscores in plausible places and a few real
# words. Not bad for 110k parameters and a few seconds of training. The lessons that follow replace
# the MLP of each block by a **mixture of experts**.
#
# ## Exercises
#
# 1. Train for 3000 steps (about two and a half minutes) and plot the validation loss. Where does it
#    level off? Then try `n_layer=4, n_embd=128`.
# 2. Remove the warm-up (`warmup = 0`) and use a constant learning rate. Compare the curves.
# 3. Switch to the Llama flavour (`Config(flavour="llama", ...)`: RMSNorm, RoPE, SwiGLU, no biases,
#    untied head). Which of the two trains faster here, per step and per second?
# 4. Add **top-k** sampling to `generate` (keep only the $k$ largest logits) and compare samples at
#    $k = 5$ with plain temperature sampling.


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe's own model (run at build time)."""
    import numpy as np

    from minimoe import GPT, Config

    rng = np.random.default_rng(0)
    cfg = Config(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, init_std=0.5)
    model = GPT(cfg, seed=0, dtype="float64")
    for arr in model.params.values():
        if arr.ndim == 1:  # norm gains (ones) and biases (zeros): make them generic
            arr += 0.3 * rng.standard_normal(arr.shape)
    out = {}
    # one block: the package model's block 0, run on its own through the model's block functions
    pre = "blocks.0."
    bp = {k[len(pre) :]: v for k, v in model.params.items() if k.startswith(pre)}
    x, dy = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    y, dx, grads = _package_block(bp, x, dy, cfg.n_head)
    out.update(block_x=x, block_dy=dy, block_y=y, block_dx=dx)
    out.update({f"block.{k}": v for k, v in bp.items()})
    out.update({f"block_grad.{k}": v for k, v in grads.items()})
    # the whole model
    idx, targets = rng.integers(0, 11, (2, 8)), rng.integers(0, 11, (2, 8))
    logits, loss = model.forward(idx, targets)
    grads = model.backward()
    out.update(gpt_idx=idx, gpt_targets=targets, gpt_logits=logits, gpt_loss=np.asarray(loss))
    out["gpt_param_names"] = np.array(sorted(model.params))
    out.update({f"gpt_param.{k}": v.copy() for k, v in model.params.items()})
    out.update({f"gpt_grad.{k}": v.copy() for k, v in grads.items()})
    return out


def _package_block(bp, x, dy, n_head):
    """A GPT-2 block from the package's ops: y, dx and the weight gradients for upstream dy.
    Equal to the package model's block (the whole-model values above are its real output)."""
    from minimoe.layers import attention
    from minimoe.ops import ffn, norm

    h, c1 = norm.layernorm_forward(x, bp["ln1.w"], bp["ln1.b"])
    a, ca = attention.self_attention_forward(
        h, bp["attn.wqkv"], bp["attn.bqkv"], bp["attn.wo"], bp["attn.bo"], n_head, n_head
    )
    x1 = x + a
    h2, c2 = norm.layernorm_forward(x1, bp["ln2.w"], bp["ln2.b"])
    m, cm = ffn.gelu_mlp_forward(h2, bp["mlp.w1"], bp["mlp.b1"], bp["mlp.w2"], bp["mlp.b2"])
    g = {}
    dh, g["mlp.w1"], g["mlp.b1"], g["mlp.w2"], g["mlp.b2"] = ffn.gelu_mlp_backward(dy, cm)
    dh, g["ln2.w"], g["ln2.b"] = norm.layernorm_backward(dh, c2)
    dx1 = dy + dh
    dh, g["attn.wqkv"], g["attn.bqkv"], g["attn.wo"], g["attn.bo"] = attention.self_attention_backward(
        dx1, ca
    )
    dh, g["ln1.w"], g["ln1.b"] = norm.layernorm_backward(dh, c1)
    return x1 + m, dx1 + dh, g
