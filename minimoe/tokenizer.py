"""Tokenizers for minimoe: a character tokenizer and a byte-level BPE.

Both have the same small interface::

    tok.encode(text) -> list[int]      tok.decode(ids) -> str
    tok.vocab_size                     tok.to_dict() / Cls.from_dict(d)

``to_dict`` returns plain JSON-serialisable data (stored in checkpoints);
``tokenizer_from_dict`` rebuilds either kind from its ``"type"`` key.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

__all__ = ["CharTokenizer", "BPETokenizer", "tokenizer_from_dict", "split_chunks"]


def _check_ids(ids, vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is out of range; valid ids are 0..{vocab_size - 1}")
    return ids


# --------------------------------------------------------------------------
# Character tokenizer
# --------------------------------------------------------------------------


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters."""

    def __init__(self, chars):
        self.chars = list(chars)
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ValueError(
                f"CharTokenizer needs a non-empty list of distinct characters, got {len(self.chars)} entries"
            )
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise ValueError("cannot build a CharTokenizer from empty text; pass some training text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(
                f"character {exc.args[0]!r} is not in the vocabulary of this CharTokenizer "
                f"({self.vocab_size} characters); build it from text that contains it"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in _check_ids(ids, self.vocab_size))

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        return cls(d["chars"])


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


class BPETokenizer:
    """Byte-level BPE: ids 0..255 are raw bytes, id 256+k is the k-th learned merge."""

    def __init__(self, merges):
        # merges[k] = (a, b) means token 256+k is token a followed by token b
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.ranks = {pair: k for k, pair in enumerate(self.merges)}
        self.vocab = [bytes([i]) for i in range(256)]  # id -> bytes
        for k, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + k and 0 <= b < 256 + k):
                raise ValueError(f"merge {k} {(a, b)} refers to a token that does not exist yet")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
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

    def decode(self, ids) -> str:
        data = b"".join(self.vocab[i] for i in _check_ids(ids, self.vocab_size))
        return data.decode("utf-8", errors="replace")  # a cut-off sequence may split a character

    def to_dict(self) -> dict:
        return {"type": "bpe", "merges": [list(p) for p in self.merges]}

    @classmethod
    def from_dict(cls, d: dict) -> BPETokenizer:
        return cls(d["merges"])


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer saved with ``to_dict`` (dispatches on ``d["type"]``)."""
    kinds = {"char": CharTokenizer, "bpe": BPETokenizer}
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in kinds:
        raise ValueError(f"unknown tokenizer type {kind!r}; valid types are 'char' and 'bpe'")
    return kinds[kind].from_dict(d)
