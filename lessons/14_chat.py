# %% [markdown]
# # Lesson 14 — From a language model to an assistant
#
# Everything so far trained a **base model**: given text, it predicts the next token, so it
# *continues* whatever it is given. Ask a base model trained on Python's documentation "What is 2
# plus 3?" and it writes something that looks like more documentation. An assistant *answers*. The
# step between the two, the first step after pre-training in InstructGPT (Ouyang et al. 2022) and in
# every chat model since, is **supervised fine-tuning** (SFT) on conversations:
#
# 1. a **chat format**: special tokens that mark who speaks, so that a conversation is one token
#    sequence and the model can tell where a turn ends;
# 2. a **masked loss**: the model is trained to write the assistant's turns only; the user's words
#    are context, not something to imitate;
# 3. a **conversation loop**: the model writes until it produces the end-of-turn token, the turn is
#    kept in the KV cache (lesson 10), and the next user message is appended.
#
# You will write the loss mask from the token ids and the shifted targets that carry it, fine-tune a
# small MoE for a few hundred steps, talk to it, and measure before and after.
#
# References: Ouyang et al. 2022, *Training language models to follow instructions with human
# feedback* (InstructGPT, sec. 3.5: SFT); OpenAI's ChatML and the chat templates of Hugging Face
# `transformers` (special tokens around every turn); Hewitt 2021, *Initializing New Word Embeddings
# for Pretrained Language Models* (new rows at the mean of the trained ones); Karpathy's nanochat
# (SFT end to end in PyTorch).

# %%
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np

import minimoe
from minimoe import AdamW, cosine_lr
from minimoe.chat import Conversation, routing_by_role
from minimoe.chat_data import MaskedTokens, chat_builtin, eval_questions
from minimoe.finetune import load_base
from minimoe.gradcheck import check_model, numerical_gradient
from minimoe.lessons.checks import CheckFailed, case, check_close, check_shape, reference
from minimoe.metrics import estimate_loss
from minimoe.ops.loss import cross_entropy_backward, cross_entropy_forward
from minimoe.optim import clip_grad_norm
from minimoe.tokenizer import ASSISTANT, END, USER, CharTokenizer
from minimoe.train import train

# %% [markdown]
# ## 1. The chat format
#
# A tokenizer gets three **special tokens**: `<|user|>`, `<|assistant|>` and `<|end|>`. They are
# given the ids just *above* its vocabulary (with $V$ characters, `<|user|>` is $V$, `<|assistant|>`
# $V+1$, `<|end|>` $V+2$), so every existing id keeps its meaning and a base model's weights still
# fit. Plain text never encodes to them: a user who types the seven characters `<|end|>` gets seven
# ordinary tokens and cannot forge a turn. A conversation, a list of messages, becomes
#
#     <|user|> What is 2 plus 3? <|end|> <|assistant|> 5 <|end|> <|user|> Add 4 to that. <|end|> ...
#
# `tok.encode_chat(messages)` returns these ids and a **loss mask**: 1 on the tokens the model must
# learn to write. Below, the tokens of the mask are shown in brackets.

# %%
tok = CharTokenizer.from_text(
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!:+"
).with_specials()
conv = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Add 4 to that."},
    {"role": "assistant", "content": "9"},
]
ids, mask = tok.encode_chat(conv)
USER_ID, ASSISTANT_ID, END_ID = (tok.special_id(s) for s in (USER, ASSISTANT, END))
print(f"vocabulary: {tok.base_vocab_size} characters + specials {tok.specials} = {tok.vocab_size} ids")
print("special ids:", USER_ID, ASSISTANT_ID, END_ID)
print("ids: ", ids)
print("mask:", mask)
print("".join(f"[{tok.decode([i])}]" if m else tok.decode([i]) for i, m in zip(ids, mask)))

# %% [markdown]
# Which tokens carry a loss?
#
# * the assistant's words: that is what we want the model to produce;
# * the assistant's `<|end|>`: without it the model never learns to **stop**, and a reply runs on
#   until it hits the length limit;
# * **not** `<|assistant|>`: the chat loop writes that marker itself, after each user message, to
#   say "your turn" (the model only has to learn what comes after it);
# * **not** the user's turn: the model should learn to answer questions, not to ask them. Training
#   on the user's words too would spend capacity on imitating users (and, for a real assistant, on
#   imitating whatever users type).
#
# ## 2. The mask from the token ids
#
# The mask can be computed from the ids alone: a token is the assistant's when the last marker
# before it is `<|assistant|>`, up to and including the `<|end|>` that closes that turn.
#
# **Your turn:** write it. `ids` is a 1-D sequence of token ids of one or more whole conversations
# (it may end in the middle of a turn, e.g. with `<|assistant|>` when the model is about to answer).


# %%
def chat_loss_mask(ids, assistant_id, end_id):
    """ids (T,) integer -> mask (T,) integer: 1 on the tokens after an <|assistant|> marker up to
    and including the <|end|> that closes its turn, 0 elsewhere (the marker itself included)."""
    ### BEGIN SOLUTION
    mask = np.zeros(len(ids), dtype=np.int64)
    speaking = False
    for t, i in enumerate(ids):
        if speaking:
            mask[t] = 1
        if i == assistant_id:
            speaking = True
        elif i == end_id:
            speaking = False
    return mask
    ### END SOLUTION


# %% [markdown]
# **Check.** Your mask against the masks of `encode_chat` (stored in `14_chat.npz` with the ids):
# one exchange, three exchanges, a conversation that ends with a user message, a generation prompt
# (ending in `<|assistant|>`), and two conversations one after the other.

# %% check id=chat_loss_mask points=2
FN = "chat_loss_mask"
A_ID, E_ID = (int(i) for i in reference("14", "special_ids")[1:])
for name in ("one_exchange", "three_exchanges", "ends_with_user", "generation_prompt", "two_conversations"):
    ids_ref = reference("14", f"ids_{name}")
    with case(FN, name):
        got = chat_loss_mask(ids_ref, A_ID, E_ID)
    check_shape(FN, name, "mask", got, ids_ref.shape, "iub")
    check_close(FN, name, "mask", np.asarray(got).astype(np.int64), reference("14", f"mask_{name}"), 0)
print("chat_loss_mask: OK")

# %% [markdown]
# ## 3. Targets that carry the mask
#
# Training predicts token $t+1$ from tokens $\le t$: a window of $T+1$ tokens gives inputs
# $x = w_{0..T-1}$ and targets $y = w_{1..T}$. The mask belongs to the *predicted* token, so the
# target at position $t$ is kept when `mask[t+1]` is 1 and replaced by $-1$ otherwise. $-1$ is the
# cross-entropy's `ignore_index`: the loss is the mean over the kept positions $A$ only,
#
# $$L = \frac{1}{|A|}\sum_{t \in A} -\log p_\theta(y_t \mid x_{\le t}),
# \qquad \frac{\partial L}{\partial z_t} = \begin{cases} (p_t - \mathbb{1}_{y_t})/|A| & t \in A\\
# 0 & t \notin A\end{cases}$$
#
# ($z_t$ the logits at position $t$, $p_t$ their softmax). A masked position adds nothing to the
# loss and sends no gradient back — but its token is still *input*: the model reads the question
# through attention while it learns the answer.
#
# **Your turn:** write the shift. It must work on one window `(T+1,)` and on a batch `(B, T+1)`.


# %%
def masked_targets(ids, mask):
    """ids, mask (..., T+1) -> x (..., T) inputs, y (..., T) targets: y[t] = ids[t+1] where
    mask[t+1] == 1, else -1."""
    ### BEGIN SOLUTION
    ids, mask = np.asarray(ids), np.asarray(mask)
    return ids[..., :-1], np.where(mask[..., 1:] == 1, ids[..., 1:], -1)
    ### END SOLUTION


# %% check id=masked_targets points=2
FN = "masked_targets"
for name in ("window", "batch"):
    w, m = reference("14", f"shift_ids_{name}"), reference("14", f"shift_mask_{name}")
    shape = w.shape[:-1] + (w.shape[-1] - 1,)
    with case(FN, f"{name} {w.shape}"):
        x, y = masked_targets(w, m)
    check_shape(FN, f"{name} {w.shape}", "x", x, shape, "iu")
    check_shape(FN, f"{name} {w.shape}", "y", y, shape, "iu")
    check_close(FN, f"{name} {w.shape}", "x", x, reference("14", f"shift_x_{name}"), 0)
    check_close(FN, f"{name} {w.shape}", "y", y, reference("14", f"shift_y_{name}"), 0)
print("masked_targets: OK")

# %% [markdown]
# **The gradient, checked.** With your targets, perturb the logits of every position and measure
# the change of the loss by central differences in float64: at the masked positions it is exactly 0,
# and everywhere it equals the analytic gradient of `cross_entropy_backward`. Then the whole model:
# a float64 gradient check of a tiny MoE GPT whose loss has masked targets.

# %%
rng = np.random.default_rng(0)
window = np.array(ids)  # the conversation of section 1
x, y = masked_targets(window, chat_loss_mask(window, ASSISTANT_ID, END_ID))
z = rng.standard_normal((len(x), tok.vocab_size))  # (T, V) float64 logits
loss, ce_cache = cross_entropy_forward(z, y)
dz = cross_entropy_backward(1.0, ce_cache)
_, num = numerical_gradient(lambda: float(cross_entropy_forward(z, y)[0]), z)
num = num.reshape(z.shape)
kept = y != -1
print(f"{kept.sum()} of {len(y)} positions carry the loss; loss {float(loss):.4f} = mean NLL over them")
print("max |numerical gradient| at masked positions:", np.abs(num[~kept]).max())
print("max |analytic - numerical| :", f"{np.abs(dz - num).max():.1e}")
assert np.abs(num[~kept]).max() == 0 and np.abs(dz - num).max() < 1e-9

tiny_config = minimoe.Config(flavour="llama", vocab_size=tok.vocab_size, block_size=len(x), n_layer=1, n_head=2,
                             n_embd=8, n_experts=4, top_k=2, expert_hidden=8, init_std=0.5)  # fmt: skip
tiny = minimoe.GPT(tiny_config, seed=0, dtype="float64")
errors = check_model(tiny, x[None], y[None], max_entries=20)
print("whole model, masked targets: worst rel error", f"{max(errors.values()):.1e}")
assert max(errors.values()) < 1e-6

# %% [markdown]
# ## 4. A base model, and room for the new tokens
#
# First a base model, trained the usual way (`minimoe train`) on the builtin corpus: a small
# Mixtral-style MoE, 2 layers of 4 experts (top-2), 64 wide, context 64 characters, 400 steps.
# It knows some English and Python spelling, nothing about conversations.

# %%
workdir = tempfile.mkdtemp(prefix="lesson14_")
SMALL = dict(preset="mixtral", n_layer=2, n_embd=64, n_head=4, n_experts=4, top_k=2, block_size=64)
t0 = time.time()
summary = train(dict(SMALL, data="builtin", out=f"{workdir}/base", max_iters=400, eval_interval=400,
                     eval_iters=10, sample_tokens=0), quiet=True)  # fmt: skip
print(f"base model: val loss {summary['val_loss']:.3f} nats/char after 400 steps ({time.time() - t0:.0f} s)")

# %% [markdown]
# The base tokenizer has no chat tokens, so `load_base` adds them (`tok.with_specials()`) and grows
# the model to match: one new row of the embedding $W_{te}$ $(V, C)$ and one new column of the output
# head $(C, V)$ per new token. A new row starts at the **mean of the trained rows** plus a little
# noise (Hewitt 2021): a zero or random row would be an input the network has never seen, while the
# mean sits among the embeddings it knows; the noise tells the three new tokens apart. For the head,
# the mean column gives the new token the average logit: before fine-tuning, `<|end|>` is no likelier
# than a typical character.

# %%
model, ctok = load_base(f"{workdir}/base", seed=0)
V0 = ctok.base_vocab_size
W = model.params["wte"]
print(f"vocabulary {V0} -> {ctok.vocab_size}; wte {W.shape}")
print(
    "distance of the new rows to the mean of the old ones:",
    np.round(np.linalg.norm(W[V0:] - W[:V0].mean(0), axis=1), 3),
)
print(
    "typical distance of an old row to that mean:        ",
    round(float(np.linalg.norm(W[:V0] - W[:V0].mean(0), axis=1).mean()), 3),
)

# %% [markdown]
# ## 5. Fine-tuning on dialogues
#
# The dialogues come from code (`minimoe.chat_data.chat_builtin`, nothing downloaded): requests such
# as "What is 37 plus 45?" → "82", "Reverse the word abcd." → "dcba", questions about Python answered
# with the first sentence of a section of the builtin corpus, follow-ups that need the previous turn
# ("Add 5 to that."), and a little small talk. A held-out split keeps one task example in ten (by a
# hash of its text) out of training.

# %%
train_convs, val_convs = chat_builtin("train", 3000), chat_builtin("val", 300)
for c in train_convs[:6]:
    print(" | ".join(f"{m['role']}: {m['content']}" for m in c))

# %% [markdown]
# The training stream: all conversations' ids one after another, with **your** mask. A batch takes
# $B$ windows of $T+1$ tokens, each starting where a conversation starts (as a chat does) and
# running on into the next ones, and turns them into inputs and targets with **your**
# `masked_targets`. The loop is the usual one (lesson 08): forward with the targets, backward, clip,
# AdamW at a warmup + cosine learning rate.

# %%
assistant_id, end_id = ctok.special_id(ASSISTANT), ctok.special_id(END)
stream_ids, starts = [], []
for c in train_convs:
    starts.append(len(stream_ids))
    stream_ids += ctok.encode_chat(c)[0]
stream_ids = np.array(stream_ids, dtype=np.int64)
stream_mask = chat_loss_mask(stream_ids, assistant_id, end_id)
starts = np.array([s for s in starts if s + 65 <= len(stream_ids)])
print(
    f"{len(train_convs)} conversations, {len(stream_ids):,} tokens, {int(stream_mask.sum()):,} of them the assistant's"
)


def chat_batch(rng, B=12, T=64):
    offsets = starts[rng.integers(len(starts), size=B)]
    index = offsets[:, None] + np.arange(T + 1)  # (B, T+1)
    return masked_targets(stream_ids[index], stream_mask[index])


# the validation stream and the questions, measured before and after
val = MaskedTokens.from_conversations(ctok, val_convs)
questions = eval_questions(60)


def measure(model, max_new_tokens=16):
    """Greedy replies to the held-out requests, each in a fresh conversation: how many are exactly
    the answer, and how many the model ends itself with <|end|>; and the masked validation loss."""
    rows = []
    for task, question, answer in questions:
        reply = Conversation(model, ctok).reply(question, max_new_tokens, temperature=0.0)
        rows.append((task, ctok.decode(reply).strip() == answer, len(reply) < max_new_tokens))
    out = {
        f"exact: {t}": np.mean([hit for task, hit, _ in rows if task == t])
        for t in ("arith", "copy", "reverse")
    }
    out["ends its reply"] = np.mean([stops for _, _, stops in rows])
    out["masked val loss"] = estimate_loss(model, val, 12, 64, 10, seed=0)
    return out


before = measure(model)
before_routes = routing_by_role(model, ctok, val_convs[:60])

# %%
STEPS = 300
opt = AdamW(model.params, lr=3e-3, weight_decay=0.1)
rng = np.random.default_rng(0)
t0 = time.time()
losses = []  # the masked loss of every step, for the figure below
for step in range(STEPS):
    x, y = chat_batch(rng)
    _, loss = model.forward(x, y)
    losses.append(float(model.stats["lm_loss"]))
    model.backward()
    clip_grad_norm(model.grads, 1.0)
    opt.step(model.grads, lr=cosine_lr(step, 3e-3, 30, STEPS))
    if step % 50 == 0 or step == STEPS - 1:
        print(f"step {step:3d}: masked loss {float(model.stats['lm_loss']):.3f}")
print(f"{STEPS} steps in {time.time() - t0:.0f} s")
after = measure(model)

# %% [markdown]
# The masked loss over the fine-tuning steps (left), and what it bought on the held-out requests
# (right): the share of replies the model ends itself with `<|end|>`, and of exact answers.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
axes[0].plot(losses, lw=1, label="masked training loss")
axes[0].axhline(before["masked val loss"], ls="--", c="gray", lw=1, label="validation, before")
axes[0].axhline(after["masked val loss"], ls="--", c="C1", lw=1, label="validation, after")
axes[0].set_xlabel("fine-tuning step")
axes[0].set_ylabel("loss on the assistant's tokens (nats)")
axes[0].legend()
keys = ["ends its reply", "exact: copy", "exact: reverse", "exact: arith"]
xs = np.arange(len(keys))
axes[1].bar(xs - 0.2, [before[k] for k in keys], 0.4, label="before")
axes[1].bar(xs + 0.2, [after[k] for k in keys], 0.4, label="after")
axes[1].set_xticks(xs, keys)
axes[1].set_ylim(0, 1)
axes[1].set_ylabel("fraction of held-out requests")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Talking to it
#
# `minimoe.chat.Conversation` keeps the conversation in a KV cache: each turn feeds the model only
# the tokens it has not seen (the previous reply's `<|end|>`, the new user turn and `<|assistant|>`),
# then decodes one token per forward until the model writes `<|end|>`. When the next turn would not
# fit in the context (`block_size`), the oldest exchanges are dropped *whole* and the cache is
# refilled. The command line does the same: `minimoe chat --ckpt DIR`.

# %%
chat = Conversation(model, ctok)
for message in [
    "Hello!",
    "What is 12 plus 7?",
    "Add 3 to that.",
    "Reverse the word lesson.",
    "Now reverse it.",
]:
    reply = chat.reply(message, max_new_tokens=30, temperature=0.0)
    print(f"you> {message}\nminimoe> {ctok.decode(reply)}")
print(
    f"(the context holds {len(chat.context)} of {model.config.block_size} tokens; {chat.fed} are in the cache)"
)

# %% [markdown]
# ## 7. Before and after
#
# Greedy replies to 60 held-out requests (arithmetic, copy, reverse), each in a fresh conversation:
# *exact* counts a reply equal to the answer, *ends its reply* a reply that the model closes itself
# with `<|end|>` within 16 tokens. *Masked val loss*: the loss on the assistant's tokens of held-out
# conversations — the quantity fine-tuning minimises.

# %%
print(f"{'':18s} {'before':>8s} {'after':>8s}")
for k in before:
    fmt = (lambda v: f"{100 * v:7.1f}%") if k != "masked val loss" else (lambda v: f"{v:8.3f}")
    print(f"{k:18s} {fmt(before[k])} {fmt(after[k])}")
for _, question, answer in questions[:6]:
    reply = ctok.decode(Conversation(model, ctok).reply(question, 16, temperature=0.0))
    print(f"{question!r:32s} -> {reply!r:14s} (answer {answer!r})")

after_routes = routing_by_role(model, ctok, val_convs[:60])
E = model.config.n_experts
for b, a in zip(before_routes, after_routes):
    load = lambda idx: np.bincount(idx.reshape(-1), minlength=E) / idx.size  # noqa: E731
    same = (b["assistant"][:, 0] == a["assistant"][:, 0]).mean()
    print(f"layer {b['layer']}: assistant-token load before {np.round(load(b['assistant']), 2)}, "
          f"after {np.round(load(a['assistant']), 2)}; first choice unchanged for {100 * same:.0f}%")  # fmt: skip

# %% [markdown]
# What 300 steps on this small model buy: the masked loss falls from about 4.4 to about 2 nats per
# token, and the model has learned the **format** — every held-out reply now ends with the model's
# own `<|end|>` (before: none did; the base model had never seen the token), small talk is answered,
# arithmetic gets a number and a word request a short run of letters. Hardly any answer is
# *right* yet: that takes a bigger model and more steps. `benchmarks/chat_eval.py` runs the same
# measurement on the laptop-size presets (4 layers, 128 wide, a base trained for 1500 steps,
# fine-tuned for 1000); see `docs/chat.md` for its table: there copying is the first task learned
# exactly (4% to 58% of the held-out words, depending on the run), while adding and reversing stay
# below 15%, and the runs are still improving when they stop.
#
# ## Exercises
#
# 1. **No mask.** Fine-tune with the loss on every token (`mask` all ones). Compare the exact match
#    and the replies. What does the model now also learn to write?
# 2. **No end token in the mask.** Set the mask of every `<|end|>` to 0 and fine-tune again. How do
#    the replies end? (`Conversation.reply` stops at `<|end|>` or `max_new_tokens`.)
# 3. **A system prompt.** Add a fourth special token `<|system|>` for an instruction at the start of
#    a conversation. Which tokens of it should carry a loss? What must `load_base` then do?
# 4. **Packing.** Our windows run on from one conversation into the next, so later conversations in
#    a window can attend to earlier ones. Change `chat_batch` to pad each window after the first
#    conversation instead (targets -1 on the padding). Does the validation loss change?


# %% references
def references():
    """Inputs and expected values of this lesson's checks, from minimoe's chat format (run at build time)."""
    import numpy as np

    from minimoe.chat_data import masked_targets
    from minimoe.tokenizer import ASSISTANT, END, USER, CharTokenizer

    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ?.0123456789").with_specials()

    def turns(*pairs):
        return [
            {"role": r, "content": c}
            for p in pairs
            for r, c in zip(("user", "assistant"), p)
            if c is not None
        ]

    convs = {
        "one_exchange": turns(("what is 2 plus 3?", "5")),
        "three_exchanges": turns(("say abc.", "abc"), ("again.", "abc"), ("reverse it.", "cba")),
        "ends_with_user": turns(("hi", "hello"), ("add 1 and 2.", None)),
    }
    out = {"special_ids": np.array([tok.special_id(s) for s in (USER, ASSISTANT, END)])}
    for name, conv in convs.items():
        ids, mask = tok.encode_chat(conv)
        out[f"ids_{name}"], out[f"mask_{name}"] = np.array(ids), np.array(mask)
    ids, mask = tok.encode_chat(turns(("say xyz.", "xyz"), ("again.", None)), add_generation_prompt=True)
    out["ids_generation_prompt"], out["mask_generation_prompt"] = np.array(ids), np.array(mask)
    a, ma = tok.encode_chat(convs["one_exchange"])
    b, mb = tok.encode_chat(convs["three_exchanges"])
    out["ids_two_conversations"], out["mask_two_conversations"] = np.array(a + b), np.array(ma + mb)
    stream, smask = np.array(a + b), np.array(ma + mb)
    rng = np.random.default_rng(0)
    windows = {
        "window": np.arange(10, 24),  # the end of a conversation and the start of the next
        "batch": rng.integers(0, len(stream) - 12, 4)[:, None] + np.arange(12),
    }
    for name, index in windows.items():
        out[f"shift_ids_{name}"], out[f"shift_mask_{name}"] = stream[index], smask[index]
        out[f"shift_x_{name}"], out[f"shift_y_{name}"] = masked_targets(stream[index], smask[index])
    return out
