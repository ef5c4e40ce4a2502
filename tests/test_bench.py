"""`minimoe bench` and the PyTorch twin it compares against.

The speed comparison is only meaningful if the PyTorch model does the same work, so most tests
here check that minimoe/bench/torch_twin.py, loaded with a minimoe model's weights, gives the
same logits, loss, gradients and AdamW update (tightly in float64, within round-off in float32).
No timing is asserted anywhere: speed is reported by the benchmark, never enforced.
"""

import json

import numpy as np
import pytest
from conftest import asarray, tiny_config, to_numpy

from minimoe import GPT, AdamW, bench

TORCH_REASON = "PyTorch is optional; the comparison with the torch twin needs it"

CONFIGS = {
    "llama-dense": dict(flavour="llama"),
    "llama-gqa": dict(flavour="llama", n_kv_head=2),
    "gpt2": dict(flavour="gpt2"),
    "gpt2-gelu-exact": dict(flavour="gpt2", activation="gelu_exact"),
    "mixtral": dict(flavour="llama", n_experts=4, top_k=2, expert_hidden=6, z_loss_coef=0.01),
    "switch-no-renorm": dict(flavour="llama", n_experts=4, top_k=1, expert_hidden=6, renormalize=False),
    "deepseek": dict(
        flavour="llama",
        n_experts=6,
        top_k=2,
        expert_hidden=4,
        n_shared_experts=1,
        router="sigmoid_bias",
        aux_loss_coef=0.0,
        first_dense=1,
    ),
    "gpt2-moe-every-2": dict(flavour="gpt2", n_experts=4, top_k=2, expert_hidden=6, moe_every=2),
}


def _both(name, dtype, seed=0):
    """A minimoe GPT and its PyTorch twin with the same weights, and a batch (B=3, T=8)."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    config = tiny_config(**CONFIGS[name])
    model = GPT(config, seed=seed, dtype=dtype)
    if config.router == "sigmoid_bias":  # non-zero selection biases, so that they are copied too
        for k in model.buffers:
            model.buffers[k][...] = asarray(np.linspace(-0.3, 0.3, config.n_experts))
    ref = bench.load_twin().TorchGPT.from_minimoe(model)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, (3, config.block_size))
    targets = rng.integers(0, config.vocab_size, (3, config.block_size))
    targets[0, :2] = -1  # ignored positions count in neither loss
    return torch, model, ref, idx, targets


def _rel(a, b):
    a, b = to_numpy(a), to_numpy(b)  # torch's side is on the host, minimoe's on the backend
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-4)])
def test_reference_computes_the_same_logits_loss_and_gradients(name, dtype, tol):
    torch, model, ref, idx, targets = _both(name, dtype)
    logits, loss = model.forward(idx, targets)
    model.backward()
    t_logits, t_loss = ref(torch.from_numpy(idx), torch.from_numpy(targets))
    t_loss.backward()
    assert t_logits.dtype == getattr(torch, dtype)
    assert _rel(t_logits.detach().numpy(), logits) <= tol
    assert abs(t_loss.item() - float(loss)) <= tol * abs(float(loss))
    t_grads = ref.grads_as_minimoe()
    assert set(t_grads) == set(model.grads)
    errors = {k: _rel(t_grads[k], g) for k, g in model.grads.items() if float(abs(g).max()) > 0}
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("name", ["mixtral", "llama-gqa"])
def test_reference_optimizer_makes_the_same_update(name):
    # same AdamW hyperparameters and the same decay groups (no decay on norms, biases, embeddings).
    # (Not gpt2: its key bias has an exactly-zero true gradient, and Adam scales the round-off
    # there up to a visible step, differently in each library.)
    torch, model, ref, idx, targets = _both(name, "float64")
    opt, t_opt = AdamW(model.params, lr=0.1), ref.make_optimizer(lr=0.1)
    for _ in range(2):
        model.forward(idx, targets)
        opt.step(model.backward())
        _, t_loss = ref(torch.from_numpy(idx), torch.from_numpy(targets))
        t_loss.backward()
        t_opt.step()
        t_opt.zero_grad(set_to_none=True)
    after = bench.load_twin().TorchGPT.from_minimoe(model)  # minimoe's new weights, torch layout
    for (name_a, a), (_, b) in zip(ref.named_parameters(), after.named_parameters()):
        assert _rel(a.detach().numpy(), b.detach().numpy()) <= 1e-10, name_a


def test_reference_a_wrong_weight_is_noticed():
    # the comparison above could pass vacuously if weights were never copied: perturb one
    torch, model, ref, idx, targets = _both("mixtral", "float64")
    with torch.no_grad():
        ref.blocks[1].moe.experts[2].w3.weight[0, 0] += 0.1
    logits, _ = model.forward(idx, targets)
    t_logits, _ = ref(torch.from_numpy(idx), torch.from_numpy(targets))
    assert _rel(t_logits.detach().numpy(), logits) > 1e-6


@pytest.mark.parametrize(
    "overrides,word",
    [
        (dict(n_experts=4, router="noisy"), "noisy"),
        (dict(n_experts=4, capacity_factor=1.0), "capacity"),
        (dict(dropout=0.1), "dropout"),
    ],
)
def test_reference_refuses_what_it_does_not_implement(overrides, word):
    pytest.importorskip("torch", reason=TORCH_REASON)
    with pytest.raises(ValueError, match=word):
        bench.load_twin().TorchGPT(tiny_config("llama", **overrides))


# ------------------------------------------------------------------------------------ the command
TINY = [
    "--preset",
    "mixtral",
    "--n-layer",
    "1",
    "--n-embd",
    "16",
    "--n-head",
    "2",
    "--block-size",
    "8",
    "--batch-size",
    "2",
    "--iters",
    "2",
    "--warmup",
    "1",
    "--threads",
    "1",
]


def test_bench_prints_a_table(capsys):
    assert bench.main(TINY + ["--no-memory"]) == 0
    out = capsys.readouterr().out
    for row in ("forward ms", "backward ms", "optimizer ms", "step ms", "tokens/s", "MFU %", "matmul peak"):
        assert row in out
    assert "torch" not in out.split("\n\n")[1]  # no torch column unless asked


def test_bench_json_side_by_side_with_torch(capsys):
    pytest.importorskip("torch", reason=TORCH_REASON)
    assert bench.main(TINY + ["--vs-torch", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens_per_step"] == 16 and r["threads"] == 1 and r["torch_threads"] == 1
    assert (
        r["flops_per_step"]
        == 16
        * bench.count_params(bench.make_config("mixtral", n_layer=1, n_embd=16, n_head=2, block_size=8))[
            "train_flops_per_token"
        ]
    )
    for name in ("minimoe", "torch"):
        res = r[name]
        assert len(res["step_times_ms"]) == 2
        assert res["step_ms"] > 0 and res["mfu"] > 0 and res["rss_mb"] > 0
        steps = res["forward_ms"], res["backward_ms"], res["optimizer_ms"]
        assert min(steps) > 0 and res["step_ms"] >= max(steps)
    assert r["minimoe"]["traced_mb"] > 0 and r["torch"]["traced_mb"] is None
    assert r["ratio"]["step_ms"] == pytest.approx(r["minimoe"]["step_ms"] / r["torch"]["step_ms"])


def test_peak_memory_grows_with_the_batch():
    config = bench.make_config("dense", n_layer=1, n_embd=32, n_head=2, block_size=64)
    small = bench.peak_memory("minimoe", config, 2, "float32", 1, steps=2)
    big = bench.peak_memory("minimoe", config, 64, "float32", 1, steps=2)
    assert 0 < small["traced_mb"] < big["traced_mb"]
    assert big["rss_mb"] > small["rss_mb"]


@pytest.mark.parametrize(
    "args,word",
    [
        (["--preset", "nope"], "preset"),
        (["--preset", "gpt3-175b"], "toy preset"),
        (["--iters", "0"], "--iters"),
        (["--top-k", "9"], "top_k"),
        (["--dtype", "float16"], "--dtype"),
        (["--warmup", "-1"], "--warmup"),
        (["--batch-size", "two"], "--batch-size"),
        (["--n-layer", "0"], "--n-layer"),
    ],
)
def test_bench_user_errors_are_one_line(capsys, args, word):
    assert bench.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and word in err[0]


def test_vs_torch_without_torch_is_a_clear_error(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
    assert bench.main(TINY + ["--vs-torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PyTorch" in err[0] and "pip install 'minimoe[compare]'" in err[0]


def test_bench_imports_neither_torch_nor_the_twin_unless_asked():
    # a learner without torch can run `minimoe bench`: the twin is imported only for --vs-torch
    import subprocess
    import sys

    code = (
        "import sys, minimoe.bench; print('torch' in sys.modules, 'minimoe.bench.torch_twin' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _config_of(capsys, argv):
    assert bench.main(TINY + ["--iters", "1", "--warmup", "0", "--no-memory", "--json"] + argv) == 0
    return json.loads(capsys.readouterr().out)["config"]


def test_n_head_keeps_the_presets_key_value_heads(monkeypatch, capsys):
    # a GQA preset given --n-head stays GQA: --n-head used to reset n_kv_head to n_head
    from minimoe.presets import PRESETS

    monkeypatch.setitem(PRESETS, "mixtral", dict(PRESETS["mixtral"], n_head=4, n_kv_head=2))
    c = _config_of(capsys, ["--n-head", "4"])
    assert (c["n_head"], c["n_kv_head"]) == (4, 2)
    c = _config_of(capsys, ["--n-head", "4", "--n-kv-head", "1"])  # asked for: MQA
    assert (c["n_head"], c["n_kv_head"]) == (4, 1)
    assert bench.main(TINY + ["--n-kv-head", "3"]) == 2  # 3 does not divide 2 query heads
    assert "n_kv_head" in capsys.readouterr().err


def test_n_head_alone_on_an_mha_preset_stays_mha(capsys):
    c = _config_of(capsys, ["--n-head", "2"])
    assert (c["n_head"], c["n_kv_head"]) == (2, 2)


def test_blas_threads_can_be_read_and_set():
    before = bench.blas_threads()
    if before is None:
        pytest.skip("this NumPy's BLAS thread count cannot be told (not OpenBLAS, no threadpoolctl)")
    try:
        assert bench.blas_threads(1) == 1
    finally:
        bench.blas_threads(before)
