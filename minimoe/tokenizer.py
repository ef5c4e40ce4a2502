"""Tokenizers for minimoe: a character tokenizer and a byte-level BPE.

Both have the same small interface::

    tok.encode(text) -> list[int]      tok.decode(ids) -> str
    tok.vocab_size                     tok.to_dict() / Cls.from_dict(d)
    tok.with_specials(CHAT_SPECIALS)   tok.encode_chat(messages) -> (ids, loss_mask)

``to_dict`` returns plain JSON-serialisable data (stored in checkpoints, specials included);
``tokenizer_from_dict`` rebuilds either kind from its ``"type"`` key.

Special tokens (the chat format). A tokenizer may carry named special tokens, given the ids
just ABOVE its own vocabulary (characters, or bytes + merges): with V own tokens, specials[j]
is id V + j. ``encode`` never produces them (text that happens to read "<|user|>" is encoded
as ordinary characters, so a user cannot forge a turn), ``decode`` shows them by name. The chat
format uses three::

    <|user|> How much is 2 plus 3? <|end|> <|assistant|> 5 <|end|>
    mask:  0  0 ...                  0       0          1   1

``encode_chat`` returns the ids and a loss mask that is 1 on the assistant's tokens only,
including the assistant's <|end|> (so the model learns to stop) but not its <|assistant|>
marker (the chat loop writes that marker itself).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

__all__ = [
    "CharTokenizer",
    "BPETokenizer",
    "tokenizer_from_dict",
    "split_chunks",
    "CHAT_SPECIALS",
    "USER",
    "ASSISTANT",
    "END",
    "ROLES",
    "check_messages",
]

USER, ASSISTANT, END = CHAT_SPECIALS = ("<|user|>", "<|assistant|>", "<|end|>")
ROLES = {"user": USER, "assistant": ASSISTANT}  # a message's role -> the marker opening its turn


def _check_ids(ids, vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is out of range; valid ids are 0..{vocab_size - 1}")
    return ids


def check_messages(messages) -> list[tuple[str, str]]:
    """[(role, content), ...] of a conversation [{"role": "user" | "assistant", "content": str}, ...];
    ValueError naming the first bad message (counted from 1) and what would be valid."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"a conversation must be a non-empty list of messages, got {messages!r:.60}")
    out = []
    for k, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'message {k} must be an object with "role" and "content", got {m!r:.60}')
        if m["role"] not in ROLES:
            raise ValueError(f"message {k} has role {m['role']!r:.30}; valid roles are user and assistant")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {k} has content {m['content']!r:.30}; it must be a string")
        out.append((m["role"], m["content"]))
    return out


class _Specials:
    """Named special tokens above a tokenizer's own vocabulary, and the chat format built on them.

    A subclass sets self.specials (a list of names) and defines base_vocab_size (its own tokens)
    and _decode_base(ids) (its own tokens -> text)."""

    specials: list

    def _set_specials(self, specials):
        self.specials = list(specials)
        if any(not isinstance(s, str) or not s for s in self.specials) or len(set(self.specials)) != len(
            self.specials
        ):
            raise ValueError(f"special tokens must be distinct non-empty strings, got {self.specials!r}")

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.specials)

    def special_id(self, name: str) -> int:
        """The id of special token `name` (ValueError when this tokenizer has none of that name)."""
        if name not in self.specials:
            raise ValueError(f"this tokenizer has no special token {name!r}; it has {self.specials}")
        return self.base_vocab_size + self.specials.index(name)

    @property
    def has_chat_format(self) -> bool:
        return all(s in self.specials for s in CHAT_SPECIALS)

    def with_specials(self, names=CHAT_SPECIALS):
        """A copy with the special tokens `names` added (those it lacks, in order) above the
        vocabulary: every existing id keeps its meaning, the new ones come after."""
        new = [s for s in names if s not in self.specials]
        return type(self).from_dict({**self.to_dict(), "specials": self.specials + new})

    def decode(self, ids) -> str:
        n, parts, run = self.base_vocab_size, [], []
        for i in _check_ids(ids, self.vocab_size):
            if i < n:
                run.append(i)
            else:  # a special token: what came before it, then its name
                parts += [self._decode_base(run), self.specials[i - n]]
                run = []
        return "".join(parts) + self._decode_base(run)

    def _specials_dict(self) -> dict:
        return {"specials": list(self.specials)} if self.specials else {}

    def encode_chat(self, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Conversation -> (ids, loss_mask), two lists of the same length (see the module docstring).

        Each message becomes <|role|> content <|end|>; mask 1 on an assistant's content and its
        <|end|>, 0 elsewhere. add_generation_prompt appends <|assistant|> (mask 0): the prompt
        after which a model writes the next reply.
        """
        if not self.has_chat_format:
            raise ValueError(
                f"this tokenizer has no chat tokens {list(CHAT_SPECIALS)}; add them with .with_specials()"
            )
        end = self.special_id(END)
        ids, mask = [], []
        for role, content in check_messages(messages):
            body = self.encode(content)
            learn = int(role == "assistant")
            ids += [self.special_id(ROLES[role]), *body, end]
            mask += [0] + [learn] * (len(body) + 1)
        if add_generation_prompt:
            ids.append(self.special_id(ASSISTANT))
            mask.append(0)
        return ids, mask


# --------------------------------------------------------------------------
# Character tokenizer
# --------------------------------------------------------------------------


class CharTokenizer(_Specials):
    """One token per character; the vocabulary is the sorted set of characters (then the specials)."""

    def __init__(self, chars, specials=()):
        self.chars = list(chars)
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ValueError(
                f"CharTokenizer needs a non-empty list of distinct characters, got {len(self.chars)} entries"
            )
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self._set_specials(specials)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise ValueError("cannot build a CharTokenizer from empty text; pass some training text")
        return cls(sorted(set(text)))

    @property
    def base_vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(
                f"character {exc.args[0]!r} is not in the vocabulary of this CharTokenizer "
                f"({self.vocab_size} characters); build it from text that contains it"
            ) from None

    def _decode_base(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars, **self._specials_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"], d.get("specials", ()))


# --------------------------------------------------------------------------
# Byte-level BPE
# --------------------------------------------------------------------------

# Pre-split text into chunks; merges never cross chunk boundaries, so tokens
# stay "word-like". Each alternative covers one class of characters, and
# together they cover every character (letters, digits, whitespace, other),
# so "".join(chunks) == text always holds:
#   " ?[^\W\d_]+"        a word, with an optional leading space
#   " ?\d{1,3}"          up to 3 digits (keeps numbers from merging into huge tokens)
#   " ?(?:[^\s\w]|_)+"   a run of punctuation / symbols / emoji
#   "\s+(?!\S)|\s+"      whitespace (a trailing space is left for the next word)
CHUNK_PATTERN = r" ?[^\W\d_]+| ?\d{1,3}| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
_CHUNK_RE = re.compile(CHUNK_PATTERN)


def split_chunks(text: str) -> list[str]:
    """Split text into pre-tokenisation chunks (their concatenation is ``text``)."""
    chunks = _CHUNK_RE.findall(text)
    assert "".join(chunks) == text, "CHUNK_PATTERN must cover every character"
    return chunks


def _merge(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` in ``word`` (left to right)."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class BPETokenizer(_Specials):
    """Byte-level BPE: ids 0..255 are raw bytes, id 256+k is the k-th learned merge (then the specials)."""

    def __init__(self, merges, specials=()):
        # merges[k] = (a, b) means token 256+k is token a followed by token b
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.ranks = {pair: k for k, pair in enumerate(self.merges)}
        self.vocab = [bytes([i]) for i in range(256)]  # id -> bytes
        for k, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + k and 0 <= b < 256 + k):
                raise ValueError(f"merge {k} {(a, b)} refers to a token that does not exist yet")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._cache: dict[str, list[int]] = {}
        self._set_specials(specials)

    @property
    def base_vocab_size(self) -> int:
        return len(self.vocab)

    @classmethod
    def train(cls, text: str, vocab_size: int, verbose: bool = False) -> BPETokenizer:
        """Learn ``vocab_size - 256`` merges from ``text``, most frequent pair first.

        Ties between equally frequent pairs go to the smaller pair, so training
        is deterministic. Training stops early (giving a smaller vocabulary) if
        no adjacent pairs are left to merge.
        """
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(
                f"BPE vocab_size must be an integer >= 256 (the 256 byte tokens), got {vocab_size!r}"
            )

        # Work on unique chunks, each weighted by how often it occurs.
        counts = Counter(split_chunks(text))
        words = [list(chunk.encode("utf-8")) for chunk in counts]
        freqs = list(counts.values())

        # pair_counts[p]: weighted count of pair p; where[p]: words that (may) contain p
        pair_counts: Counter = Counter()
        where: dict = defaultdict(set)
        for w, (word, f) in enumerate(zip(words, freqs)):
            for p in zip(word, word[1:]):
                pair_counts[p] += f
                where[p].add(w)

        merges = []
        while 256 + len(merges) < vocab_size and pair_counts:
            # most frequent pair; among ties the smallest pair (hence the minus signs)
            best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
            new_id = 256 + len(merges)
            merges.append(best)
            # Update only the words containing `best`: remove their old pairs, add the new ones.
            for w in where.pop(best):
                word, f = words[w], freqs[w]
                for p in zip(word, word[1:]):
                    pair_counts[p] -= f
                    if pair_counts[p] <= 0:
                        del pair_counts[p]
                word = words[w] = _merge(word, best, new_id)
                for p in zip(word, word[1:]):
                    pair_counts[p] += f
                    where[p].add(w)  # stale entries elsewhere are harmless
            if verbose:
                print(f"merge {len(merges):4d}/{vocab_size - 256}: {best} -> {new_id}")
        return cls(merges)

    def _encode_chunk(self, chunk: str) -> list[int]:
        word = list(chunk.encode("utf-8"))
        while len(word) >= 2:
            # apply the earliest-learned merge present in the word, as in training
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            word = _merge(word, pair, 256 + self.ranks[pair])
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in split_chunks(text):
            if chunk not in self._cache:
                if len(self._cache) > 100_000:
                    self._cache.clear()  # keep memory bounded on huge, varied inputs
                self._cache[chunk] = self._encode_chunk(chunk)
            ids.extend(self._cache[chunk])
        return ids

    def _decode_base(self, ids) -> str:
        data = b"".join(self.vocab[i] for i in ids)
        return data.decode("utf-8", errors="replace")  # a cut-off sequence may split a character

    def to_dict(self) -> dict:
        return {"type": "bpe", "merges": [list(p) for p in self.merges], **self._specials_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        return cls(d["merges"], d.get("specials", ()))


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer saved with ``to_dict`` (dispatches on ``d["type"]``)."""
    kinds = {"char": CharTokenizer, "bpe": BPETokenizer}
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in kinds:
        raise ValueError(f"unknown tokenizer type {kind!r}; valid types are 'char' and 'bpe'")
    return kinds[kind].from_dict(d)
