# %% [markdown]
# # Lesson 09 — What the experts learned
#
# Nobody tells an expert what to be an expert *in*: the router and the experts are trained together by
# the language-modelling loss alone (plus a balancing term). So what do they end up specialising in?
#
# Mixtral's paper (Jiang et al. 2024, sec. 5, "Routing analysis") looked at this on real text and found
# **no clear specialisation by topic** — arXiv papers, biology, philosophy and code were routed to the
# experts in similar proportions — but a strong structure by **syntax and position**: some tokens
# (Python's `self`, indentation) go to the same expert consistently, and consecutive tokens are
# assigned the same expert far more often than chance.
#
# Here we can do better than guess at topics: minimoe's synthetic corpus is a mixture of five tasks
# whose every line carries a tag, so we know the "domain" of every single character.
#
# | tag | task | example |
# |---|---|---|
# | `add` | addition | `add 37+45=82` |
# | `copy` | copy a word | `copy abcd\|abcd` |
# | `rev` | reverse a word | `rev abcd\|dcba` |
# | `brk` | are the brackets balanced? | `brk (()[])\|ok` |
# | `gram` | a sentence of a tiny grammar | `gram the cat sees a dog .` |
#
# We train a tiny MoE on it, then look at the load, a per-token routing map, the task × expert and
# character-class × expert tables, and Mixtral's consecutive-token statistic, which you implement.
#
# Shapes: T time, E experts, K experts per token.

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from minimoe import GPT, AdamW, Config, cosine_lr
from minimoe.backend import to_numpy
from minimoe.data import TASK_TAGS, TASKS, get_batch, synthetic_corpus, synthetic_examples
from minimoe.tokenizer import CharTokenizer

# %% [markdown]
# ## A tiny MoE on the multi-task corpus
#
# Two layers, both MoE: $E = 8$ SwiGLU experts, top-2 with Mixtral's renormalised gates, the Switch
# balancing loss at 0.01; width 32, context 48 characters (two or three lines). 400 steps take a few
# seconds and get the loss from $\ln 46 \approx 3.8$ to about 1.4 nats per character; the model has
# learned the formats and some of the tasks. Longer training gives sharper routing patterns.

# %%
text = synthetic_corpus(20_000, seed=0)
tok = CharTokenizer.from_text(text)
ids = np.array(tok.encode(text), dtype=np.int64)
T, E, K, STEPS = 48, 8, 2, 400

cfg = Config(
    flavour="llama",
    vocab_size=tok.vocab_size,
    block_size=T,
    n_layer=2,
    n_head=4,
    n_embd=32,
    n_experts=E,
    top_k=K,
    expert_hidden=64,
    aux_loss_coef=0.01,
)
model = GPT(cfg, seed=0, dtype="float32")
opt = AdamW(model.params, lr=3e-3)
rng = np.random.default_rng(0)
for step in range(STEPS):
    x, y = get_batch(ids, 16, T, rng)
    model.forward(x, y)
    model.backward()
    opt.step(model.grads, lr=cosine_lr(step, 3e-3, 30, STEPS))
    if step % 100 == 0 or step == STEPS - 1:
        print(f"step {step:3d}  loss {float(model.stats['lm_loss']):.3f}")

# %% [markdown]
# ## Collecting the routing
#
# We take 400 *new* lines (another seed), remember the task of every character, cut the text into
# windows of $T$ characters and run them through the model in evaluation mode. Every MoE layer leaves
# its choices in `model.stats["layers"][i]["expert_idx"]`, shape (N, K), first choice first.

# %%
examples = synthetic_examples(400, seed=1)
chars, task_of_char = [], []
for task, line in examples:
    chars.extend(line + "\n")
    task_of_char.extend([TASKS.index(task)] * (len(line) + 1))
n_win = len(chars) // T
chars = np.array(chars[: n_win * T]).reshape(n_win, T)  # (windows, T) characters
task_of_char = np.array(task_of_char[: n_win * T]).reshape(n_win, T)
windows = np.array([tok.encode("".join(row)) for row in chars], dtype=np.int64)  # (windows, T) ids

model.eval()
model.forward(windows)
routes = [to_numpy(st["expert_idx"]).reshape(n_win, T, K) for st in model.stats["layers"]]  # per layer
print(f"{n_win} windows of {T} characters; routes per layer: {routes[0].shape} (window, position, choice)")

# %% [markdown]
# ## Load per expert
#
# With the balancing loss every expert gets a share near $1/E = 12.5\%$ of the slots (Lesson 07).

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8), sharey=True)
for layer, ax in enumerate(axes):
    load = np.bincount(routes[layer].reshape(-1), minlength=E) / routes[layer].size
    ax.bar(np.arange(E), load)
    ax.axhline(1 / E, color="k", ls="--", lw=1)
    ax.set_title(f"layer {layer}")
    ax.set_xlabel("expert")
axes[0].set_ylabel("share of slots")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## A per-token routing map
#
# The first-choice expert of every character of the first two windows, one row per layer (the
# numbers are the expert ids, ␣ is a space, ⏎ a newline). Look for runs of one colour, and for
# characters that always get the same expert wherever they appear.


# %%
def show_char(c):
    return {" ": "␣", "\n": "⏎"}.get(c, c)


cmap = ListedColormap(plt.get_cmap("tab10").colors[:E])
fig, axes = plt.subplots(2, 1, figsize=(14, 2.6))
for w, ax in enumerate(axes):
    first = np.stack([routes[layer][w, :, 0] for layer in range(len(routes))])  # (layers, T)
    ax.imshow(first, cmap=cmap, vmin=-0.5, vmax=E - 0.5, aspect="auto")
    for (layer, t), e in np.ndenumerate(first):
        ax.text(t, layer, str(e), ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(T))
    ax.set_xticklabels([show_char(c) for c in chars[w]], family="monospace")
    ax.set_yticks(range(len(routes)))
    ax.set_yticklabels([f"layer {i}" for i in range(len(routes))])
axes[0].set_title("first-choice expert per character")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Specialisation: task × expert and character class × expert
#
# For every task, the fraction of its characters' slots (both choices) that go to each expert. If
# routing ignored the task, every row would equal the overall load. We also tabulate by *character
# class*, and summarise each table by the **mutual information** between the row variable and the
# chosen expert,
#
# $$I(X; \text{expert}) = \sum_{x, e} p(x, e) \log_2 \frac{p(x, e)}{p(x)\, p(e)} \quad \text{bits},$$
#
# which is 0 when the expert is independent of $X$ (at most $\log_2 E = 3$ bits).
#
# A caution before reading the task table: the tasks use different characters (digits only in `add`,
# brackets only in `brk`), so "task" and "character" are entangled. `copy` and `rev` are the clean
# comparison: same alphabet, same format, different task.

# %%
CLASSES = ("letter", "digit", "space", "newline", "bracket", "symbol")


def char_class(c):
    if c.isalpha():
        return 0
    if c.isdigit():
        return 1
    return {" ": 2, "\n": 3, "(": 4, ")": 4, "[": 4, "]": 4}.get(c, 5)


class_of_char = np.vectorize(char_class)(chars)  # (windows, T)


def contingency(labels, route, n_labels):
    """(n_labels, E) counts of slots: label of the token x chosen expert (all K choices)."""
    counts = np.zeros((n_labels, E))
    for k in range(K):
        np.add.at(counts, (labels.reshape(-1), route[..., k].reshape(-1)), 1)
    return counts


def mutual_information(counts):
    p = counts / counts.sum()
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / outer[nz])).sum())


fig, axes = plt.subplots(2, 2, figsize=(11, 6))
for layer in range(2):
    for col, (labels, names, what) in enumerate(
        ((task_of_char, [TASK_TAGS[t] for t in TASKS], "task"), (class_of_char, CLASSES, "character class"))
    ):
        counts = contingency(labels, routes[layer], len(names))
        frac = counts / counts.sum(axis=1, keepdims=True)
        ax = axes[layer, col]
        im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=max(0.5, frac.max()))
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        mi = mutual_information(counts)
        ax.set_title(f"layer {layer}: {what} × expert   (I = {mi:.2f} bits)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.03)
plt.tight_layout()
plt.show()

for layer in range(2):
    frac = contingency(task_of_char, routes[layer], len(TASKS))
    frac = frac / frac.sum(axis=1, keepdims=True)
    copy_vs_rev = 0.5 * np.abs(frac[TASKS.index("copy")] - frac[TASKS.index("reverse")]).sum()
    add_vs_gram = 0.5 * np.abs(frac[TASKS.index("arith")] - frac[TASKS.index("grammar")]).sum()
    print(
        f"layer {layer}: routing distance (total variation) copy vs rev {copy_vs_rev:.2f},  "
        f"add vs gram {add_vs_gram:.2f}"
    )

# %% [markdown]
# What we see in our run (your numbers will differ in detail): the routing depends on the kind of
# character at least as much as on the task, and `copy` and `rev`, which share their alphabet, are
# routed much more alike than, say, `add` and `gram`. The same story as Mixtral's: experts pick up on
# *what the token is and where it stands* more than on *what the text is about*. Strong topic experts
# are not what a router learns by default — which is one reason DeepSeekMoE's fine-grained and shared
# experts (Dai et al. 2024) were proposed.
#
# ## Consecutive tokens
#
# Mixtral's sec. 5 measures how often token $t$ gets the **same first-choice expert** as token $t-1$,
# and how often the two tokens' top-$K$ sets **share at least one expert**. Under independent uniform
# routing the first rate would be $1/E$ and the second
#
# $$1 - \binom{E-K}{K} \Big/ \binom{E}{K}$$
#
# (one minus the chance that two random $K$-subsets of the $E$ experts are disjoint): 12.5% and 46.4% for
# $E = 8$, $K = 2$.
#
# **Your turn.** Given one sequence's choices `idx` (T, K), first choice in column 0, return both rates
# over its $T - 1$ consecutive pairs (no Python loop over $t$ needed: compare `idx[1:]` with
# `idx[:-1]`).


# %%
def consecutive_same_expert(idx):
    """idx (T, K) -> (first_choice_rate, any_shared_rate) over the T-1 pairs (t-1, t)."""
    ### BEGIN SOLUTION
    first = idx[1:, 0] == idx[:-1, 0]  # (T-1,) same first choice
    shared = (idx[1:, :, None] == idx[:-1, None, :]).any(axis=(1, 2))  # (T-1,) any of K x K pairs equal
    return float(first.mean()), float(shared.mean())
    ### END SOLUTION


# %% [markdown]
# **Check** against a direct loop, two extreme cases, and `minimoe.analysis` (the package's routing
# analysis module) when it is installed.


# %%
def direct(idx):
    Tn = len(idx)
    first = sum(idx[t, 0] == idx[t - 1, 0] for t in range(1, Tn)) / (Tn - 1)
    shared = sum(len(set(idx[t]) & set(idx[t - 1])) > 0 for t in range(1, Tn)) / (Tn - 1)
    return first, shared


test_rng = np.random.default_rng(0)
for _ in range(5):
    idx = np.stack([test_rng.permutation(E)[:K] for _ in range(60)])  # (60, K) random distinct choices
    assert np.allclose(consecutive_same_expert(idx), direct(idx)), "rates differ from the direct loop"
assert consecutive_same_expert(np.tile([3, 5], (10, 1))) == (1.0, 1.0)  # always the same experts
assert consecutive_same_expert(np.array([[0, 1], [2, 3]] * 5)) == (0.0, 0.0)  # always disjoint

try:
    from minimoe import analysis
except ImportError:
    analysis = None
if analysis is not None and hasattr(analysis, "consecutive_same_expert"):
    ref = analysis.consecutive_same_expert(routes[1][0], E)
    assert np.allclose(consecutive_same_expert(routes[1][0]), (ref["first_choice"], ref["any_choice"]))
    print("agrees with minimoe.analysis.consecutive_same_expert")
print("consecutive_same_expert: OK")

# %% [markdown]
# Now on the model. Besides the uniform baselines we compute a **shuffled** baseline: the same choices
# with the token order permuted at random. It keeps the actual (not quite uniform) load and destroys only
# the order, so the difference between the observed rate and the shuffled one is due to the
# sequence alone.


# %%
def rates_over_windows(route):
    """route (windows, T, K) -> mean first-choice and any-shared rates over all windows."""
    return np.mean([consecutive_same_expert(r) for r in route], axis=0)


uniform = (1 / E, 1 - math.comb(E - K, K) / math.comb(E, K))
results = []
for layer, route in enumerate(routes):
    observed = rates_over_windows(route)
    flat = route.reshape(-1, K)
    shuffled = rates_over_windows(flat[rng.permutation(len(flat))].reshape(route.shape))
    results.append((observed, shuffled))
    print(
        f"layer {layer}: same first choice {100 * observed[0]:.1f}% (shuffled {100 * shuffled[0]:.1f}%, "
        f"uniform {100 * uniform[0]:.1f}%);  a shared expert {100 * observed[1]:.1f}% "
        f"(shuffled {100 * shuffled[1]:.1f}%, uniform {100 * uniform[1]:.1f}%)"
    )

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
for i, (ax, title) in enumerate(zip(axes, ("same first-choice expert", "top-2 sets share an expert"))):
    xs = np.arange(len(routes))
    ax.bar(xs - 0.2, [r[0][i] for r in results], width=0.4, label="observed")
    ax.bar(xs + 0.2, [r[1][i] for r in results], width=0.4, label="shuffled order")
    ax.axhline(uniform[i], color="k", ls="--", lw=1, label="uniform random")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"layer {i}" for i in xs])
    ax.set_title(title)
axes[0].set_ylabel("fraction of consecutive pairs")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Consecutive characters share their expert far more often than chance, as in Mixtral (whose rates are
# for subword tokens of real text, and rise in the later layers). Part of it is simply that a line of
# one task is a run of similar characters (letters follow letters); part is that the router follows
# the position inside a line's format. Either way it matters in practice: repeated assignments make
# expert caching and prefetching during generation pay off, and, on the flip side, a batch of one
# document can overload one expert's device.
#
# ## Exercises
#
# 1. Condition on context: compare the expert distribution of letters that come *before* the `|` of a
#    `copy`/`rev` line with that of letters *after* it (the half the model has to produce). Are the
#    two halves routed differently, and in which layer?
# 2. Retrain with `aux_loss_coef=0.0`. Redo the load, the two mutual informations and the
#    consecutive rates: does an unbalanced router specialise more, or less?
# 3. Mixtral also reports that some *specific tokens* keep one expert wherever they occur. For each
#    character of the vocabulary, compute the share of its occurrences that go to its most frequent
#    first-choice expert; list the most "loyal" characters per layer.
# 4. Train with `top_k=1, renormalize=False` (Switch-style) and compare the first-choice rate with the
#    shuffled baseline. Is the sequence effect stronger with one expert per token?
