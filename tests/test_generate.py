"""Generation: the KV-cache path must pick exactly the tokens that full recomputation picks,
for dense and MoE models, greedy and seeded sampling, also past block_size (sliding window)."""

import numpy as np
import pytest
from conftest import asarray

from minimoe import GPT, Config
from minimoe.sample import StreamDecoder, generate, sample_next, sample_text
from minimoe.tokenizer import BPETokenizer, CharTokenizer

# float64 and a large init: peaked logits, round-off far below any gap between top logits, so
# "the same tokens" is a fair demand of two computations that differ in summation order.
BASE = dict(vocab_size=13, block_size=12, n_layer=2, n_head=4, n_embd=16, init_std=0.4)
MODELS = {
    "dense-gpt2": dict(flavour="gpt2", ffn_hidden=24),  # learned positions, tied head
    "dense-llama-gqa": dict(flavour="llama", ffn_hidden=24, n_kv_head=2),  # RoPE, grouped KV heads
    "mixtral": dict(flavour="llama", n_experts=4, top_k=2, expert_hidden=12),
    "deepseek": dict(flavour="llama", n_experts=6, top_k=2, expert_hidden=8, n_shared_experts=1,
                     router="sigmoid_bias", aux_loss_coef=0.0, first_dense=1),
}  # fmt: skip


def make_model(name, seed=0):
    model = GPT(Config(**BASE, **MODELS[name]), seed=seed, dtype="float64")
    for b in model.buffers.values():  # a trained DeepSeek bias is not zero: exercise it
        b[...] = asarray(np.random.default_rng(1).standard_normal(b.shape) * 0.3)
    return model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("temperature,top_k,seed", [(0.0, None, None), (1.0, None, 3), (0.8, 4, 7)])
def test_kv_cache_matches_recompute(name, temperature, top_k, seed):
    model = make_model(name)
    prompt = [1, 5, 2, 7, 3]
    # 5 + 20 tokens > block_size 12: covers prefill, cached decode, and the sliding window
    kw = dict(max_new_tokens=20, temperature=temperature, top_k=top_k, seed=seed)
    cached = generate(model, prompt, use_cache=True, **kw)
    full = generate(model, prompt, use_cache=False, **kw)
    assert len(cached) == 20
    assert cached == full
    assert all(0 <= t < BASE["vocab_size"] for t in cached)


def test_cache_really_decodes_one_token_at_a_time():
    model = make_model("mixtral")
    shapes = []
    forward = model.forward

    def spy(idx, targets=None, kv_cache=None):
        shapes.append((tuple(idx.shape), kv_cache is not None))
        return forward(idx, targets, kv_cache)

    model.forward = spy
    generate(model, [1, 2, 3], max_new_tokens=12, temperature=0.0)
    # prefill (1, 3) -> token 4; nine (1, 1) steps with the cache fill positions 3..11 and give
    # tokens 5..13; the last two tokens come from full windows of block_size, without a cache
    assert shapes[0] == ((1, 3), True)
    assert shapes[1:10] == [((1, 1), True)] * 9
    assert shapes[10:] == [((1, 12), False)] * 2


def test_seed_fixes_samples_and_mode_is_restored():
    model = make_model("mixtral").train()
    a = generate(model, [4], 15, temperature=1.0, seed=11)
    b = generate(model, [4], 15, temperature=1.0, seed=11)
    c = generate(model, [4], 15, temperature=1.0, seed=12)
    assert a == b and a != c
    assert model.training


def test_long_prompt_is_cropped_to_block_size():
    model = make_model("dense-llama-gqa")
    prompt = list(np.random.default_rng(0).integers(0, 13, 30))
    assert generate(model, prompt, 4, 0.0) == generate(model, prompt[-12:], 4, 0.0, use_cache=False)


def test_sample_next():
    logits = np.array([0.1, 2.0, -1.0, 1.9])
    rng = np.random.default_rng(0)
    assert sample_next(logits, 0.0, None, rng) == 1
    assert all(sample_next(logits, 1.0, 1, rng) == 1 for _ in range(20))  # top-1 is greedy
    draws = [sample_next(logits, 1.0, 2, rng) for _ in range(400)]
    assert set(draws) == {1, 3}  # only the top 2 are ever drawn
    # frequencies follow softmax([2.0, 1.9]) = [0.525, 0.475]
    assert abs(draws.count(1) / 400 - 0.525) < 0.08


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(ids=[]), "empty"),
        (dict(ids=[13]), "outside"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_generate_rejects_bad_arguments(kw, match):
    model = make_model("dense-gpt2")
    args = dict(ids=[1], max_new_tokens=3, temperature=1.0, top_k=None)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(model, args.pop("ids"), **args)


def test_stream_decoder_holds_back_split_utf8():
    tok = BPETokenizer([])  # bytes only: "é" is two tokens
    ids = tok.encode("aé")
    assert len(ids) == 3
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in ids] == ["a", "", "é"]
    assert dec.flush() == ""


def test_sample_text_streams_what_it_returns():
    import io

    tok = CharTokenizer(list("abcdefghijklm"))
    model = make_model("mixtral")
    buf = io.StringIO()
    text = sample_text(model, tok, "abc", 10, temperature=1.0, seed=0, stream=buf)
    assert buf.getvalue() == text and len(text) == 10
