"""Checkpoints: exact round trip, atomic writes, and one clear error for every bad file."""

import numpy as np
import pytest
from conftest import TEST_BACKEND, assert_array_equal

from minimoe import GPT, AdamW, Config, checkpoint
from minimoe.checkpoint import CheckpointError
from minimoe.tokenizer import BPETokenizer, CharTokenizer

CFG = dict(flavour="llama", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, n_experts=4, top_k=2,
           expert_hidden=8, n_shared_experts=1, router="sigmoid_bias", aux_loss_coef=0.0)  # fmt: skip


def trained_model(seed=0):
    """A tiny DeepSeek-style model (it has bias buffers) after two AdamW steps."""
    model = GPT(Config(**CFG), seed=seed)
    opt = AdamW(model.params, lr=1e-2)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        x = rng.integers(0, 11, (2, 8))
        model.forward(x, np.roll(x, -1, axis=1))
        model.backward()
        opt.step(model.grads)
        model.update_router_biases()
    return model, opt


def one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture
def saved(tmp_path):
    model, opt = trained_model()
    data_rng = np.random.default_rng(5)
    data_rng.random(3)  # advance it: the saved state is not the seed's
    path = checkpoint.save_checkpoint(
        tmp_path, model, opt, CharTokenizer(list("abcdefghijk")),
        {"iteration": 2, "best_val_loss": 1.5, "seed": 0}, rngs={"data": data_rng, "model": model.rng},
    )  # fmt: skip
    return path, model, opt, data_rng


def test_round_trip_is_exact(saved, tmp_path):
    path, model, opt, data_rng = saved
    assert path == tmp_path / "ckpt.npz"
    assert any(b.any() for b in model.buffers.values())  # the bias moved: a real test of buffers
    m2, tok, ck = checkpoint.load_model(tmp_path)
    assert m2.config == model.config
    assert list(m2.params) == list(model.params)
    for k in model.params:
        assert m2.params[k].dtype == model.params[k].dtype
        assert_array_equal(m2.params[k], model.params[k])
    for k in model.buffers:
        assert_array_equal(m2.buffers[k], model.buffers[k])
    opt2 = AdamW(m2.params, lr=1e-2)
    checkpoint.load_optimizer_state(ck, opt2, m2)
    assert opt2.t == opt.t == 2
    for k in model.params:
        assert_array_equal(opt2.m[k], opt.m[k])
        assert_array_equal(opt2.v[k], opt.v[k])
    assert tok.decode(tok.encode("cab")) == "cab"
    assert ck.train_state == {"iteration": 2, "best_val_loss": 1.5, "seed": 0}
    # restored generators continue the saved streams
    r = np.random.default_rng(0)
    assert checkpoint.set_rng_state(r, ck.rng["data"])
    assert_array_equal(r.random(4), data_rng.random(4))
    if TEST_BACKEND == "cupy":  # CuPy's generator exposes no state: it is reseeded on resume
        assert ck.rng["model"] is None
    else:
        r = np.random.default_rng(0)
        assert checkpoint.set_rng_state(r, ck.rng["model"])
        assert_array_equal(r.random(4), model.rng.random(4))
    # and the loaded model computes the same logits
    x = np.arange(8)[None] % 11
    assert_array_equal(m2.eval().forward(x)[0], model.eval().forward(x)[0])


def test_loads_without_pickle_and_bpe_tokenizer(tmp_path):
    tok = BPETokenizer.train("abab cdcd abab " * 20, 260)
    model = GPT(Config(**dict(CFG, vocab_size=tok.vocab_size)))  # a tokenizer must fit its model
    path = checkpoint.save_checkpoint(tmp_path / "m.npz", model, tokenizer=tok)
    with np.load(path, allow_pickle=False) as z:  # every entry is a plain array
        assert str(z["format"][()]) == checkpoint.FORMAT
        assert "optim/t" not in z.files
    _, tok2, ck = checkpoint.load_model(path)
    assert tok2.merges == tok.merges and ck.optimizer is None
    with pytest.raises(CheckpointError, match="no optimizer state"):
        checkpoint.load_optimizer_state(ck, AdamW(model.params), model)


def test_no_temp_files_left(saved, tmp_path):
    path, model, opt, _ = saved
    checkpoint.save_checkpoint(tmp_path, model, opt)  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]


def test_failed_write_keeps_the_old_checkpoint(saved, tmp_path, monkeypatch):
    path, model, opt, _ = saved
    before = path.read_bytes()
    wte = model.params["wte"].copy()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.np, "savez", broken_savez)
    model.params["wte"] += 1.0
    with pytest.raises(OSError, match="No space"):
        checkpoint.save_checkpoint(tmp_path, model, opt)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]
    m2, _, _ = checkpoint.load_model(tmp_path)
    assert_array_equal(m2.params["wte"], wte)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint exists") as e:
        checkpoint.load_checkpoint(tmp_path / "nothing")
    one_line(e)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(saved, keep):
    path = saved[0]
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        checkpoint.load_model(path)
    one_line(e)


def test_random_bytes(tmp_path):
    p = tmp_path / "ckpt.npz"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        checkpoint.load_checkpoint(tmp_path)
    one_line(e)


def test_unrelated_npz(tmp_path):
    np.savez(tmp_path / "ckpt.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a minimoe checkpoint") as e:
        checkpoint.load_checkpoint(tmp_path)
    one_line(e)


def _rewrite(path, change):
    """Rewrite a checkpoint's entries through `change(dict)` (no atomicity needed in a test)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez(path, **arrays)


def test_wrong_shape(saved):
    path = saved[0]
    _rewrite(path, lambda a: a.update({"param/wte": np.zeros((12, 8), np.float32)}))
    with pytest.raises(
        CheckpointError, match=r"'wte' of shape \(12, 8\) but its config needs \(11, 8\)"
    ) as e:
        checkpoint.load_model(path)
    one_line(e)


def test_missing_param(saved):
    path = saved[0]
    _rewrite(path, lambda a: a.pop("param/blocks.1.moe.experts.w2"))
    with pytest.raises(CheckpointError, match="lacks parameter") as e:
        checkpoint.load_model(path)
    one_line(e)


def test_invalid_config(saved):
    path = saved[0]
    _rewrite(path, lambda a: a.update({"config": np.array('{"n_layer": 0}')}))
    with pytest.raises(CheckpointError, match="invalid model config") as e:
        checkpoint.load_checkpoint(path)
    one_line(e)
