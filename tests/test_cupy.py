"""The whole model on CuPy: a numpy-backed fake `cupy` (tests/fake_cupy.py) on every machine, and
the real CuPy where a CUDA GPU exists.

The fake refuses every implicit host/device mixing (numpy on a device array, a host array in a
device operation), so a training step, generation and the training loop running on it prove the
package keeps its arrays on one side and copies only through `backend`. It computes with numpy,
so its results must match the numpy backend's (to float32 round-off where the GPU code path sums
in another order: the embedding gradient's scatter-add).
"""

import json

import fake_cupy
import numpy as np
import pytest

from minimoe import GPT, backend, get_preset
from minimoe.optim import AdamW, clip_grad_norm
from minimoe.sample import generate
from minimoe.train import train, train_step

TOYS = ["dense", "mixtral", "switch", "deepseek", "gpt4-rumoured"]
SMALL = dict(n_layer=2, n_embd=16, n_head=2, block_size=8, vocab_size=13)


def small_preset(name, **kw):
    """A toy preset shrunk to a few thousand weights (experts of width 8 for the MoE ones)."""
    extra = {} if name == "dense" else dict(expert_hidden=8)
    if name == "deepseek":
        extra["shared_hidden"] = 8
    return get_preset(name, **{**SMALL, **extra, **kw})


def batch(seed=0, B=2, T=8, V=13):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


@pytest.fixture
def fake():
    """The fake cupy in sys.modules; the numpy backend and sys.modules restored afterwards."""
    name, dtype = backend.get_backend(), backend.get_default_dtype()
    try:
        with fake_cupy.installed() as cp:
            fake_cupy.transfers.clear()
            yield cp
    finally:
        backend.set_backend(name)
        backend.set_default_dtype(dtype)


def one_step(name, on, bias_rate=None):
    """forward + backward + clip + AdamW + router-bias update on backend `on`; host results."""
    backend.set_backend(on)
    kw = {} if bias_rate is None else dict(bias_update_rate=bias_rate)
    model = GPT(small_preset(name, **kw), seed=0)
    x, y = batch()
    logits, loss = model.forward(x, y)  # host targets: the model moves them to its device
    model.backward()
    grads = {k: backend.to_numpy(v).copy() for k, v in model.grads.items()}
    norm = clip_grad_norm(model.grads, 0.1)
    AdamW(model.params, lr=1e-2).step(model.grads)
    model.update_router_biases()
    out = dict(logits=logits, loss=loss, norm=norm, **{"p." + k: v for k, v in model.params.items()})
    out.update({"b." + k: v for k, v in model.buffers.items()})
    out = {k: backend.to_numpy(v) for k, v in out.items()}
    out.update({"g." + k: v for k, v in grads.items()})
    return out, model


def assert_match(ref, got, rtol=1e-4, atol=1e-6):
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        np.testing.assert_allclose(got[k], ref[k], rtol=rtol, atol=atol, err_msg=k)


def test_fake_refuses_host_device_mixing(fake):
    a = fake.asarray(np.ones(3))
    for mix in (
        lambda: np.asarray(a),
        lambda: np.exp(a),
        lambda: a + np.ones(3),
        lambda: fake.exp(np.ones(3)),
    ):
        with pytest.raises(TypeError):
            mix()
    assert backend.to_numpy(a * 2).tolist() == [2.0, 2.0, 2.0]
    assert fake_cupy.transfers["get"] == 1


@pytest.mark.parametrize("name", TOYS)
def test_training_step_on_fake_cupy_matches_numpy(fake, name):
    rate = 1e-2 if name == "deepseek" else None  # a bias step big enough to see
    ref, _ = one_step(name, "numpy", rate)
    got, model = one_step(name, "cupy", rate)
    assert backend.is_cupy_array(model.params["wte"]) and backend.is_cupy_array(model.grads["wte"])
    assert_match(ref, got)
    if name == "deepseek":  # the bias moved, identically
        assert np.abs(got["b.blocks.0.moe.router_bias"]).max() > 0


@pytest.mark.parametrize("name", TOYS)
def test_generation_on_fake_cupy_matches_numpy(fake, name):
    out = {}
    for on in ("numpy", "cupy"):
        backend.set_backend(on)
        model = GPT(small_preset(name), seed=0)
        out[on] = [generate(model, [1, 2, 3], 10, temperature=t, seed=5, use_cache=u)
                   for t in (0.0, 1.0) for u in (True, False)]  # fmt: skip
    assert out["cupy"] == out["numpy"]
    if name != "switch":  # capacity drops depend on the batch, see sample.py
        assert out["cupy"][0] == out["cupy"][1] and out["cupy"][2] == out["cupy"][3]


def test_train_loop_on_fake_cupy_matches_cpu(fake, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    opts = dict(preset="mixtral", n_layer=2, n_embd=16, n_head=2, n_experts=4, top_k=2, block_size=8,
                batch_size=4, max_iters=6, warmup_iters=2, eval_interval=3, eval_iters=2, log_interval=2,
                data=str(path), sample_tokens=5)  # fmt: skip
    cpu = train(dict(opts, out=str(tmp_path / "cpu"), device="cpu"), quiet=True)
    gpu = train(dict(opts, out=str(tmp_path / "gpu"), device="gpu"), quiet=True)
    assert backend.get_backend() == "cupy"
    assert gpu["iterations"] == cpu["iterations"] == 6
    for k in ("train_loss", "val_loss", "best_val_loss"):
        np.testing.assert_allclose(gpu[k], cpu[k], rtol=1e-5, err_msg=k)
    assert gpu["sample"] == cpu["sample"] and len(gpu["sample"]) > 0


def test_cli_on_fake_cupy_matches_cpu(fake, tmp_path, capsys):
    # `minimoe train / sample / routes --device gpu`: the same losses, text and routes as the CPU
    from minimoe import cli, data

    path = tmp_path / "tasks.txt"
    path.write_text(data.synthetic_corpus(300, seed=0), encoding="utf-8")
    size = ["--n-layer", "2", "--n-embd", "16", "--n-head", "2", "--n-experts", "4", "--top-k", "2",
            "--block-size", "16", "--batch-size", "4", "--max-iters", "4", "--eval-interval", "2",
            "--eval-iters", "2", "--log-interval", "1", "--sample-tokens", "8", "--data", str(path)]  # fmt: skip
    out = {}
    for device in ("cpu", "gpu"):
        run = str(tmp_path / device)
        dev = ["--device", device]
        assert cli.main(["train", *size, "--out", run, *dev]) == 0
        assert backend.get_backend() == ("cupy" if device == "gpu" else "numpy")
        assert cli.main(["sample", "--ckpt", run, "--max-new-tokens", "12", "--seed", "1", *dev]) == 0
        assert cli.main(["routes", "--ckpt", run, "--text", "1+2=3", *dev]) == 0
        metrics = [
            json.loads(line) for line in (tmp_path / device / "metrics.jsonl").read_text().splitlines()
        ]
        out[device] = (
            [(r["step"], r["train_loss"], r.get("val_loss")) for r in metrics],
            capsys.readouterr().out,
        )
    (cpu_losses, cpu_text), (gpu_losses, gpu_text) = out["cpu"], out["gpu"]
    assert [s for s, _, _ in gpu_losses] == [s for s, _, _ in cpu_losses] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.array([r[1:] for r in gpu_losses], dtype=float),
                               np.array([r[1:] for r in cpu_losses], dtype=float), rtol=1e-5)  # fmt: skip
    text_of = lambda t: [ln for ln in t.splitlines() if not ln.startswith(("step", "done", "training"))]
    assert text_of(gpu_text) == text_of(cpu_text) and len(text_of(gpu_text)) > 3


# Device -> host copies in one training step of a 2-layer MoE model: the token ids arrive from
# the host and are range-checked there (no copy); each MoE layer copies its E+1 dispatch
# offsets once (the experts' slice bounds must be host ints).
EXPECTED_TRANSFERS = {"get": 2}


def test_host_transfers_per_training_step(fake):
    backend.set_backend("cupy")
    model = GPT(small_preset("mixtral"), seed=0)
    opt = AdamW(model.params, lr=1e-3)
    x, y = batch()
    train_step(model, opt, x, y, lr=1e-3, grad_clip=1.0)  # warm-up: scratch buffers etc.
    fake_cupy.transfers.clear()
    loss = train_step(model, opt, x, y, lr=1e-3, grad_clip=1.0)
    assert backend.is_cupy_array(loss)
    counted = {k: v for k, v in fake_cupy.transfers.items() if v}
    assert counted == EXPECTED_TRANSFERS


def _gets_per_call(fn, n_calls):
    """Device -> host copies, by kind, per call of fn() (after one warm-up call)."""
    fn()
    fake_cupy.transfers.clear()
    for _ in range(n_calls):
        fn()
    return {k: v / n_calls for k, v in fake_cupy.transfers.items() if v}


def test_host_transfers_per_generated_token(fake):
    # Per new token: the last position's logits (sampling is on the host) and each MoE layer's
    # dispatch offsets. The ids go to the model as host arrays, so their range check costs no
    # copy (it once cost one more: generate moved them to the device first).
    backend.set_backend("cupy")
    model = GPT(small_preset("mixtral"), seed=0)
    n = 6  # prefill + 5 cached decode steps (the prompt is 3, block_size 8: no sliding window)
    per_call = _gets_per_call(lambda: generate(model, [1, 2, 3], n, temperature=0.0), 2)
    assert per_call == {"get": n * (1 + 2)}


def test_host_transfers_of_routes(fake):
    # `route_tokens` copies each MoE layer's chosen experts and gates per window, and the dispatch
    # offsets; the window's ids are range-checked on the host (no copy)
    from minimoe.analysis import route_tokens

    backend.set_backend("cupy")
    model = GPT(small_preset("mixtral"), seed=0)
    ids = np.arange(16) % 13  # two windows of block_size 8
    per_call = _gets_per_call(lambda: route_tokens(model, ids), 2)
    assert per_call == {"get": 2 * 2 * 3}  # windows x layers x (offsets, expert_idx, gates)


def test_host_transfers_per_chat_token(fake):
    # minimoe chat: per token the last logits and each MoE layer's offsets, as in generate (the
    # conversation's ids go to the model from the host; they once cost a range-check copy each)
    from minimoe.chat import Conversation
    from minimoe.tokenizer import CharTokenizer

    backend.set_backend("cupy")
    tok = CharTokenizer.from_text("abc xyz").with_specials()
    model = GPT(small_preset("mixtral", vocab_size=tok.vocab_size, block_size=32), seed=0)
    conv = Conversation(model, tok, reply_room=8)
    conv.reply("ab", max_new_tokens=3, temperature=0.0)  # warm-up
    fake_cupy.transfers.clear()
    reply = conv.reply("xyz", max_new_tokens=4, temperature=1.0, rng=np.random.default_rng(0))
    steps = len(reply) + (len(reply) < 4)  # an <|end|> sampled early is a step too
    assert len(reply) >= 2
    assert {k: v for k, v in fake_cupy.transfers.items() if v} == {"get": steps * (1 + 2)}


# ---------------------------------------------------------------------------- the real thing
def _have_gpu() -> bool:
    """The real CuPy with a CUDA device (not the fake, which a fake-cupy test session installs)."""
    try:
        import cupy

        return cupy.ndarray is not fake_cupy.ndarray and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


gpu = pytest.mark.skipif(not _have_gpu(), reason="needs the real CuPy and a CUDA GPU")


@pytest.fixture
def on_gpu():
    name, dtype = backend.get_backend(), backend.get_default_dtype()
    try:
        yield
    finally:
        backend.set_backend(name)
        backend.set_default_dtype(dtype)


def _forward_backward(name, on):
    backend.set_backend(on)
    model = GPT(small_preset(name), seed=0).eval()  # eval: no dropout or router noise (RNGs differ)
    x, y = batch()
    logits, loss = model.forward(x, y)
    grads = model.backward()
    out = {"logits": logits, "loss": loss, **{"g." + k: v for k, v in grads.items()}}
    return {k: backend.to_numpy(v) for k, v in out.items()}


@gpu
@pytest.mark.parametrize("name", TOYS)
def test_real_cupy_matches_numpy(on_gpu, name):
    ref, got = _forward_backward(name, "numpy"), _forward_backward(name, "cupy")
    assert_match(ref, got, rtol=2e-3, atol=2e-5)  # float32, different summation orders


@gpu
@pytest.mark.parametrize("name", ["dense", "mixtral", "switch", "deepseek"])
def test_real_cupy_gradcheck_model(on_gpu, name):
    from minimoe.gradcheck import check_model

    backend.set_backend("cupy")
    cfg = small_preset(name, n_embd=8, block_size=4, init_std=0.5, router_init_std=0.5)
    model = GPT(cfg, seed=0, dtype="float64")
    x, y = batch(B=2, T=4)
    errors = check_model(model, x, y, eps=1e-5, max_entries=20)
    assert max(errors.values()) <= 1e-6, errors


@gpu
def test_real_cupy_gradcheck_ops(on_gpu):
    import cupy

    from minimoe.gradcheck import check_op
    from minimoe.ops import activation, linear, norm

    rng = np.random.default_rng(0)
    x, w, b = (cupy.asarray(rng.standard_normal(s)) for s in ((3, 4, 5), (5, 6), (6,)))
    g, beta = cupy.asarray(rng.standard_normal(5)), cupy.asarray(rng.standard_normal(5))
    checks = [
        check_op(linear.linear_forward, linear.linear_backward, [x, w, b]),
        check_op(
            lambda a: norm.layernorm_forward(a, g, beta, 1e-5),
            lambda d, c: norm.layernorm_backward(d, c)[0],
            [x],
        ),
        check_op(activation.softmax_forward, activation.softmax_backward, [x]),
        check_op(lambda a: activation.gelu_forward(a, "none"), activation.gelu_backward, [x]),
    ]
    for errors in checks:
        assert max(errors.values()) <= 1e-6, errors
