"""Tests for minimoe.tokenizer (character and byte-level BPE tokenizers)."""

import json

import numpy as np
import pytest

from minimoe.data import builtin_corpus
from minimoe.tokenizer import BPETokenizer, CharTokenizer, split_chunks, tokenizer_from_dict


@pytest.fixture(scope="module")
def corpus_slice():
    return builtin_corpus()[:50_000]


@pytest.fixture(scope="module")
def bpe(corpus_slice):
    return BPETokenizer.train(corpus_slice, 400)


def random_unicode(rng, n):
    """Random strings mixing ASCII, accents, CJK, emoji, whitespace and control chars."""
    pools = ["abc XYZ 019_", "\n\t\r ", "éüßñ", "中文字", "😀🚀👍🏽", "\x00\x7f", "\u0301\u200d"]
    return "".join(rng.choice(list(rng.choice(pools))) for _ in range(n))


# ---------------------------------------------------------------- char


def test_char_round_trip(corpus_slice):
    tok = CharTokenizer.from_text(corpus_slice)
    assert tok.chars == sorted(set(corpus_slice))
    ids = tok.encode(corpus_slice)
    assert len(ids) == len(corpus_slice) and max(ids) < tok.vocab_size
    assert tok.decode(ids) == corpus_slice
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_char_unknown_character_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5])
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.from_text("")


def test_char_dict_round_trip():
    tok = CharTokenizer.from_text("héllo wörld 😀\n")
    d = json.loads(json.dumps(tok.to_dict()))
    tok2 = tokenizer_from_dict(d)
    assert isinstance(tok2, CharTokenizer) and tok2.chars == tok.chars
    assert tok2.decode(tok.encode("wörld 😀")) == "wörld 😀"


# ---------------------------------------------------------------- bpe


def test_chunks_cover_everything():
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = random_unicode(rng, 80)
        assert "".join(split_chunks(s)) == s
    assert split_chunks("Hello, world  42!") == ["Hello", ",", " world", " ", " 42", "!"]


def test_bpe_round_trip_corpus(bpe, corpus_slice):
    assert bpe.vocab_size == 400
    ids = bpe.encode(corpus_slice)
    assert bpe.decode(ids) == corpus_slice
    # compression: clearly fewer tokens than UTF-8 bytes
    assert len(ids) < 0.7 * len(corpus_slice.encode("utf-8"))


def test_bpe_round_trip_unicode(bpe):
    rng = np.random.default_rng(1)
    for _ in range(100):
        s = random_unicode(rng, int(rng.integers(0, 60)))
        assert bpe.decode(bpe.encode(s)) == s
    assert bpe.encode("") == [] and bpe.decode([]) == ""


def test_bpe_unicode_training_round_trip():
    # merges learned across multi-byte characters must still decode exactly
    text = "naïve café 😀😀😀 中文中文中文\n" * 30
    tok = BPETokenizer.train(text, 300)
    assert tok.vocab_size > 256
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


def test_bpe_decode_invalid_utf8_uses_replacement():
    tok = BPETokenizer.train("x", 256)
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"


def test_bpe_deterministic(corpus_slice):
    a = BPETokenizer.train(corpus_slice[:20_000], 320)
    b = BPETokenizer.train(corpus_slice[:20_000], 320)
    assert a.merges == b.merges


def test_bpe_stops_early_on_tiny_text():
    tok = BPETokenizer.train("aaaa", 1000)
    assert 256 < tok.vocab_size < 1000
    assert tok.decode(tok.encode("aaaaaaa")) == "aaaaaaa"


@pytest.mark.parametrize("bad", [0, 255, -1, 300.0, "512"])
def test_bpe_bad_vocab_size(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        BPETokenizer.train("hello", bad)


def test_bpe_dict_round_trip(bpe, corpus_slice):
    d = json.loads(json.dumps(bpe.to_dict()))
    tok2 = tokenizer_from_dict(d)
    assert isinstance(tok2, BPETokenizer) and tok2.merges == bpe.merges
    sample = corpus_slice[:2000]
    assert tok2.encode(sample) == bpe.encode(sample)


def test_tokenizer_from_dict_bad_type():
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        tokenizer_from_dict({"type": "wordpiece"})
