"""The whole model: float64 gradient checks of every parameter, config and input validation,
bitwise determinism, and learning on real text."""

import math
import weakref

import numpy as np
import pytest
from conftest import (
    EPS,
    GRAD_TOL,
    asarray,
    assert_allclose,
    assert_array_equal,
    not_on_real_cupy,
    rand_ids,
    tiny_config,
    tiny_model,
    to_numpy,
)

from minimoe import GPT, AdamW, Config, backend, count_params, data, get_preset, gradcheck
from minimoe.model import StepCaches
from minimoe.tokenizer import CharTokenizer

# ---------------------------------------------------------------------------------------------
# Whole-model gradient checks (every entry of every parameter tensor)
# ---------------------------------------------------------------------------------------------

MODEL_VARIANTS = {
    "gpt2": dict(flavour="gpt2"),  # tied embeddings, learned positions, LayerNorm, GELU, biases
    "llama": dict(flavour="llama"),  # RoPE, RMSNorm, SwiGLU, untied head, no biases
    "llama_gqa": dict(flavour="llama", n_kv_head=2),
    "llama_mqa": dict(flavour="llama", n_kv_head=1),
    "gelu_exact": dict(flavour="gpt2", activation="gelu_exact", n_layer=1),  # erf is slow: one block
    "mixed": dict(flavour="gpt2", norm="rmsnorm", bias=False, tie_embeddings=False, pos_emb="none"),
}


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_gradcheck_model(variant):
    model = tiny_model(**MODEL_VARIANTS[variant])
    rng = np.random.default_rng(0)
    idx, targets = rand_ids(rng, 11), rand_ids(rng, 11)
    targets[0, 2] = -1  # an ignored position on the way
    errors = gradcheck.check_model(model, idx, targets, eps=EPS)
    assert set(errors) == set(model.params)  # every parameter tensor, every entry
    bad = {k: e for k, e in errors.items() if not e <= GRAD_TOL}
    assert not bad, f"{variant}: rel errors above {GRAD_TOL}: {bad}"


def test_model_parameter_layout():
    gpt2 = tiny_model("gpt2")
    assert "wpe" in gpt2.params and "lm_head" not in gpt2.params and "blocks.0.attn.bqkv" in gpt2.params
    llama = tiny_model("llama", n_kv_head=2)
    assert "wpe" not in llama.params and "lm_head" in llama.params and "blocks.0.ln1.b" not in llama.params
    assert llama.params["blocks.0.attn.wqkv"].shape == (8, (4 + 2 * 2) * 2)  # [q | k | v], H=4, Hkv=2, D=2
    assert llama.params["blocks.1.mlp.w3"].shape == (8, 12)
    for model in (gpt2, llama):
        assert model.num_params() == count_params(model.config)["total"]
        assert all(p.dtype == np.float64 for p in model.params.values())


def test_tied_wte_gradient_includes_the_head():
    # A tied model equals an untied one whose head is a copy of wte^T; the tied wte gradient must be
    # the sum of the untied model's embedding gradient and its head gradient (transposed).
    tied = tiny_model("gpt2")
    untied = tiny_model("gpt2", tie_embeddings=False)
    untied.params.update({k: v.copy() for k, v in tied.params.items()})
    untied.params["lm_head"] = tied.params["wte"].T.copy()
    rng = np.random.default_rng(1)
    idx, targets = rand_ids(rng, 11), rand_ids(rng, 11)
    _, l1 = tied.forward(idx, targets)
    _, l2 = untied.forward(idx, targets)
    assert float(l1) == pytest.approx(float(l2), rel=1e-14)
    g1, g2 = tied.backward(), untied.backward()
    assert_allclose(g1["wte"], g2["wte"] + g2["lm_head"].T, rtol=1e-12, atol=1e-14)
    g1, g2 = {k: to_numpy(v) for k, v in g1.items()}, {k: to_numpy(v) for k, v in g2.items()}
    unused = sorted(set(range(11)) - set(idx.ravel().tolist()))
    assert unused, "the test needs a token id absent from idx"
    assert np.all(g2["wte"][unused] == 0.0)  # untied: rows of unseen ids get nothing ...
    assert np.all(np.abs(g1["wte"][unused]).max(axis=1) > 0)  # ... tied: the head still uses them
    # wpe rows past T are never used
    assert np.all(g1["wpe"][idx.shape[1] :] == 0.0)


def test_gradcheck_model_with_dropout_in_train_mode():
    # Re-seeding the model's Generator before every forward fixes the dropout masks, so the
    # training-mode loss is a deterministic function of the parameters and can be checked.
    model = tiny_model("gpt2", dropout=0.2).train()
    rng = np.random.default_rng(2)
    idx, targets = rand_ids(rng, 11), rand_ids(rng, 11)

    def loss_fn():
        model.rng = backend.make_rng(99)
        return model.forward(idx, targets)[1]

    loss_train = float(loss_fn())
    grads = {k: v.copy() for k, v in model.backward().items()}
    errors = gradcheck.check_gradients(loss_fn, model.params, grads, eps=EPS, max_entries=40)
    assert max(errors.values()) <= GRAD_TOL, errors
    model.eval()
    assert float(model.forward(idx, targets)[1]) != loss_train  # dropout really was on
    model.train()
    assert float(model.forward(idx, targets)[1]) != loss_train  # a new mask without re-seeding


def test_check_model_needs_float64_and_restores_mode():
    with pytest.raises(ValueError, match="float64"):
        gradcheck.check_model(
            GPT(tiny_config(), dtype="float32"), np.zeros((1, 2), int), np.zeros((1, 2), int)
        )
    model = tiny_model("gpt2").train()
    rng = np.random.default_rng(0)
    gradcheck.check_model(model, rand_ids(rng, 11), rand_ids(rng, 11), eps=EPS, names=["ln_f.w"])
    assert model.training


def test_initial_loss_is_about_log_vocab():
    # with the default small init the logits are ~0, so the loss is ~log V (a uniform guess)
    model = GPT(Config(vocab_size=64, n_layer=2, n_embd=32, n_head=4, block_size=16), seed=0)
    rng = np.random.default_rng(0)
    _, loss = model.forward(rand_ids(rng, 64, 4, 16), rand_ids(rng, 64, 4, 16))
    assert abs(float(loss) - math.log(64)) < 0.05


# ---------------------------------------------------------------------------------------------
# Validation: configs and inputs
# ---------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(n_embd=30, n_head=4), "n_embd"),
    (dict(block_size=0), "block_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=0), "n_layer"),
    (dict(flavour="gpt5"), "flavour"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(flavour="llama", n_embd=12, n_head=4), "n_embd"),  # head size 3 is odd: RoPE needs even
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(norm="batchnorm"), "norm"),
    (dict(activation="mish"), "activation"),
    (dict(pos_emb="alibi"), "pos_emb"),
    (dict(init_std=0.0), "init_std"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(n_experts=4, top_k=0), "top_k"),
    (dict(n_experts=-1), "n_experts"),
    (dict(n_experts=4, router="hash"), "router"),
    (dict(n_experts=4, capacity_factor=-1.0), "capacity_factor"),
]


@pytest.mark.parametrize("kwargs,field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as exc:
        Config(**kwargs)
    assert "\n" not in str(exc.value)


def test_config_replace_revalidates_and_rejects_unknown_fields():
    c = tiny_config()
    with pytest.raises(ValueError, match="n_head"):
        c.replace(n_head=3)
    with pytest.raises(ValueError, match="n_layers"):
        Config.from_dict({**c.to_dict(), "n_layers": 2})
    assert Config.from_dict(c.to_dict()) == c


def test_counted_only_preset_cannot_be_built():
    with pytest.raises(ValueError, match="count"):
        GPT(get_preset("gpt2-124m"))
    with pytest.raises(TypeError, match="Config"):
        GPT({"n_layer": 2})
    with pytest.raises(ValueError, match="dtype"):
        GPT(tiny_config(), dtype="float16")


BAD_INPUTS = [
    (lambda: np.zeros((2, 4)), "integer"),  # float ids
    (lambda: np.zeros(4, dtype=np.int64), r"\(B, T\)"),  # 1-D
    (lambda: np.full((2, 4), 11), "outside"),  # id == vocab_size
    (lambda: np.full((2, 4), -2), "outside"),
    (lambda: np.zeros((1, 9), dtype=np.int64), "block_size"),  # T = 9 > block_size = 8
    (lambda: [[1, 2]], r"\(B, T\)"),  # a list, not an array
]


@pytest.mark.parametrize("where", ["host", "backend"])
@pytest.mark.parametrize(
    "make_idx,message", BAD_INPUTS, ids=["float", "1d", "vocab", "negative", "long", "list"]
)
def test_forward_rejects_bad_idx(make_idx, message, where):
    # ids from the host are checked there; ids already on the backend are checked too
    model = tiny_model("gpt2")
    idx = make_idx()
    if where == "backend" and isinstance(idx, np.ndarray):
        idx = asarray(idx)
    with pytest.raises(ValueError, match=message) as exc:
        model.forward(idx)
    assert "\n" not in str(exc.value)


def test_forward_rejects_bad_targets_and_backward_needs_targets():
    model = tiny_model("gpt2")
    idx = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="targets"):
        model.forward(idx, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="targets"):
        model.forward(idx, np.zeros((2, 4)))
    for bad in (-2, 11):  # only -1 (ignore_index) may leave [0, V): -2 would wrap round silently
        with pytest.raises(ValueError, match="targets holds ids outside"):
            model.forward(idx, np.full((2, 4), bad))
    model.forward(idx)
    with pytest.raises(RuntimeError, match="targets"):
        model.backward()


# ---------------------------------------------------------------------------------------------
# Memory: a forward frees the last step's caches piece by piece (model.StepCaches)
# ---------------------------------------------------------------------------------------------


def test_step_caches_drop_the_previous_entry_when_the_same_piece_is_stored():
    previous = {"a": 1, "b": 2, "c": 3}
    caches = StepCaches(previous)
    caches["a"] = 10
    assert previous == {"b": 2, "c": 3}  # last step's "a" goes as soon as this step's "a" exists
    caches["b"] = 20
    assert previous == {"c": 3} and dict(caches) == {"a": 10, "b": 20}
    done = caches.done()
    assert type(done) is dict and done == {"a": 10, "b": 20}
    caches["c"] = 30  # after done() the leftover of the previous step is no longer held
    assert previous == {"c": 3}


def test_a_forward_frees_the_last_steps_activations_as_it_replaces_them(monkeypatch):
    model = tiny_model("gpt2")
    rng = np.random.default_rng(0)
    idx, targets = rand_ids(rng, 11, T=5), rand_ids(rng, 11, T=5)
    model.forward(idx, targets)
    model.backward()
    old = {name: weakref.ref(model._cache[name][0]) for name in ("blocks.0.ln1", "ln_f")}  # xhat arrays
    seen = []
    norm_forward = model._norm_forward

    def spy(x, name):
        seen.append((name, old["blocks.0.ln1"]() is None, old["ln_f"]() is None))
        return norm_forward(x, name)

    monkeypatch.setattr(model, "_norm_forward", spy)
    model.forward(idx, targets)
    assert seen[0] == ("blocks.0.ln1", False, False)  # nothing replaced yet: last step's are alive
    # when the final norm runs, block 0's old ln1 cache is gone, the old ln_f not yet replaced
    assert seen[-1] == ("ln_f", True, False)
    assert old["ln_f"]() is None


# ---------------------------------------------------------------------------------------------
# Determinism: same seed, same machine -> bitwise-identical training
# ---------------------------------------------------------------------------------------------

SMALL = dict(n_layer=2, n_embd=32, n_head=4, block_size=16, vocab_size=64)
DETERMINISM_PRESETS = {
    "dense": dict(SMALL, ffn_hidden=64, dropout=0.1),
    "mixtral": dict(SMALL, expert_hidden=32),
    "switch": dict(SMALL, expert_hidden=32),
    "deepseek": dict(SMALL, expert_hidden=16, shared_hidden=16),
}


def _train_losses(preset, seed, steps=5):
    config = get_preset(preset, **DETERMINISM_PRESETS[preset])
    model = GPT(config, seed=seed)
    opt = AdamW(model.params, lr=1e-2)
    rng = np.random.default_rng(0)  # the same batches for every run
    losses = []
    for _ in range(steps):
        # counting sequences from random starts: a pattern (next = this + 1) learnt within a few steps
        idx = (rng.integers(0, 64, (4, 1)) + np.arange(17)) % 64
        _, loss = model.forward(idx[:, :-1], idx[:, 1:])
        model.backward()
        opt.step(model.grads)
        model.update_router_biases()
        losses.append(float(loss))
    return losses, model


@not_on_real_cupy("its atomic adds (the embedding gradient's scatter-add) sum in a varying order")
@pytest.mark.parametrize("preset", list(DETERMINISM_PRESETS))
def test_training_is_bitwise_deterministic(preset):
    a, model_a = _train_losses(preset, seed=3)
    b, model_b = _train_losses(preset, seed=3)
    c, _ = _train_losses(preset, seed=4)
    assert a == b  # exact float equality, step by step
    for k in model_a.params:
        assert_array_equal(model_a.params[k], model_b.params[k])
    for k in model_a.buffers:
        assert_array_equal(model_a.buffers[k], model_b.buffers[k])
    assert all(x != y for x, y in zip(a, c))
    assert a[-1] < a[0]  # and it trains


# ---------------------------------------------------------------------------------------------
# Learning: a small dense model beats the unigram baseline on real text
# ---------------------------------------------------------------------------------------------


def test_dense_model_learns_builtin_corpus():
    text = data.builtin_corpus()[:100_000]
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text))
    train_ids, val_ids = data.train_val_split(ids, 0.1)
    # unigram baseline: the entropy (nats) of the character distribution, the best loss a model
    # that ignores context can reach
    counts = np.bincount(train_ids, minlength=tok.vocab_size)
    freq = counts[counts > 0] / counts.sum()
    baseline = float(-(freq * np.log(freq)).sum())
    assert 2.5 < baseline < math.log(tok.vocab_size)

    config = Config(
        flavour="llama",
        vocab_size=tok.vocab_size,
        block_size=32,
        n_layer=2,
        n_head=4,
        n_embd=64,
        ffn_hidden=128,
    )
    model = GPT(config, seed=0)
    opt = AdamW(model.params, lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(150):
        x, y = data.get_batch(train_ids, 16, 32, rng)
        _, loss = model.forward(x, y)
        model.backward()
        opt.step(model.grads)
        losses.append(float(loss))
    assert losses[0] > baseline  # it starts near log V, above the baseline
    assert np.mean(losses[-20:]) < baseline - 0.3, (baseline, losses[-20:])
    model.eval()
    x, y = data.get_batch(val_ids, 32, 32, np.random.default_rng(1))
    assert float(model.forward(x, y)[1]) < baseline - 0.3  # on unseen text too
