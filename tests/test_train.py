"""The training loop: it learns, logs what it promises, and resumes bit for bit."""

import json

import numpy as np
import pytest

from minimoe import checkpoint, data
from minimoe.checkpoint import CheckpointError
from minimoe.data import DataError
from minimoe.train import TrainOptions, train

TINY = dict(preset="mixtral", n_layer=2, n_embd=32, n_head=2, n_experts=4, top_k=2, block_size=32,
            batch_size=8, lr=1e-2, warmup_iters=5, eval_iters=4, sample_tokens=0)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tasks.txt"
    path.write_text(data.synthetic_corpus(2000, seed=0), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train(dict(TINY, data=corpus, out=str(out), max_iters=120, eval_interval=60, log_interval=10),
                    quiet=True)  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, records, out


def test_loss_falls_well_below_unigram(run):
    summary, _, _ = run
    assert summary["iterations"] == 120 and not summary["interrupted"]
    # the unigram entropy is the best loss without context; the model must use its context
    assert summary["val_loss"] < summary["unigram_loss"] - 1.0
    assert summary["train_loss"] < summary["unigram_loss"] - 1.0


def test_metrics_jsonl(run):
    summary, records, out = run
    assert [r["step"] for r in records] == list(range(10, 121, 10))
    for r in records:
        for key in ("train_loss", "train_loss_avg", "lr", "tokens_per_s", "elapsed_s", "tokens"):
            assert np.isfinite(r[key]), key
        assert r["tokens"] == r["step"] * 8 * 32
        assert ("val_loss" in r) == (r["step"] in (60, 120))
        assert len(r["moe"]) == 2  # both blocks are MoE
        for layer in r["moe"]:
            assert len(layer["load"]) == 4 and abs(sum(layer["load"]) - 1) < 1e-4
            assert layer["dropped_fraction"] == 0.0  # dropless
            assert 0 < layer["router_entropy"] <= np.log(4) + 1e-6
            assert layer["aux_loss"] > 0 and layer["z_loss"] >= 0
    # warmup then cosine: lr rises to the peak, then falls to min_lr = lr / 10 at the end
    assert records[0]["lr"] == pytest.approx(1e-2, rel=1e-2) and records[-1]["lr"] == pytest.approx(
        1e-3, rel=1e-2
    )
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(records, records[1:]))
    assert records[-1]["val_loss"] == summary["val_loss"]
    assert checkpoint.load_checkpoint(out).train_state["iteration"] == 120


def _interrupt_at(step, exc):
    def callback(it, model):
        if it == step:
            raise exc

    return callback


@pytest.mark.parametrize(
    "preset,stop,exc",
    [
        ("mixtral", 7, KeyboardInterrupt),  # Ctrl-C: a checkpoint is written at step 7
        ("deepseek", 13, RuntimeError),  # a crash: the step-10 checkpoint is all there is
    ],
)
def test_resume_reproduces_an_uninterrupted_run_exactly(corpus, tmp_path, preset, stop, exc):
    # dropout uses model.rng and the deepseek router its bias buffers: both must be restored
    opts = dict(TINY, preset=preset, data=corpus, max_iters=20, eval_interval=10, log_interval=1, dropout=0.1)
    if preset == "deepseek":
        opts.update(n_experts=6, top_k=2)
    straight = train(dict(opts, out=str(tmp_path / "a")), quiet=True)

    b = str(tmp_path / "b")
    if exc is KeyboardInterrupt:
        first = train(dict(opts, out=b), quiet=True, callback=_interrupt_at(stop, exc()))
        assert first["interrupted"] and first["iterations"] == stop
    else:
        with pytest.raises(RuntimeError):
            train(dict(opts, out=b), quiet=True, callback=_interrupt_at(stop, exc()))
    resumed = train(dict(out=b, resume=True), quiet=True)
    assert resumed["iterations"] == 20 and resumed["session_iters"] == 20 - (stop if stop < 10 else 10)

    def losses(d):
        recs = [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"], r.get("val_loss")) for r in recs]

    assert losses("a") == losses("b")  # bitwise: floats compared with ==
    assert len(losses("b")) == 20
    ca, cb = checkpoint.load_checkpoint(tmp_path / "a"), checkpoint.load_checkpoint(tmp_path / "b")
    for k in ca.params:
        np.testing.assert_array_equal(ca.params[k], cb.params[k])
    for k in ca.buffers:
        np.testing.assert_array_equal(ca.buffers[k], cb.buffers[k])
    assert straight["val_loss"] == resumed["val_loss"]


def test_resume_keeps_the_model_and_needs_a_checkpoint(run, tmp_path):
    _, _, out = run
    with pytest.raises(ValueError, match="--n-layer 3 differs from the checkpoint's 2"):
        train(dict(out=str(out), resume=True, n_layer=3), quiet=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(dict(out=str(tmp_path / "empty"), resume=True), quiet=True)
    # already at max_iters: nothing to do, nothing changes
    s = train(dict(out=str(out), resume=True, sample_tokens=0), quiet=True)
    assert s["iterations"] == 120 and s["session_iters"] == 0


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(top_k=5), ValueError, "top_k"),
        (dict(batch_size=0), ValueError, "--batch-size"),
        (dict(preset="nope"), ValueError, "valid presets"),
        (dict(preset="mixtral-8x7b"), ValueError, "counting only"),
        (dict(block_size=4000), DataError, "too few"),
        (dict(lr=-1.0), ValueError, "--lr"),
    ],
)
def test_bad_options(corpus, tmp_path, kw, err, match):
    with pytest.raises(err, match=match):
        train(dict(TINY, data=corpus, out=str(tmp_path), max_iters=2, **kw), quiet=True)


def test_options_object_and_unknown_option(corpus, tmp_path):
    o = TrainOptions(**dict(TINY, data=corpus, out=str(tmp_path), max_iters=3, eval_interval=3))
    assert train(o, quiet=True)["iterations"] == 3
    with pytest.raises(ValueError, match="unknown training option"):
        train(dict(max_itres=3), quiet=True)
