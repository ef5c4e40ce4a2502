"""Nothing a user made is lost (issue 16): one run per directory, divergence caught, SIGTERM
saves, metrics stay with their checkpoint, no temporary file outlives its run, and every file
minimoe reads from a user ends, when crafted or broken, in exit status 2 and one `error:` line
with nothing in --out changed. The crafted inputs are GENERATED (seeded), not a fixed list.

Each finding of the issue has a test here that fails on the code before the fix:
  1 two runs on one --out          test_a_second_run_on_the_same_directory_is_refused (+ stale locks)
  2 divergence never caught        test_divergence_stops_with_status_3_and_keeps_the_checkpoint,
                                   test_a_loss_far_above_chance_is_warned_about
  3 SIGTERM saves nothing          test_sigterm_saves_and_exits_143
  4 a crashed fresh run empties metrics.jsonl   test_a_crashed_new_run_keeps_the_old_metrics
  5 temp files of killed saves     test_kill_9_during_a_save_leaves_temp_files_the_next_run_removes
  6 tracebacks for crafted files, sizes, /dev/zero, NUL data   the fuzz tests and test_absurd_sizes...
  7 wrong checkpoints resumed      test_crafted_checkpoint (NaN, complex, rng, another preset ...)
  8 averages after a resume        test_resumed_averages_equal_the_uninterrupted_run
  9 quadratic streaming decode     test_stream_decoder_is_linear_and_exact
 10 pickles called "not a .npz"    test_pickled_arrays_are_reported_as_pickles
"""

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minimoe import checkpoint, cli, data, hf
from minimoe.config import Config
from minimoe.errors import UserError
from minimoe.model import GPT
from minimoe.sample import StreamDecoder
from minimoe.tokenizer import BPETokenizer, CharTokenizer
from minimoe.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(preset="mixtral", n_layer=1, n_embd=16, n_head=2, n_experts=4, top_k=2, block_size=16,
            batch_size=4, lr=1e-2, warmup_iters=2, eval_iters=2, sample_tokens=0)  # fmt: skip
TINY_ARGS = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
POSIX = pytest.mark.skipif(os.name != "posix", reason="signals and kill -9 as on POSIX systems")


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tasks.txt"
    path.write_text(data.synthetic_corpus(600, seed=0), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A finished 6-step run directory (ckpt.npz + metrics.jsonl) to copy and craft from."""
    out = tmp_path_factory.mktemp("base")
    train(dict(TINY, data=corpus, out=str(out), max_iters=6, eval_interval=3, log_interval=2), quiet=True)
    return out


def copy_run(base, tmp_path, name="run") -> Path:
    out = tmp_path / name
    shutil.copytree(base, out)
    return out


def snapshot(directory) -> dict:
    """{relative path: bytes} of every file under directory (the directory itself may be absent)."""
    d = Path(directory)
    return (
        {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
        if d.exists()
        else {}
    )


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc, err, label=""):
    lines = err.strip().splitlines()
    assert rc == 2, f"{label}: exit {rc}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}: {err!r}"
    assert "Traceback" not in err


def popen_train(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "minimoe", "train", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip


def wait_for(proc, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the run ended before printing {prefix!r}: {proc.stderr.read()}")


def read_arrays(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write_arrays(path, arrays, pickle=False):
    with open(path, "wb") as f:
        if pickle:  # np.savez pickles object arrays
            np.savez(f, **arrays)
        else:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def leftovers(out) -> list:
    """The temporary files of saves in a run directory (.ckpt.npz.<random>.tmp and the like)."""
    return sorted(Path(out).glob(".*.tmp"))


def text(obj) -> np.ndarray:
    return np.array(json.dumps(obj))


# --------------------------------------------------------------------- 1: one run per directory
@POSIX
def test_a_second_run_on_the_same_directory_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "shared"
    first = popen_train("--data", corpus, "--out", out, "--max-iters", 100000, "--log-interval", 1,
                        "--eval-interval", 4, *TINY_ARGS)  # fmt: skip
    try:
        wait_for(first, "step 2/")  # the first run owns the directory now
        rc, _, err = run_cli(capsys, "train", "--data", corpus, "--out", out, "--max-iters", 3, *TINY_ARGS)
        assert_one_error_line(rc, err, "second run")
        assert f"pid {first.pid}" in err and "in use by another run" in err
        wait_for(first, "step 8: ")  # the first run goes on and saves undisturbed
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    finally:
        first.kill()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run's records, in order
    assert checkpoint.load_checkpoint(out).train_state["iteration"] == steps[-1]
    assert not (out / "run.lock").exists()


def test_a_stale_lock_is_taken_over_and_a_foreign_one_is_not(corpus, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is gone now
    out = tmp_path / "stale"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    buf = io.StringIO()
    summary = train(dict(TINY, data=corpus, out=str(out), max_iters=2), stream=buf)
    assert summary["iterations"] == 2
    assert (
        f"took over the lock {str(out / 'run.lock')!r}" in buf.getvalue()
        and f"pid {dead.pid}" in buf.getvalue()
    )
    assert not (out / "run.lock").exists()
    # a lock written on another host may belong to a live run: refused, with what to do
    (out / "run.lock").write_text(json.dumps({"pid": 1, "host": "another-machine.example"}))
    before = snapshot(out)
    rc, _, err = run_cli(capsys, "train", "--data", corpus, "--out", out, "--max-iters", 3, *TINY_ARGS)
    assert_one_error_line(rc, err, "foreign lock")
    assert "another-machine.example" in err and "delete" in err
    assert snapshot(out) == before


# ---------------------------------------------------------------------------- 2: divergence
def test_divergence_stops_with_status_3_and_keeps_the_checkpoint(base, tmp_path, capsys):
    out = copy_run(base, tmp_path)
    before = snapshot(out)
    rc, text_out, err = run_cli(capsys, "train", "--out", out, "--resume", "--max-iters", 40, "--lr", "1e30")
    assert rc == 3, err
    assert err == ""  # no traceback, no floating-point warnings
    stopped = [line for line in text_out.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and "3 steps in a row" in stopped[0] and "step-6 checkpoint" in stopped[0]
    after = snapshot(out)
    assert after["ckpt.npz"] == before["ckpt.npz"]  # the good checkpoint was not replaced
    ck = checkpoint.load_checkpoint(out)  # and what is there is finite
    assert all(np.isfinite(a).all() for a in ck.params.values())
    # a save of non-finite weights is refused at the lowest level too
    model, tok, _ = checkpoint.load_model(out)
    model.params["wte"][0, 0] = np.nan
    with pytest.raises(checkpoint.NonFiniteError, match="'param/wte' holds NaN"):
        checkpoint.save_checkpoint(out, model, tokenizer=tok)
    assert snapshot(out) == after


def test_a_loss_far_above_chance_is_warned_about(corpus, tmp_path):
    buf = io.StringIO()
    train(
        dict(TINY, data=corpus, out=str(tmp_path / "hot"), max_iters=8, log_interval=2, lr=10.0), stream=buf
    )
    warnings = [line for line in buf.getvalue().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "uniform guess" in warnings[0] and "lower --lr" in warnings[0]
    calm = io.StringIO()
    train(dict(TINY, data=corpus, out=str(tmp_path / "calm"), max_iters=8, log_interval=2), stream=calm)
    assert "warning:" not in calm.getvalue()


def test_keep_best_keeps_the_file_info_names(corpus, tmp_path, capsys):
    out = tmp_path / "best"
    train(dict(TINY, data=corpus, out=str(out), max_iters=6, eval_interval=2, keep_best=True), quiet=True)
    ts = checkpoint.load_checkpoint(out).train_state
    best = checkpoint.load_checkpoint(out / "best.npz").train_state
    assert (best["iteration"], best["last_val_loss"]) == (ts["best_step"], ts["best_val_loss"])
    rc, text, _ = run_cli(capsys, "info", "--ckpt", out)
    assert rc == 0 and f"(step {ts['best_step']}, kept in {out / 'best.npz'})" in text
    # a new run without --keep-best: info does not point at the old run's best.npz
    train(dict(TINY, data=corpus, out=str(out), max_iters=4, eval_interval=2, seed=1), quiet=True)
    rc, text, _ = run_cli(capsys, "info", "--ckpt", out)
    assert rc == 0 and "weights not kept: --keep-best keeps them" in text


def test_the_divergence_check_costs_one_host_copy_per_step_on_a_gpu():
    """On (a numpy-backed fake) CuPy: the check adds exactly one device -> host copy to a step, and
    a non-finite step leaves the parameters and AdamW's step count untouched."""
    fake_cupy = pytest.importorskip("fake_cupy", reason="tests/fake_cupy.py stands in for CuPy")
    from minimoe import backend, guards
    from minimoe.optim import AdamW
    from minimoe.train import train_step

    name, dtype = backend.get_backend(), backend.get_default_dtype()
    try:
        with fake_cupy.installed():
            backend.set_backend("cupy")
            model = GPT(
                Config(flavour="llama", vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0
            )
            opt, guard = AdamW(model.params, lr=1e-3), guards.DivergenceGuard(3, 13)
            x = np.random.default_rng(0).integers(0, 13, (2, 8))
            counts = []
            for g in (None, guard, None, guard):  # the first two warm up scratch buffers
                fake_cupy.transfers.clear()
                train_step(model, opt, x, x, 1e-3, 1.0, g)
                counts.append(sum(fake_cupy.transfers.values()))
            assert counts[3] == counts[2] + 1
            before = {k: backend.to_numpy(v).copy() for k, v in model.params.items()}
            t = opt.t
            model.params["wte"][0, 0] = float("nan")  # a poisoned weight: loss and gradients go NaN
            assert train_step(model, opt, x, x, 1e-3, 1.0, guard) is None and opt.t == t
            after = {k: backend.to_numpy(v) for k, v in model.params.items()}
            assert all(np.array_equal(before[k], after[k]) for k in before if k != "wte")
    finally:
        backend.set_backend(name)
        backend.set_default_dtype(dtype)


# --------------------------------------------------------------------------------- 3: SIGTERM
@POSIX
def test_sigterm_saves_and_exits_143(corpus, tmp_path):
    out = tmp_path / "term"
    proc = popen_train("--data", corpus, "--out", out, "--max-iters", 100000, "--log-interval", 1,
                       "--eval-interval", 100000, *TINY_ARGS)  # fmt: skip
    try:
        wait_for(proc, "step 3/")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    ends = [line for line in stdout.splitlines() if line.startswith("terminated by SIGTERM at step")]
    assert len(ends) == 1 and "checkpoint saved" in ends[0]
    step = checkpoint.load_checkpoint(out).train_state["iteration"]
    assert step >= 3 and f"at step {step}:" in ends[0]
    assert not (out / "run.lock").exists()


# ------------------------------------------------------------------- 4: metrics with their run
def test_a_crashed_new_run_keeps_the_old_metrics(base, corpus, tmp_path):
    out = copy_run(base, tmp_path)
    before = snapshot(out)

    def crash(step, model):
        if step == 2:
            raise RuntimeError("a crash before the new run's first checkpoint")

    with pytest.raises(RuntimeError):
        train(dict(TINY, data=corpus, out=str(out), max_iters=10, eval_interval=5, log_interval=1),
              quiet=True, callback=crash)  # fmt: skip
    assert snapshot(out) == before  # old checkpoint and old metrics, consistent, nothing else
    # a new run that reaches its first checkpoint replaces both, together
    train(dict(TINY, data=corpus, out=str(out), max_iters=4, eval_interval=4, log_interval=1), quiet=True)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and checkpoint.load_checkpoint(out).train_state["iteration"] == 4
    assert sorted(snapshot(out)) == ["ckpt.npz", "metrics.jsonl"]


# ---------------------------------------------------------------------- 5: kill -9 in a save
KILLED_SAVE = """
import os, sys, time
import numpy as np
from minimoe import checkpoint
from minimoe.train import train
real = np.savez
def slow_savez(f, **arrays):
    f.write(b"partial checkpoint bytes " * 1000)
    f.flush()
    print("SAVING", flush=True)
    time.sleep(120)
checkpoint.np.savez = slow_savez
train(dict(out=sys.argv[1], resume=True, max_iters=8, eval_interval=1, sample_tokens=0), quiet=True)
"""


@POSIX
def test_kill_9_during_a_save_leaves_temp_files_the_next_run_removes(base, tmp_path):
    out = copy_run(base, tmp_path)
    good = (out / "ckpt.npz").read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    seen = []
    for _ in range(2):  # killed twice in a save; each new run first removes what the last one left
        proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(out)], stdout=subprocess.PIPE, text=True,
                                env=env)  # fmt: skip
        try:
            assert proc.stdout.readline().strip() == "SAVING"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        seen.append(leftovers(out))
        assert len(seen[-1]) == 1 and seen[-1][0].name.startswith(".ckpt.npz.")
        assert (out / "ckpt.npz").read_bytes() == good and (
            out / "run.lock"
        ).exists()  # the killed run's lock
    assert seen[0] != seen[1]  # the first leftover is gone
    buf = io.StringIO()
    summary = train(dict(out=str(out), resume=True, max_iters=8, eval_interval=100), stream=buf)
    assert "removed 1 temporary file(s)" in buf.getvalue() and "took over the lock" in buf.getvalue()
    assert summary["iterations"] == 8
    assert sorted(snapshot(out)) == ["ckpt.npz", "metrics.jsonl"]
    # a leftover that appears during a run is removed after its next successful save
    junk = out / ".ckpt.npz.abc123.tmp"

    def leave_junk(step, model):
        if step == 9:
            junk.write_bytes(b"left by someone")

    train(dict(out=str(out), resume=True, max_iters=10, eval_interval=100), quiet=True, callback=leave_junk)
    assert not junk.exists()


# -------------------------------------------------------------------- 8: averages after resume
def test_resumed_averages_equal_the_uninterrupted_run(corpus, tmp_path):
    opts = dict(TINY, data=corpus, max_iters=10, eval_interval=10, log_interval=5, dropout=0.1)
    train(dict(opts, out=str(tmp_path / "a")), quiet=True)

    def ctrl_c_at_7(step, model):
        if step == 7:  # not a log boundary: steps 6 and 7 are not yet in any record
            raise KeyboardInterrupt

    first = train(dict(opts, out=str(tmp_path / "b")), quiet=True, callback=ctrl_c_at_7)
    assert first["interrupted"] and first["iterations"] == 7
    train(dict(out=str(tmp_path / "b"), resume=True), quiet=True)

    def records(d):
        return [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    a, b = records("a"), records("b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [5, 10]
    for key in ("train_loss", "train_loss_avg", "val_loss"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key  # floats compared exactly
    ta = checkpoint.load_checkpoint(tmp_path / "a").train_state
    tb = checkpoint.load_checkpoint(tmp_path / "b").train_state
    assert ta["last_train_loss"] == tb["last_train_loss"]


# ------------------------------------------------------------------------ 9: streaming decode
class CountingTokenizer:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids):
        ids = list(ids)
        self.decoded += len(ids)
        return self.tok.decode(ids)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_stream_decoder_is_linear_and_exact(kind):
    rng = np.random.default_rng(0)
    if kind == "char":
        tok = CharTokenizer(list("abcdefgh \n"))
    else:  # byte-level: multi-byte characters arrive split over several tokens
        tok = BPETokenizer.train("héllo wörld ünïcode — ok " * 30, 280)
    n = 4000
    ids = [int(i) for i in rng.integers(0, tok.vocab_size, n)]
    counting = CountingTokenizer(tok)
    dec = StreamDecoder(counting)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert counting.decoded <= 40 * n  # a constant amount of work per token (quadratic: ~n^2 / 2)
    if kind == "char":
        assert "".join(pieces) == tok.decode(ids)
    # on text made of whole characters the pieces add up to the text, character by character
    words = tok.encode(("héllo wörld — ünïcode ok " if kind == "bpe" else "ab cd\nefgh ") * 40)
    dec = StreamDecoder(tok)
    assert "".join([dec.push(i) for i in words] + [dec.flush()]) == tok.decode(words)


# ------------------------------------------------------------------------- 10: pickled arrays
def test_pickled_arrays_are_reported_as_pickles(base, tmp_path, capsys):
    out = copy_run(base, tmp_path)
    arrays = read_arrays(out / "ckpt.npz")
    arrays["param/wte"] = np.array([{"x": 1}], dtype=object)
    write_arrays(out / "ckpt.npz", arrays, pickle=True)
    before = snapshot(out)
    for argv in (["train", "--resume", "--out", out], ["sample", "--ckpt", out], ["info", "--ckpt", out]):
        rc, _, err = run_cli(capsys, *argv)
        assert_one_error_line(rc, err, argv[0])
        assert "pickled Python objects" in err and "not a .npz archive" not in err
    assert snapshot(out) == before


# ------------------------------------------------------- 6, 7: crafted checkpoints, generated
def npy_member(shape, dtype="<f4", payload=b"\0" * 64) -> bytes:
    """The bytes of an .npy file whose header claims `shape` whatever its payload holds."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    return f.getvalue() + payload


def with_member(path, key, raw: bytes):
    """Rewrite the zip at path with member key.npy replaced by raw bytes."""
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    members[key + ".npy"] = raw
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)


def wrong_json_values(rng, n=4):
    """Generated JSON values of every kind but an object: lists, numbers, strings, booleans, null."""
    pool = [[], [1, 2], "text", 3, -1.5, True, False, None, [{"a": 1}], "{}", 10**30]
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def crafted_cases(seed=0):
    """(label, craft(run_dir)) pairs: each makes the checkpoint of run_dir wrong in one way."""
    rng = np.random.default_rng(seed)
    cases = []

    def on_arrays(label, change):
        def craft(out):
            arrays = read_arrays(out / "ckpt.npz")
            change(arrays)
            write_arrays(out / "ckpt.npz", arrays)

        cases.append((label, craft))

    def set_entry(key, value):
        return lambda a: a.__setitem__(key, value)

    def edit_json(key, edit):
        def change(a):
            obj = json.loads(str(a[key][()]))
            edit(obj)
            a[key] = text(obj)

        return change

    # JSON entries that are not objects (tokenizer may be null: then it is missing)
    for key in ("config", "tokenizer", "train_state", "rng"):
        for v in wrong_json_values(rng):
            if not (key == "tokenizer" and v is None):
                on_arrays(f"{key} = {v!r}", set_entry(key, text(v)))
        on_arrays(f"{key} not JSON", set_entry(key, np.array("{not json")))
        on_arrays(f"{key} not text", set_entry(key, np.arange(3)))
        on_arrays(f"{key} nested 100000 deep", set_entry(key, np.array("[" * 100000 + "]" * 100000)))
    # train_state fields of the wrong type or range (a few drawn from each field's list)
    wrong_state = {
        "iteration": [-7, 1.5, "3", [1], True, None, {"n": 1}],
        "best_val_loss": [-7, "nan", [1.0], True, {}],
        "last_train_loss": [-0.5, "1.0", [2.0], False],
        "elapsed_s": [-1, "a minute", [60], True],
        "options": [[1, 2], "preset=mixtral", 3, None],
        "pending_losses": ["1.5", [1.0, "x"], [-1.0], {"0": 1.0}, 2.5],
        "seed": [-7, 1.5, "0", [0]],
    }
    for field, values in wrong_state.items():
        for i in rng.choice(len(values), size=3, replace=False):
            v = values[i]
            on_arrays(
                f"train_state.{field} = {v!r}",
                edit_json("train_state", lambda o, f=field, v=v: o.update({f: v})),
            )
    for field in ("iteration", "options"):
        on_arrays(f"train_state without {field}", edit_json("train_state", lambda o, f=field: o.pop(f)))
    on_arrays(
        "saved option preset = list", edit_json("train_state", lambda o: o["options"].update(preset=[1]))
    )
    on_arrays("saved option lr = 'fast'", edit_json("train_state", lambda o: o["options"].update(lr="fast")))
    # config fields of the wrong type, or absurd sizes for weights this small
    for field, v in [("n_embd", "16"), ("n_head", 0), ("norm_eps", "tiny"), ("dropout", None), ("n_layer", 10**12),
                     ("vocab_size", 10**15), ("n_experts", 10**9), ("block_size", -1), ("top_k", [2])]:  # fmt: skip
        on_arrays(f"config.{field} = {v!r}", edit_json("config", lambda o, f=field, v=v: o.update({f: v})))
    on_arrays("config with unknown field", edit_json("config", lambda o: o.update(wings=2)))
    # generator states: garbage, unknown, missing
    garbage = [{"bit_generator": "PCG64", "state": {"state": "x", "inc": 1}}, {"bit_generator": "Nope"},
               {"bit_generator": "PCG64", "state": [1]}, 5, "PCG64", [1, 2]]  # fmt: skip
    for g in garbage:
        on_arrays(f"rng.data = {g!r}", edit_json("rng", lambda o, g=g: o.update(data=g)))
    on_arrays(
        "rng.model = garbage",
        edit_json("rng", lambda o: o.update(model={"bit_generator": "MT19937", "state": 1})),
    )
    on_arrays("rng without data", edit_json("rng", lambda o: o.pop("data")))
    # the tokenizer: unreadable, or not this model's
    on_arrays(
        "tokenizer chars are numbers",
        edit_json("tokenizer", lambda o: o.update(chars=list(range(len(o["chars"]))))),
    )
    on_arrays("tokenizer one char short", edit_json("tokenizer", lambda o: o.update(chars=o["chars"][:-1])))
    doubling = [[97, 97]] + [[256 + i, 256 + i] for i in range(int(rng.integers(40, 64)))]
    on_arrays(
        "tokenizer merges that double a token",
        set_entry("tokenizer", text({"type": "bpe", "merges": doubling})),
    )
    on_arrays(
        "tokenizer merge of a future id", set_entry("tokenizer", text({"type": "bpe", "merges": [[97, 300]]}))
    )
    on_arrays("tokenizer of another kind", edit_json("tokenizer", lambda o: o.update(type="sentencepiece")))
    # the optimizer's step count
    for t in (np.array([1, 2]), np.array(-3), np.array(2.5), np.array(True), np.array("7")):
        on_arrays(f"optim/t = {t!r}", set_entry("optim/t", t))
    on_arrays("no optim/t", lambda a: a.pop("optim/t"))

    # parameters and moments: NaN, inf, complex, integer, half, bool, wrong shapes, missing, extra
    # (which array and which entry are drawn at random; the names are read from the file itself)
    def names(a, prefix):
        return sorted(k for k in a if k.startswith(prefix))

    for prefix in ("param/", "optim/m/", "optim/v/"):
        picks = rng.integers(0, 1000, size=3)
        for i, how in zip(picks, ("nan", "inf", "complex")):

            def change(a, prefix=prefix, i=i, how=how):
                k = names(a, prefix)[i % len(names(a, prefix))]
                x = a[k].copy()
                if how == "complex":
                    a[k] = x.astype(np.complex64) + 1j
                else:
                    x.reshape(-1)[i % x.size] = np.nan if how == "nan" else np.inf
                    a[k] = x

            on_arrays(f"{prefix}[{i}] {how}", change)
    on_arrays(
        "optim/v negative",
        lambda a: a.__setitem__(names(a, "optim/v/")[0], -np.ones_like(a[names(a, "optim/v/")[0]])),
    )
    for i, dt in enumerate(("int32", "float16", "bool", "uint8")):
        on_arrays(
            f"param dtype {dt}",
            lambda a, i=i, dt=dt: a.__setitem__(names(a, "param/")[i], a[names(a, "param/")[i]].astype(dt)),
        )
    on_arrays("params of two dtypes", lambda a: a.__setitem__("param/wte", a["param/wte"].astype(np.float64)))
    for how in ("transposed", "extra axis", "one row short", "0-d"):

        def reshape(a, how=how):
            k = "param/wte"
            x = a[k]
            a[k] = {"transposed": x.T, "extra axis": x[None], "one row short": x[:-1], "0-d": x[0, 0]}[how]

        on_arrays(f"wte {how}", reshape)
    on_arrays("missing parameter", lambda a: a.pop(names(a, "param/")[-1]))
    on_arrays("extra parameter", lambda a: a.__setitem__("param/blocks.0.spare", np.zeros(3, np.float32)))
    on_arrays(
        "weights of a second block", lambda a: a.__setitem__("param/blocks.1.ln1.w", np.ones(16, np.float32))
    )
    on_arrays("format = 2", set_entry("format", np.array(2)))
    on_arrays("format of a future version", set_entry("format", np.array("minimoe-checkpoint-9")))

    # another preset's model: its config and weights, under this run's options
    def other_preset(out):
        other = out.parent / (out.name + "-other")
        train(dict(TINY, preset="gpt4-rumoured", data=str(out.parent / "corpus.txt"), out=str(other), max_iters=1),
              quiet=True)  # fmt: skip
        mine, theirs = read_arrays(out / "ckpt.npz"), read_arrays(other / "ckpt.npz")
        for k in list(mine):
            if k.startswith(("param/", "optim/", "config")):
                mine[k] = theirs[k]
        write_arrays(out / "ckpt.npz", mine)
        shutil.rmtree(other)

    cases.append(("another preset's config and weights", other_preset))
    on_arrays("another width's config and weights", edit_json("config", lambda o: o.update(n_embd=24)))

    # bytes: a header claiming 10^12 elements, truncations, flipped bits, noise, emptiness
    def huge_header(out):
        with_member(out / "ckpt.npz", "param/wte", npy_member((10**12,)))

    cases.append(("npy header claiming 10^12 elements", huge_header))

    def object_header(out):
        with_member(out / "ckpt.npz", "param/wte", npy_member((2,), dtype="|O"))

    cases.append(("npy header of dtype object", object_header))
    for frac in rng.uniform(0.0, 1.0, size=6):

        def truncate(out, frac=frac):
            raw = (out / "ckpt.npz").read_bytes()
            (out / "ckpt.npz").write_bytes(raw[: int(len(raw) * frac)])

        cases.append((f"truncated to {frac:.3f}", truncate))
    for pos in rng.uniform(0.0, 1.0, size=12):

        def flip(out, pos=pos):
            raw = bytearray((out / "ckpt.npz").read_bytes())
            i = int(len(raw) * pos)
            raw[i] ^= 0xFF
            (out / "ckpt.npz").write_bytes(bytes(raw))

        cases.append((f"byte at {pos:.3f} flipped", flip))
    cases.append(("random bytes", lambda out: (out / "ckpt.npz").write_bytes(rng.bytes(5000))))
    cases.append(("empty file", lambda out: (out / "ckpt.npz").write_bytes(b"")))
    cases.append(("an unrelated npz", lambda out: np.savez(out / "ckpt.npz", a=np.zeros(3))))
    return cases


CASES = crafted_cases()


@pytest.mark.parametrize("label,craft", CASES, ids=[label for label, _ in CASES])
def test_crafted_checkpoint(base, corpus, tmp_path, capsys, label, craft):
    out = copy_run(base, tmp_path)
    shutil.copy(corpus, tmp_path / "corpus.txt")
    craft(out)
    before = snapshot(out)
    rc, _, err = run_cli(capsys, "train", "--resume", "--out", out, "--max-iters", 8)
    assert_one_error_line(rc, err, label)
    assert snapshot(out) == before, f"{label}: --out changed"
    # reading it for sampling or inspection: refused in one line, or (when only resuming needs
    # what is broken, e.g. the data generator's state) it works
    for argv in (["sample", "--ckpt", out, "--max-new-tokens", 2], ["info", "--ckpt", out]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 0 or (rc == 2 and len(err.strip().splitlines()) == 1), f"{label} ({argv[0]}): {err}"
    assert snapshot(out) == before


def test_the_fuzz_inputs_differ_and_are_many():
    labels = [label for label, _ in CASES]
    assert len(labels) == len(set(labels)) and len(labels) >= 100
    assert [label for label, _ in crafted_cases(seed=1)] != labels  # generated, not a fixed list


# -------------------------------------------------------------- 6: crafted --hf folders, generated
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(
        GPT(Config(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0), str(folder)
    )
    return folder


def _set_header(folder, edit):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    new = edit(header)
    blob = new if isinstance(new, bytes) else json.dumps(new).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def hf_cases(seed=0):
    """(label, craft(folder)) pairs, each breaking a saved tiny GPT-2 folder in one way."""
    rng = np.random.default_rng(seed)
    cases = []

    def header(label, edit):
        cases.append((label, lambda folder: _set_header(folder, edit)))

    def entry(label, edit):
        def change(h):
            name = sorted(k for k in h if k != "__metadata__")[0]
            h[name] = edit(h[name])
            return h

        header(label, change)

    def config(label, edit):
        def craft(folder):
            cfg = json.loads((folder / "config.json").read_text())
            new = edit(cfg)
            (folder / "config.json").write_text(new if isinstance(new, str) else json.dumps(new))

        cases.append((label, craft))

    for v in wrong_json_values(rng, 5):
        header(f"header = {v!r}", lambda h, v=v: v)
        entry(f"entry = {v!r}", lambda e, v=v: v)
        config(f"config.json = {v!r}", lambda c, v=v: v)
    for shape in (5, "5", [-1, 8], [2.0, 8], [True, 8], [[8]], [10**12, 10**12], None):
        entry(f"shape = {shape!r}", lambda e, s=shape: dict(e, shape=s))
    for dt in ("F8", 4, None, ["F32"]):
        entry(f"dtype = {dt!r}", lambda e, d=dt: dict(e, dtype=d))
    for offsets in ([8, 0], [-8, 0], [0, 10**9], [0, 1, 2], ["0", "8"], 7):
        entry(f"data_offsets = {offsets!r}", lambda e, o=offsets: dict(e, data_offsets=o))
    header("header not UTF-8", lambda h: b"\xff\xfe" + json.dumps(h).encode())
    header("header nested 100000 deep", lambda h: b"[" * 100000 + b"]" * 100000)
    header("header not JSON", lambda h: b"{oops")

    def length(n):
        def craft(folder):
            raw = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + raw[8:])

        return craft

    for n in (0, 2**63, 10**6):
        cases.append((f"header length {n}", length(n)))
    cases.append(
        ("weights file of 3 bytes", lambda folder: (folder / "model.safetensors").write_bytes(b"abc"))
    )

    def index(label, content):
        def craft(folder):
            (folder / "model.safetensors.index.json").write_text(
                content if isinstance(content, str) else json.dumps(content)
            )

        cases.append((label, craft))

    index("index without weight_map", {"metadata": {}})
    index("index weight_map a list", {"weight_map": ["model.safetensors"]})
    index("index shard a number", {"weight_map": {"wte": 3}})
    index(
        "index shard outside the folder", {"weight_map": {"transformer.wte.weight": "../model.safetensors"}}
    )
    index("index shard missing", {"weight_map": {"transformer.wte.weight": "nowhere.safetensors"}})
    index("index a list", [1, 2])
    index("index not JSON", "{weight_map")
    # config.json fields of the wrong type, absurd sizes, or the wrong model
    wrong = {"n_embd": ["8", 8.5, None, [8]], "n_layer": [True, "1"], "vocab_size": [{"v": 1}, -3],
             "layer_norm_epsilon": ["small", float("nan")], "tie_word_embeddings": ["yes"], "n_inner": ["4x"],
             "activation_function": [["gelu"]], "n_positions": [0], "model_type": ["llama", 7]}  # fmt: skip
    for field, values in wrong.items():
        for v in values:
            config(f"config.{field} = {v!r}", lambda c, f=field, v=v: dict(c, **{f: v}))
    for field, v in (("n_embd", 10**7), ("n_layer", 10**9), ("vocab_size", 10**13), ("n_positions", 10**12)):
        config(f"config.{field} = {v} (huge)", lambda c, f=field, v=v: dict(c, **{f: v}))
    config("config.json not JSON", lambda c: "{model_type: gpt2")
    config("config.json nested 100000 deep", lambda c: "[" * 100000 + "]" * 100000)
    cases.append(("config.json over the size limit", "huge"))
    # tokenizer.json (read by the optional tokenizers package)
    for label, content in [("a list", "[1, 2]"), ("not JSON", "{model"), ("an empty object", "{}"),
                           ("a model of numbers", '{"model": 5}'), ("nested 100000 deep", "[" * 100000 + "]" * 100000)]:  # fmt: skip
        cases.append(
            (f"tokenizer.json {label}", lambda folder, c=content: (folder / "tokenizer.json").write_text(c))
        )
    return cases


HF_CASES = hf_cases()


@pytest.mark.parametrize("label,craft", HF_CASES, ids=[label for label, _ in HF_CASES])
def test_crafted_hf_folder(hf_folder, tmp_path, capsys, monkeypatch, label, craft):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    if label.startswith("tokenizer.json"):
        pytest.importorskip("tokenizers", reason="tokenizer.json is read by the optional tokenizers package")
    if craft == "huge":  # a config.json larger than any real one (the limit lowered to keep the test small)
        from minimoe import filecheck

        monkeypatch.setattr(filecheck, "MAX_JSON_BYTES", 4096)
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(cfg, padding="x" * 5000)))
    else:
        craft(folder)
    with pytest.raises(UserError) as e:
        hf.load_pretrained(str(folder))
    assert "\n" not in str(e.value)
    rc, _, err = run_cli(capsys, "sample", "--hf", folder, "--prompt", "a", "--max-new-tokens", 1)
    assert_one_error_line(rc, err, label)


def test_the_hf_fuzz_inputs_are_generated():
    assert len(HF_CASES) >= 60 and [label for label, _ in hf_cases(1)] != [label for label, _ in HF_CASES]


# ---------------------------------------------------------- 6: sizes and data files, refused
SIZES = [["--block-size", 30000], ["--batch-size", 10**9], ["--n-embd", 10**7], ["--n-experts", 10**7],
         ["--n-layer", 10**9], ["--n-layer", 10**5, "--n-embd", 4096]]  # fmt: skip


@pytest.mark.parametrize("flags", SIZES, ids=[" ".join(map(str, f)) for f in SIZES])
def test_absurd_sizes_are_refused_up_front_with_the_estimate(tmp_path, capsys, flags):
    out = tmp_path / "big"
    rc, _, err = run_cli(capsys, "train", "--out", out, *flags)
    assert_one_error_line(rc, err, str(flags))
    assert "needs about" in err and "more than this machine's" in err
    assert not out.exists()


def data_cases(tmp_path):
    rng = np.random.default_rng(0)
    files = {
        "only NUL bytes": b"\0" * 5000,
        "a NUL in the text": b"hello world " * 300 + b"\0" + b"more text " * 100,
        "random bytes": rng.bytes(20000),
        "one character repeated": b"a" * 5000,
    }
    paths = {}
    for label, raw in files.items():
        p = tmp_path / (label.replace(" ", "_") + ".txt")
        p.write_bytes(raw)
        paths[label] = str(p)
    if os.path.exists("/dev/zero"):
        paths["/dev/zero"] = "/dev/zero"
    if os.path.exists("/dev/urandom"):
        paths["/dev/urandom"] = "/dev/urandom"
    return paths


def test_bad_data_files_are_refused_at_once(tmp_path, capsys):
    for label, path in data_cases(tmp_path).items():
        out = tmp_path / "out"
        rc, _, err = run_cli(capsys, "train", "--data", path, "--out", out, "--block-size", 8, "--n-layer", 1)
        assert_one_error_line(rc, err, label)
        assert not out.exists()


def test_the_data_size_limit_is_an_option(tmp_path, capsys):
    big = tmp_path / "big.txt"
    big.write_bytes(b"abcdefgh\n" * 300000)  # 2.6 MB
    rc, _, err = run_cli(capsys, "train", "--data", big, "--out", tmp_path / "out", "--max-data-mb", 1)
    assert_one_error_line(rc, err, "over the limit")
    assert "--max-data-mb" in err and not (tmp_path / "out").exists()
    assert len(data.read_text_file(big, max_bytes=4 * 2**20)) == 9 * 300000  # raised, it is read
