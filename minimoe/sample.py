"""Text generation: temperature / top-k sampling with a KV cache, streamed token by token.

    new_ids = generate(model, prompt_ids, max_new_tokens=200, temperature=0.8, top_k=50, seed=0)

How the context is fed to the model (B = 1):
  * prefill: the prompt (its last block_size tokens) goes through the model once, filling a
    KVCache with every layer's keys and values (with attention="mla": only each position's
    latent and RoPE key, ops/mla.py);
  * decode: each new token is one forward of shape (1, 1) that appends its keys/values to the
    cache and attends over all cached positions: O(T) work per token instead of O(T^2);
  * sliding window: positions are absolute (RoPE angles, learned position rows), so a full cache
    cannot simply drop its oldest entry. Once the context would exceed block_size, every further
    token is predicted by recomputing the model on the last block_size tokens, without a cache
    (exactly what `use_cache=False` does all along). Generation beyond block_size thus costs a
    full forward per token.
Both paths give the same tokens (tests/test_generate.py checks this exactly) for dropless
models. With a capacity factor the tokens an expert drops depend on the whole batch of tokens
in the forward, so a capacity-limited model (e.g. the `switch` preset) can route differently
when it sees one token at a time.

Sampling happens on the host in float64 with a NumPy generator, so a seed gives the same
tokens on NumPy and CuPy (given the same logits): temperature 0 is greedy (argmax, ties to the
smaller id); otherwise p = softmax(logits / temperature) restricted to the top_k logits.
"""

from __future__ import annotations

import numpy as np

from minimoe import backend
from minimoe.layers.attention import make_kv_cache


def sample_next(logits, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """One token id from a (V,) host vector of logits.

    temperature 0 -> argmax. Otherwise keep the top_k largest logits (all when None), divide by
    the temperature and draw from their softmax by inverting the CDF with one uniform number.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k is not None and 0 < top_k < z.size:
        kth = np.sort(z)[-top_k]  # the k-th largest logit; ties at the cut are all kept
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    cdf = np.cumsum(p)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), z.size - 1))


def _check(model, ids, max_new_tokens, temperature, top_k):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if not ids:
        raise ValueError("the prompt is empty; generation needs at least one token to start from")
    V = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary 0..{V - 1}")
    return ids


def generate(
    model,
    ids,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    on_token=None,
) -> list[int]:
    """Continue the token sequence `ids` by `max_new_tokens` tokens; returns the new ids.

    ids: a list or 1-D array of token ids (one sequence). on_token(id) is called as each token
    is chosen (for streaming). The model is put in eval mode and restored afterwards.
    use_cache=False recomputes the whole window for every token (the reference the cache must
    match).
    """
    ids = _check(model, ids, max_new_tokens, temperature, top_k)
    c, xp = model.config, model.xp
    T_max = c.block_size
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    out: list[int] = []
    context = list(ids)
    cache = None
    try:
        # the ids go to the model as host arrays: it range-checks them there and moves them once
        # (a device array would cost a device -> host copy of its min and max per token)
        for _ in range(max_new_tokens):
            if use_cache and cache is None and len(context) <= T_max:
                # prefill: the whole (short enough) context at once. The cache holds no more
                # positions than this call can fill (a real Mixtral's block_size is 32768).
                cache_len = min(T_max, len(context) + max_new_tokens)
                cache = make_kv_cache(c, 1, cache_len, xp=xp, dtype=model.dtype)
                logits, _ = model.forward(np.asarray([context], dtype=np.int64), kv_cache=cache)
            elif cache is not None and cache.pos < cache.T_max:
                # decode: only the newest token, its keys/values appended to the cache
                logits, _ = model.forward(np.asarray([[context[-1]]], dtype=np.int64), kv_cache=cache)
            else:
                # no cache, or the window is full: recompute on the last block_size tokens
                window = context[-T_max:]
                logits, _ = model.forward(np.asarray([window], dtype=np.int64))
            # (1, T, V) -> the last position's logits, copied to the host once per token
            next_id = sample_next(backend.to_numpy(logits[0, -1]), temperature, top_k, rng)
            out.append(next_id)
            context.append(next_id)
            if on_token is not None:
                on_token(next_id)
    finally:
        if was_training:
            model.train()
    return out


class StreamDecoder:
    """Turns a growing list of token ids into text pieces to print as they arrive, in time linear
    in the number of tokens (each push decodes a few recent ids, never all of them).

    The printed text always ends at a point where decoding stopped cleanly ("read"); the ids
    since then are decoded together with the piece printed before them ("prefix" .. "read"),
    and what they add to it is the new piece:
        piece = decode(ids[prefix:]) minus decode(ids[prefix:read])
    Decoding with the earlier piece in front keeps what a tokenizer does at a word's start (e.g.
    a SentencePiece leading space). A trailing U+FFFD (a byte-level BPE token that ends in the
    middle of a UTF-8 character) is held back until the next token completes it; after MAX_HELD
    such tokens (no UTF-8 character needs more than 4 bytes) the text is printed as it is.
    For character and byte-level BPE tokenizers the pieces add up to decode(all ids) exactly.
    """

    MAX_HELD = 8

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""
        self.prefix = self.read = 0  # ids[prefix:read] decoded to the last printed piece

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") and len(self.ids) - self.read < self.MAX_HELD:
            return ""
        return self._emit(text[len(before) :])

    def _emit(self, piece: str) -> str:
        self.prefix, self.read = self.read, len(self.ids)
        self.printed += piece
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        if self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        return self._emit(self.tokenizer.decode(self.ids[self.prefix :])[len(before) :])


def default_prompt_ids(tokenizer) -> list[int]:
    """A newline when the tokenizer can encode one (as nanoGPT starts), else token 0."""
    try:
        ids = tokenizer.encode("\n")
    except (ValueError, KeyError):
        ids = []
    return list(ids) or [0]


def sample_text(
    model,
    tokenizer,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int | None = None,
    stream=None,
) -> str:
    """Generate text after `prompt` (decoded new text only); write pieces to `stream` as they come."""
    ids = list(tokenizer.encode(prompt)) if prompt else default_prompt_ids(tokenizer)
    dec = StreamDecoder(tokenizer)

    def on_token(i):
        piece = dec.push(i)
        if stream is not None and piece:
            stream.write(piece)
            stream.flush()

    generate(model, ids, max_new_tokens, temperature, top_k, seed, on_token=on_token)
    rest = dec.flush()
    if stream is not None and rest:
        stream.write(rest)
        stream.flush()
    return dec.printed
