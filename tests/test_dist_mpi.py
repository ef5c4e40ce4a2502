"""P real MPI processes (`mpiexec -n 2` and `-n 4`, oversubscribed on a small machine) train one
model equal to one process: same losses and parameters after N steps (float64 within 1e-12
relative, float32 within its round-off) for the dense, mixtral, switch (per-group capacity) and
deepseek presets; checkpoints resume under any P; a failing or killed rank stops every rank
within seconds and leaves the last checkpoint intact; the all-to-all passes its gradient check
across processes; `bench --ranks` measures the bytes the formula predicts.

Skipped, with the reason, without mpi4py or an mpiexec. Each launch runs several trainings of a
tiny model, to keep the launches (about a second each) few.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minimoe import checkpoint
from minimoe.gradcheck import rel_error
from minimoe.train import train

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py: pip install 'minimoe[dist]'")
# the launcher beside this Python (the mpich wheel's, matching mpi4py's MPI), else the one on PATH
MPIEXEC = str(Path(sys.executable).with_name("mpiexec"))
MPIEXEC = MPIEXEC if Path(MPIEXEC).exists() else shutil.which("mpiexec") or ""
if not Path(MPIEXEC).is_file():
    pytest.skip(
        "the MPI tests need an mpiexec launcher (pip install 'minimoe[dist]')", allow_module_level=True
    )

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
PRESETS = ("dense", "mixtral", "switch", "deepseek")
TINY = dict(n_layer=2, n_embd=16, n_head=2, block_size=8, batch_size=8, max_iters=4, eval_interval=2,
            eval_iters=2, log_interval=1, warmup_iters=8, sample_tokens=0, seed=0)  # fmt: skip
F64, F32 = 1e-12, 2e-5  # relative error allowed: float64, and float32 round-off grown over 4 steps


def mpirun(P, *args, timeout=120, env=None):
    """Run `mpiexec -n P python ARGS...` from the checkout; (returncode, stdout, stderr, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    t0 = time.monotonic()
    p = subprocess.run([MPIEXEC, "-n", str(P), sys.executable, *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


def running(pid: int) -> bool:
    """Whether process pid still runs (a zombie waiting to be reaped does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the a cat dog sat on mat ran fast slow big small red blue".split()
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(rng.choice(words, 3000)))
    return str(path)


def options(corpus, out, preset, **kw):
    return {**TINY, "data": corpus, "preset": preset, "out": str(out), "dtype": "float64", **kw}


def one_process(o):
    """Train in this process; the run's directory."""
    train(o, quiet=True)
    return o["out"]


def compare(a, b, tol):
    """(worst relative error of parameters, moments and buffers, of the logged losses) of two runs."""
    ca, cb = checkpoint.load_checkpoint(a), checkpoint.load_checkpoint(b)
    assert ca.train_state["iteration"] == cb.train_state["iteration"]
    arrays = [(ca.params, cb.params), (ca.buffers, cb.buffers), (ca.optimizer["m"], cb.optimizer["m"]),
              (ca.optimizer["v"], cb.optimizer["v"])]  # fmt: skip
    worst = max((rel_error(x[k], y[k]), k) for x, y in arrays for k in x)
    la, lb = (
        [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()] for d in (a, b)
    )
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    keys = ("train_loss", "val_loss")
    loss = max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(la, lb) for k in keys if k in x)
    assert worst[0] < tol and loss < tol, (worst, loss)
    return worst[0], loss, la


@pytest.fixture(scope="module")
def distributed_runs(corpus, tmp_path_factory):
    """One launch per P in (2, 4) training every preset in float64 (and mixtral in float32)."""
    base = tmp_path_factory.mktemp("dist")
    runs = {}
    for P in (2, 4):
        spec = [options(corpus, base / f"{name}-{P}", name) for name in PRESETS]
        spec.append(options(corpus, base / f"mixtral32-{P}", "mixtral", dtype="float32"))
        (base / f"spec{P}.json").write_text(json.dumps(spec))
        rc, out, err, _ = mpirun(P, WORKER, "train", base / f"spec{P}.json")
        assert rc == 0, err
        runs[P] = {Path(o["out"]).name.rsplit("-", 1)[0]: o["out"] for o in spec}
    return base, runs


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("name", PRESETS)
def test_ranks_train_the_one_process_model(name, P, corpus, distributed_runs, tmp_path):
    base, runs = distributed_runs
    # switch drops slots by capacity: P ranks apply it per rank, as one process with P groups
    groups = dict(capacity_groups=P) if name == "switch" else {}
    ref = one_process(options(corpus, tmp_path / "one", name, **groups))
    worst, loss, records = compare(ref, runs[P][name], F64)
    print(f"{name} P={P}: params/moments {worst:.1e}, losses {loss:.1e}")
    if name == "switch":
        assert max(layer["dropped_fraction"] for r in records for layer in r["moe"]) > 0


@pytest.mark.parametrize("P", [2, 4])
def test_float32_ranks_agree_to_round_off(P, corpus, distributed_runs, tmp_path):
    base, runs = distributed_runs
    ref = one_process(options(corpus, tmp_path / "one", "mixtral", dtype="float32"))
    worst, loss, _ = compare(ref, runs[P]["mixtral32"], F32)
    print(f"mixtral float32 P={P}: params/moments {worst:.1e}, losses {loss:.1e}")


def test_the_command_line_under_mpiexec(corpus, tmp_path):
    """`mpiexec -n 2 python -m minimoe train`: rank 0 alone prints; the result is the one-process run."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    flags += ["--data", corpus, "--preset", "mixtral", "--dtype", "float64", "--out", tmp_path / "cli"]
    rc, out, err, _ = mpirun(2, "-m", "minimoe", "train", *flags)
    assert rc == 0, err
    assert out.count("distributed over 2 ranks") == 1 and "expert parallel: 4 of the 8 experts" in out
    assert "host arrays" in out
    ref = one_process(options(corpus, tmp_path / "one", "mixtral"))
    compare(ref, tmp_path / "cli", F64)


@pytest.mark.parametrize(
    "P, flags, message",
    [
        (3, ["--parallel", "expert", "--batch-size", "9"], "--parallel expert splits the 8 experts"),
        (3, ["--batch-size", "8"], "--batch-size = 8 cannot be split over 3 ranks"),
    ],
)
def test_a_wrong_layout_is_one_error_line_from_rank_0(P, flags, message, corpus, tmp_path):
    rc, out, err, _ = mpirun(P, "-m", "minimoe", "train", "--data", corpus, "--out", tmp_path, *flags)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_checkpoints_resume_under_any_number_of_ranks(corpus, tmp_path):
    """4 expert-parallel ranks save at step 2, one process goes on to step 4, then 2 ranks to 6
    (all within the warm-up, so the learning rates do not depend on --max-iters): equal to one
    uninterrupted process. And a one-process checkpoint resumes on 2 data-parallel ranks."""
    o = options(corpus, tmp_path / "chain", "mixtral", eval_interval=2)
    ref = one_process(options(corpus, tmp_path / "one", "mixtral", max_iters=6))
    spec = tmp_path / "spec.json"
    for P, until in ((4, 2), (1, 4), (2, 6)):
        run = o | dict(max_iters=until, resume=until > 2)
        if P == 1:
            train(run, quiet=True)
            continue
        spec.write_text(json.dumps([run]))
        rc, _, err, _ = mpirun(P, WORKER, "train", spec)
        assert rc == 0, err
    compare(ref, tmp_path / "chain", F64)
    # the whole experts are in the file: one-process format
    ckpt = checkpoint.load_checkpoint(tmp_path / "chain")
    assert ckpt.params["blocks.0.moe.experts.w1"].shape[0] == 8
    # one process -> 2 data-parallel ranks
    o2 = options(corpus, tmp_path / "dp", "mixtral")
    train(o2 | dict(max_iters=2), quiet=True)
    spec.write_text(json.dumps([o2 | dict(max_iters=6, resume=True, parallel="data")]))
    rc, _, err, _ = mpirun(2, WORKER, "train", spec)
    assert rc == 0, err
    compare(ref, tmp_path / "dp", F64)


@pytest.mark.parametrize("kind", ["raise", "kill", "stop"])
def test_a_failing_rank_stops_every_rank(kind, corpus, tmp_path):
    """An exception on rank 1 (aborts all), rank 1 killed (the launcher ends the others), or
    rank 1 frozen (the others' watchdog aborts): every rank gone within seconds, exit status
    non-zero, the failing rank's error on stderr, and the step-3 checkpoint intact."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([options(corpus, tmp_path, "mixtral", max_iters=50, eval_interval=3)]))
    rc, out, err, seconds = mpirun(4, WORKER, "fault", kind, 1, 5, spec, env={"MINIMOE_DIST_TIMEOUT": "3"})
    assert rc != 0 and seconds < 30
    pids = [int((tmp_path / f"pid.{r}").read_text()) for r in range(4)]
    time.sleep(0.5)
    assert not [pid for pid in pids if running(pid)]  # no rank survives
    expect = {
        "raise": "error: rank 1: injected failure after step 5; stopping every rank",
        "kill": "signal 9",
        "stop": "no progress for",
    }[kind]
    assert expect in out + err, err[-2000:]
    ckpt = checkpoint.load_checkpoint(tmp_path)
    assert ckpt.train_state["iteration"] == 3
    assert not list(tmp_path.glob(".ckpt.npz.*.tmp"))


def test_all_to_all_gradient_check_across_processes(tmp_path):
    rc, _, err, _ = mpirun(4, WORKER, "gradcheck", tmp_path / "grad.json")
    assert rc == 0, err
    result = json.loads((tmp_path / "grad.json").read_text())
    assert len(result["errors"]) >= 3 and max(result["errors"]) < 1e-9
    assert result["cuda_aware"] is False  # the mpich wheel takes host memory only


def test_bench_ranks_measures_the_all_to_all_bytes(tmp_path):
    cmd = [sys.executable, "-m", "minimoe", "bench", "--ranks", "2", "--preset", "mixtral", "--n-layer", "2",
           "--n-embd", "32", "--batch-size", "8", "--block-size", "16", "--iters", "3", "--warmup", "1", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["ranks"] == 2 and r["mode"] == "expert"
    # the measured bytes are exactly what the routing sent; the formula assumes uniform routing
    assert r["all_to_all_bytes_per_rank"] == r["all_to_all_bytes_from_counts"]
    assert 0.5 < r["all_to_all_bytes_per_rank"] / r["all_to_all_bytes_formula"] < 1.5
    assert r["comm_ms"] > 0 and r["compute_ms"] > 0


def cli_flags(corpus, out, **kw):
    o = {**TINY, "data": corpus, "out": str(out), "preset": "mixtral", **kw}
    return [f"--{k.replace('_', '-')}={v}" for k, v in o.items()]


@pytest.mark.parametrize(
    "sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_a_signal_stops_every_rank_and_rank_0_saves(sig, status, corpus, tmp_path):
    """Ctrl-C or SIGTERM at mpiexec reaches every rank: they stop at the same step, rank 0 saves
    once and releases the run lock (which it alone holds: another run is refused meanwhile)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    flags = cli_flags(corpus, tmp_path, max_iters=100000, eval_interval=100000, log_interval=1)
    p = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "minimoe", "train", *flags], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.2)
    assert (tmp_path / "run.lock").exists()
    from minimoe.rundir import RunLockError

    with pytest.raises(RunLockError, match="in use by another run"):
        train({**TINY, "data": corpus, "out": str(tmp_path), "preset": "mixtral"}, quiet=True)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == status, err
    assert out.count("checkpoint saved to") == 1, out[-2000:]
    ckpt = checkpoint.load_checkpoint(tmp_path)
    assert ckpt.train_state["iteration"] > 0 and ckpt.params["blocks.0.moe.experts.w1"].shape[0] == 8
    assert not (tmp_path / "run.lock").exists()


def test_a_divergence_stops_every_rank_without_saving(corpus, tmp_path):
    """--lr 1e30: the global loss becomes NaN on every rank at once, so every rank skips the
    same steps and stops together (exit status 3), and nothing broken is saved."""
    flags = cli_flags(corpus, tmp_path, lr=1e30, warmup_iters=0, max_iters=30, eval_interval=5)
    rc, out, err, _ = mpirun(2, "-m", "minimoe", "train", *flags)
    assert rc == 3, err
    assert out.count("not finite, update skipped") == 2 and out.count("stopped at step 4") == 1, out
    assert not (tmp_path / "ckpt.npz").exists() and not (tmp_path / "run.lock").exists()
