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
# We train a tiny MoE on it and collect its routing. Then you write the **routing statistics** that
# read it: the load per expert, the task × expert (and character class × expert) table, the mutual
# information that summarises such a table in one number, and Mixtral's consecutive-token statistic.
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
from minimoe.lessons.checks import CheckFailed, case, check_close, check_shape, reference
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
# The first statistic: the **load** of each expert, the fraction of all slots (every token's $K$
# choices) that went to it. `route` holds the choices of many tokens, shape `(..., K)` (here
# `(windows, T, K)`); the load is a vector of $E$ fractions that sums to 1, with a 0 for an expert
# that nobody chose. With the balancing loss every expert should get a share near $1/E = 12.5\%$
# (Lesson 07).
#
# **Your turn.**


# %%
def expert_load(route, E):
    """route (..., K) chosen experts -> (E,) fraction of all the slots that went to each expert."""
    ### BEGIN SOLUTION
    return np.bincount(route.reshape(-1), minlength=E) / route.size
    ### END SOLUTION


# %% [markdown]
# **Check** against the values of `minimoe.analysis.expert_load` (stored in
# `09_what_experts_learned.npz`): random choices of shape `(5, 12, 2)`, the first layer's real routing,
# and choices that leave experts 6 and 7 unused.

# %% check id=expert_load points=1
FN = "expert_load"
for key in ("random", "model", "unused"):
    route = reference("09", f"load_{key}_route")
    CASE = f"{key} route {route.shape} E={E}"
    with case(FN, CASE):
        load = expert_load(route, E)
    check_shape(FN, CASE, "load", load, (E,), "f")
    check_close(FN, CASE, "load", load, reference("09", f"load_{key}"), 1e-12)
print("expert_load is correct")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8), sharey=True)
for layer, ax in enumerate(axes):
    ax.bar(np.arange(E), expert_load(routes[layer], E))
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
# Does the router send different tasks to different experts? Give every token a **label** $x$ (its
# task, or its character class), and count, for every label and every expert, the slots (both choices)
# of tokens with that label that went to that expert: a **contingency table** `counts` of shape
# `(n_labels, E)`,
#
# $$\text{counts}[x, e] = \#\{(\text{token } t, \text{choice } k) : \text{label}_t = x,\ \text{route}_{t,k} = e\}.$$
#
# Each row divided by its sum is that label's load; if routing ignored the label, every row would equal
# the overall load. One number summarises the whole table: the **mutual information** between the
# label and the chosen expert. With $p(x, e) = \text{counts}[x, e] / \sum \text{counts}$ and its
# marginals $p(x) = \sum_e p(x, e)$, $p(e) = \sum_x p(x, e)$:
#
# $$I(X; \text{expert}) = \sum_{x, e:\ p(x, e) > 0} p(x, e) \log_2 \frac{p(x, e)}{p(x)\, p(e)} \quad \text{bits}$$
#
# (terms with $p(x, e) = 0$ contribute 0, the limit of $p \log p$). It is 0 when the expert is
# independent of $X$, and at most $\min(\log_2 n_\text{labels}, \log_2 E)$ bits, reached when the
# label determines the expert and vice versa.
#
# **Your turn**: the table and the mutual information. `labels` has the shape of the tokens,
# `(windows, T)`, and `route` one more axis, `(windows, T, K)`.


# %%
def contingency_table(labels, route, n_labels, E):
    """labels (...) ints < n_labels, route (..., K) chosen experts -> (n_labels, E) counts of slots."""
    ### BEGIN SOLUTION
    K = route.shape[-1]
    counts = np.zeros((n_labels, E))
    for k in range(K):
        np.add.at(counts, (labels.reshape(-1), route[..., k].reshape(-1)), 1)
    return counts
    ### END SOLUTION


# %%
def mutual_information(counts):
    """counts (n_labels, E) -> I(label; expert) in bits (a float)."""
    ### BEGIN SOLUTION
    p = counts / counts.sum()
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)  # p(x) p(e)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / outer[nz])).sum())
    ### END SOLUTION


# %% [markdown]
# **Check** the table against counts made from `minimoe.analysis.routing_matrix` (on random labels and
# choices, and on the model's task labels and routes), and the mutual information on five tables: an
# independent one (0 bits), a diagonal one ($\log_2 4 = 2$ bits), one with empty cells, and two random
# ones.

# %% check id=contingency_table points=2
FN = "contingency_table"
for key in ("random", "model"):
    labels, route = reference("09", f"table_{key}_labels"), reference("09", f"table_{key}_route")
    n_labels = int(reference("09", f"table_{key}_n_labels"))
    CASE = f"{key} labels {labels.shape} route {route.shape} n_labels={n_labels} E={E}"
    with case(FN, CASE):
        counts = contingency_table(labels, route, n_labels, E)
    check_shape(FN, CASE, "counts", counts, (n_labels, E), "fiu")
    check_close(FN, CASE, "counts", counts, reference("09", f"table_{key}"), 0)
print("contingency_table is correct")

# %% check id=mutual_information points=2
FN = "mutual_information"
for key in ("independent", "diagonal", "empty_cells", "random", "model"):
    counts = reference("09", f"mi_{key}_counts")
    CASE = f"{key} table {counts.shape}"
    with case(FN, CASE):
        mi = mutual_information(counts)
    check_shape(FN, CASE, "I", mi, (), "f")
    check_close(FN, CASE, "I (bits)", mi, reference("09", f"mi_{key}"), 1e-10, atol=1e-12)
print("mutual_information is correct")

# %% [markdown]
# Now on the model. A caution before reading the task table: the tasks use different characters
# (digits only in `add`, brackets only in `brk`), so "task" and "character" are entangled. `copy` and
# `rev` are the clean comparison: same alphabet, same format, different task.

# %%
CLASSES = ("letter", "digit", "space", "newline", "bracket", "symbol")


def char_class(c):
    if c.isalpha():
        return 0
    if c.isdigit():
        return 1
    return {" ": 2, "\n": 3, "(": 4, ")": 4, "[": 4, "]": 4}.get(c, 5)


class_of_char = np.vectorize(char_class)(chars)  # (windows, T)

fig, axes = plt.subplots(2, 2, figsize=(11, 6))
for layer in range(2):
    for col, (labels, names, what) in enumerate(
        ((task_of_char, [TASK_TAGS[t] for t in TASKS], "task"), (class_of_char, CLASSES, "character class"))
    ):
        counts = contingency_table(labels, routes[layer], len(names), E)
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
    frac = contingency_table(task_of_char, routes[layer], len(TASKS), E)
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
# **Check** against the values of `minimoe.analysis.consecutive_same_expert` on random choices and on
# one window of the model's routing, and on three small sequences: always the same two experts
# (1, 1), always disjoint (0, 0), and the same two experts in swapped order, `[0, 1], [1, 0], ...`
# (first choices always differ, yet every pair shares an expert: (0, 1)).

# %% check id=consecutive_same_expert points=2
FN = "consecutive_same_expert"
for key in ("random0", "random1", "model", "same", "disjoint", "swapped"):
    idx = reference("09", f"consec_{key}_idx")
    CASE = f"{key} idx {idx.shape}"
    with case(FN, CASE):
        rates = consecutive_same_expert(idx)
    if not isinstance(rates, tuple) or len(rates) != 2:
        raise CheckFailed(
            f"{FN}, case {CASE}: return a tuple (first_choice_rate, any_shared_rate), got {rates!r}"
        )
    for name, got, want in zip(
        ("first_choice_rate", "any_shared_rate"), rates, reference("09", f"consec_{key}")
    ):
        check_shape(FN, CASE, name, got, (), "f")
        check_close(FN, CASE, name, got, want, 1e-12, atol=1e-12)
print("consecutive_same_expert is correct")

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


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe.analysis (run at build time).

    The "model" cases use the routing of a model trained like the one above; the checks only compare
    your statistics of those routes with the package's, so the routes need not be the notebook's own.
    """
    import math

    import numpy as np

    from minimoe import GPT, AdamW, Config, analysis
    from minimoe.backend import to_numpy
    from minimoe.data import TASKS, get_batch, synthetic_corpus, synthetic_examples
    from minimoe.tokenizer import CharTokenizer

    rng = np.random.default_rng(9)
    E, K, T = 8, 2, 48
    # a briefly trained model's routing of some tagged lines (a real, unbalanced route)
    tok = CharTokenizer.from_text(synthetic_corpus(2000, seed=0))
    ids = np.array(tok.encode(synthetic_corpus(2000, seed=0)), dtype=np.int64)
    cfg = Config(flavour="llama", vocab_size=tok.vocab_size, block_size=T, n_layer=1, n_head=2, n_embd=16,
                 n_experts=E, top_k=K, expert_hidden=16, aux_loss_coef=0.01)  # fmt: skip
    model = GPT(cfg, seed=0, dtype="float64")
    opt = AdamW(model.params, lr=3e-3)
    for _ in range(30):
        model.forward(*get_batch(ids, 8, T, rng))
        model.backward()
        opt.step(model.grads)
    chars, tasks = [], []
    for task, line in synthetic_examples(60, seed=1):
        chars.extend(line + "\n")
        tasks.extend([TASKS.index(task)] * (len(line) + 1))
    n_win = len(chars) // T
    windows = np.array(
        [tok.encode("".join(chars[i * T : (i + 1) * T])) for i in range(n_win)], dtype=np.int64
    )
    model.eval()
    model.forward(windows)
    model_route = to_numpy(model.stats["layers"][0]["expert_idx"]).reshape(n_win, T, K)
    task_labels = np.array(tasks[: n_win * T]).reshape(n_win, T)

    def distinct_choices(shape):
        return np.stack([rng.permutation(E)[:K] for _ in range(math.prod(shape))]).reshape(*shape, K)

    out = {}
    # expert_load
    unused = distinct_choices((4, 10)) % 6  # experts 6 and 7 never chosen (pairs may repeat: fine)
    for key, route in (("random", distinct_choices((5, 12))), ("model", model_route), ("unused", unused)):
        out[f"load_{key}_route"] = route
        out[f"load_{key}"] = analysis.expert_load(route, E)
    # contingency_table: one-hot labels^T @ (tokens x experts) choice counts, via analysis.routing_matrix
    random_labels = rng.integers(0, 3, (5, 12))
    for key, labels, route, n in (("random", random_labels, distinct_choices((5, 12)), 3),
                                  ("model", task_labels, model_route, len(TASKS))):  # fmt: skip
        chosen = analysis.routing_matrix(
            {"expert_idx": route.reshape(-1, K), "gates": None}, E
        )  # (tokens, E)
        table = np.eye(n)[labels.reshape(-1)].T @ chosen
        out.update({f"table_{key}_labels": labels, f"table_{key}_route": route, f"table_{key}": table})
        out[f"table_{key}_n_labels"] = np.array(n)
    # mutual_information: the textbook formula, in bits, on tables with known answers
    tables = {
        "independent": np.outer([1.0, 2.0, 3.0], [4.0, 1.0, 2.0, 1.0]),
        "diagonal": 5.0 * np.eye(4),
        "empty_cells": np.array([[3.0, 0.0, 1.0], [0.0, 2.0, 0.0]]),
        "random": rng.integers(1, 9, (5, 8)).astype(float),
        "model": out["table_model"],
    }
    for key, counts in tables.items():
        p = counts / counts.sum()
        px, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
        terms = np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0) / (px * pe)), 0.0)
        out[f"mi_{key}_counts"], out[f"mi_{key}"] = counts, np.array(terms.sum())
    # consecutive_same_expert
    sequences = {
        "random0": distinct_choices((60,)),
        "random1": distinct_choices((25,)),
        "model": model_route[0],
        "same": np.tile([3, 5], (10, 1)),
        "disjoint": np.array([[0, 1], [2, 3]] * 5),
        "swapped": np.array([[0, 1], [1, 0]] * 5),
    }
    for key, idx in sequences.items():
        r = analysis.consecutive_same_expert(idx, E)
        out[f"consec_{key}_idx"], out[f"consec_{key}"] = idx, np.array([r["first_choice"], r["any_choice"]])
    return out
