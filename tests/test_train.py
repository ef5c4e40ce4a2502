"""The training loop: it learns, logs what it promises, and resumes bit for bit; its progress
display and its deferred Ctrl-C."""

import io
import json
import signal
import sys

import numpy as np
import pytest
from conftest import DEVICE, not_on_real_cupy

from minimoe import checkpoint, data
from minimoe.checkpoint import CheckpointError
from minimoe.data import DataError
from minimoe.errors import OptionError
from minimoe.progress import Progress, format_duration
from minimoe.run import VAL_FRACTION, load_data
from minimoe.signals import StopRequest
from minimoe.train import TrainOptions, train

TINY = dict(preset="mixtral", n_layer=2, n_embd=32, n_head=2, n_experts=4, top_k=2, block_size=32,
            batch_size=8, lr=1e-2, warmup_iters=5, eval_iters=4, sample_tokens=0, device=DEVICE)  # fmt: skip


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


@not_on_real_cupy(
    "CuPy's generator state cannot be saved (dropout is reseeded on resume) and its atomic adds sum in any order"
)
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
        np.testing.assert_array_equal(ca.params[k], cb.params[k])  # checkpoints hold host arrays
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
        (dict(top_k=5), OptionError, "--top-k = 5 is invalid"),
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


def test_an_explicit_option_wins_over_the_checkpoint_even_at_its_default(corpus, tmp_path):
    # lr = 1e-3 is also the default: it was once taken for "not given", and the checkpoint's
    # 1e-2 silently kept
    out = str(tmp_path)
    train(dict(TINY, data=corpus, out=out, max_iters=4, eval_interval=4, log_interval=1), quiet=True)
    resumed = TrainOptions(out=out, resume=True, lr=1e-3, max_iters=6, eval_interval=6, log_interval=1)
    assert train(resumed, quiet=True)["iterations"] == 6
    saved = checkpoint.load_checkpoint(out).train_state["options"]
    assert saved["lr"] == 1e-3 and saved["warmup_iters"] == TINY["warmup_iters"]  # the rest: the checkpoint's
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[3]["lr"] > 1e-3  # steps 1-4 ran at the checkpoint's peak 1e-2
    assert all(r["lr"] <= 1e-3 for r in records[4:])  # steps 5-6 at the lr given now


def test_load_data_returns_the_tokenizer_and_both_splits(corpus):
    tokenizer, train_ids, val_ids = load_data(TrainOptions(data=corpus, tokenizer="char"), block_size=32)
    text = data.load_corpus(corpus)
    assert tokenizer.decode(np.concatenate([train_ids, val_ids]).tolist()) == text
    assert len(val_ids) == round(len(text) * VAL_FRACTION)  # char tokens: one per character
    with pytest.raises(DataError, match="too few for --block-size"):
        load_data(TrainOptions(data=corpus, tokenizer="char"), block_size=len(text))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_in_a_log_file_prints_one_line_per_record():
    log = io.StringIO()
    p = Progress(total=20, initial=0, stream=log)
    for it in range(1, 11):
        p.update(it)
    p.log({"step": 10, "train_loss_avg": 1.23456, "tokens_per_s": 4500.0})
    p.write("step 10: saved")
    p.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("step 10/20 | loss 1.2346 | 4.5k tok/s | ETA ") and lines[1:] == [
        "step 10: saved"
    ]
    assert "\r" not in log.getvalue()
    quiet = io.StringIO()
    p = Progress(total=20, initial=0, stream=quiet, enabled=False)
    p.update(1), p.log({"step": 1, "train_loss_avg": 1.0, "tokens_per_s": 1.0}), p.write("x"), p.close()
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_without_tqdm_rewrites_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` now fails
    tty = _Terminal()
    p = Progress(total=20, initial=5, stream=tty)
    assert p.bar is None
    p.update(6)
    p.write("step 6: saved")
    p.close()
    text = tty.getvalue()
    assert text.startswith("\rstep 6/20 | ETA ") and "\rstep 6: saved\n" in text and text.endswith("\n")
    assert format_duration(75) == "1m15s" and format_duration(3725) == "1h02m"


def test_first_signal_is_a_request_and_the_second_acts():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: noted, nothing raised
        assert stop.requested and stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the second: at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 exists on POSIX systems only")
def test_stop_request_takes_other_signals_the_same_way():
    before = signal.getsignal(signal.SIGUSR1)
    with StopRequest(signals=(signal.SIGINT, signal.SIGUSR1)) as stop:
        signal.raise_signal(signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
        assert signal.getsignal(signal.SIGINT) == stop._handler  # SIGINT still deferred
    assert signal.getsignal(signal.SIGUSR1) is before
