"""Starting a run from a base model's weights: supervised fine-tuning on dialogues (--init-from).

    minimoe train --init-from BASE_DIR --data chat-builtin --out CHAT_DIR

The new run takes the base checkpoint's model and tokenizer, and nothing else: a fresh AdamW, a
fresh step count (so warmup + cosine start again) and its own --out directory. The base
checkpoint is only read; an --out that would overwrite it is refused.

Extending the vocabulary. A base model trained on text has no chat tokens (<|user|>,
<|assistant|>, <|end|>); they are appended above its vocabulary (tokenizer.with_specials), so every
existing id keeps its meaning, and the model grows to match: the embedding wte (V, C) gets one
new row per new token, an untied output head lm_head (C, V) one new column. A new row starts at
the MEAN of the trained rows plus N(0, init_std) noise (Hewitt, "Initializing new word embeddings
for pretrained language models", 2021): the mean keeps the new token where the trained
embeddings live (a zero or random row would be an input the network has never seen), and the
noise makes the three new tokens distinguishable. For the head the mean column gives the new
token the average logit, so before fine-tuning it is no likelier than a typical token.
A parameter is extended along the axis whose length is the vocabulary size, whatever its name.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minimoe import backend, checkpoint
from minimoe.errors import CheckpointError, OptionError
from minimoe.model import GPT
from minimoe.options import MODEL_FLAGS, flag
from minimoe.tokenizer import CHAT_SPECIALS

# With --init-from the model and its tokenizer are the base checkpoint's.
FIXED_BY_BASE = ("preset", "tokenizer", "vocab_size", *MODEL_FLAGS)


def init_from_options(given: dict) -> dict:
    """The given options of a run started with --init-from, completed with the base's model options
    (preset, tokenizer, ...; giving one of them is an OptionError), after checking that --out
    would not overwrite the base checkpoint."""
    base_path = checkpoint.checkpoint_path(given["init_from"])
    fixed = [k for k in FIXED_BY_BASE if k in given]
    if fixed:
        raise OptionError(
            f"{flag(fixed[0])} cannot be combined with --init-from: the model and its tokenizer are the base "
            f"checkpoint's; drop {flag(fixed[0])}"
        )
    out = checkpoint.checkpoint_path(given.get("out", "out"))
    if out.resolve() == base_path.resolve():
        raise OptionError(
            f"--out {given.get('out', 'out')!r} is where the base checkpoint --init-from lives; the new run "
            "would overwrite it, so choose another --out directory"
        )
    base = checkpoint.load_checkpoint(base_path).train_state.get("options", {})
    return {**{k: base[k] for k in FIXED_BY_BASE if base.get(k) is not None}, **given}


def load_base(path, dtype: str | None = None, seed: int = 0):
    """(model, tokenizer) of the base checkpoint at `path`, with the chat tokens added to both when
    the tokenizer lacks them (see the module docstring). The file is only read."""
    ckpt = checkpoint.load_checkpoint(path)
    model, tokenizer = checkpoint.build_model(ckpt, dtype), checkpoint.load_tokenizer(ckpt)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"checkpoint {str(ckpt.path)!r} has a model of vocabulary {model.config.vocab_size} but a tokenizer of "
            f"{tokenizer.vocab_size} tokens; it cannot be fine-tuned"
        )
    if not tokenizer.has_chat_format:
        tokenizer = tokenizer.with_specials(CHAT_SPECIALS)
        model = extend_vocab(model, tokenizer.vocab_size, seed)
    return model, tokenizer


def extend_vocab(model: GPT, vocab_size: int, seed: int = 0) -> GPT:
    """A copy of `model` with a vocabulary of `vocab_size` >= its own: the same weights, and new
    rows (columns) of vocabulary-sized parameters set to the mean of the trained ones plus
    N(0, init_std) noise. The model passed in is not changed."""
    c = model.config
    V, n_new = c.vocab_size, vocab_size - c.vocab_size
    if n_new < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the model's {V}; a vocabulary only grows")
    big = GPT(dataclasses.replace(c, vocab_size=vocab_size), seed=seed, dtype=model.dtype)
    rng = np.random.default_rng(seed)
    for name, new in big.params.items():
        old = backend.to_numpy(model.params[name]).astype(np.float64)
        if old.shape != new.shape:
            axis = next(a for a in range(old.ndim) if (old.shape[a], new.shape[a]) == (V, vocab_size))
            shape = list(old.shape)
            shape[axis] = n_new
            rows = old.mean(axis=axis, keepdims=True) + c.init_std * rng.standard_normal(shape)
            old = np.concatenate([old, rows], axis=axis)
        new[...] = backend.to_device(old, big.xp, big.dtype)
    for name, buf in model.buffers.items():
        big.buffers[name][...] = buf
    return big
