"""minimoe.threads (how many threads, used by whom) and ops.parallel (the experts side by side)."""

import threading

import numpy as np
import pytest
from conftest import on_host_only

from minimoe import threads
from minimoe.ops import experts, parallel
from minimoe.presets import get_preset

LAPTOP = 12 * 64  # tokens of the laptop-size step, B = 12, T = 64


@pytest.fixture(autouse=True)
def _restore():
    before = threads.blas_threads(), parallel.workers()
    yield
    if before[0] is not None:
        threads.blas_threads(before[0])
    parallel.set_workers(before[1])


@pytest.fixture
def no_env(monkeypatch):
    for var in threads.ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@on_host_only(
    "the thread plan puts experts side by side on the numpy backend only; on CuPy they run on the GPU"
)
def test_the_size_rule_puts_small_experts_side_by_side_and_large_products_on_blas():
    mixtral, dense = get_preset("mixtral"), get_preset("dense")
    assert threads.matmul_flops(mixtral, LAPTOP) == 2 * 192 * 128 * 256  # one expert's share of rows
    assert threads.split_threads(2, mixtral, LAPTOP)[:3] == (2, 1, 2)  # experts side by side, BLAS 1
    assert threads.split_threads(2, dense, LAPTOP)[:3] == (2, 2, 1)  # one large product: BLAS 2
    big = get_preset("mixtral", n_embd=384, n_head=6, block_size=256)
    assert threads.split_threads(2, big, 16 * 256)[:3] == (2, 2, 1)
    assert threads.split_threads(2)[:3] == (2, 2, 1)  # no model given: BLAS
    assert threads.split_threads(4, get_preset("mixtral", n_experts=2, top_k=1), LAPTOP)[:3] == (4, 1, 2)


@pytest.mark.parametrize(
    "busy, expected",
    [(0.0, 2), (0.2, 2), (0.3, 1), (1.0, 1), (1.9, 1), (2.0, 1)],
)
def test_auto_uses_the_free_cores(monkeypatch, no_env, busy, expected):
    monkeypatch.setattr(threads, "cpu_cores", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda interval=0.2: busy)
    choice = threads.choose(get_preset("mixtral"), LAPTOP)
    assert choice.threads == expected and choice.source == "auto" and choice.busy == busy
    assert f"{busy:.1f} busy" in choice.describe()


def test_auto_does_not_look_at_the_load_when_one_thread_is_best(monkeypatch, no_env):
    def look(interval=0.2):
        raise AssertionError("the load was measured")

    monkeypatch.setattr(threads, "cpu_cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", look)
    assert threads.choose(get_preset("mixtral"), tokens=1).threads == 1  # generation: one token
    assert threads.choose(get_preset("dense"), tokens=64).threads == 1  # small dense products
    monkeypatch.setattr(threads, "cpu_cores", lambda: 1)
    assert threads.choose(get_preset("dense"), LAPTOP).threads == 1


def test_an_environment_variable_is_the_users_choice(monkeypatch, no_env):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    monkeypatch.setattr(threads, "busy_cores", lambda interval=0.2: 99.0)
    choice = threads.choose(get_preset("dense"), LAPTOP)
    assert (choice.threads, choice.blas, choice.source) == (3, 3, "OPENBLAS_NUM_THREADS")


def test_busy_cores_and_cpu_cores_describe_this_machine():
    cores = threads.cpu_cores()
    assert cores >= 1
    busy = threads.busy_cores(0.05)
    assert 0.0 <= busy <= cores + 1e-9


@on_host_only(
    "the thread plan puts experts side by side on the numpy backend only; on CuPy they run on the GPU"
)
def test_apply_sets_blas_and_the_expert_workers():
    choice = threads.apply(2, get_preset("mixtral"), LAPTOP)
    assert (choice.blas, choice.workers, parallel.workers()) == (1, 2, 2)
    assert choice.describe() == "threads 2 (--threads); BLAS 1, 2 experts side by side"
    if threads.blas_threads() is not None:
        assert threads.blas_threads() == 1
        threads.apply(2, get_preset("dense"), LAPTOP)
        assert threads.blas_threads() == 2 and parallel.workers() == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_threads_refuses_what_is_not_a_count(bad):
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        threads.set_threads(bad)


def test_parallel_run_keeps_the_order_and_uses_other_threads():
    parallel.set_workers(3)
    barrier = threading.Barrier(3, timeout=10)  # passes only if three tasks run at the same time

    def task(i):
        barrier.wait()
        return i, threading.current_thread().name

    out = parallel.run([lambda i=i: task(i) for i in range(3)])
    assert [i for i, _ in out] == [0, 1, 2]
    assert len({name for _, name in out}) == 3
    parallel.set_workers(1)
    assert parallel.run([lambda: threading.current_thread().name]) == [threading.current_thread().name]


def test_parallel_run_never_waits_for_a_helper_that_does_not_start(monkeypatch):
    class Stalled:  # a pool whose threads never get a core: the caller must do every task
        def __init__(self):
            self.submitted = []

        def submit(self, fn):
            self.submitted.append(fn)

    stalled = Stalled()
    monkeypatch.setattr(parallel, "_pool", lambda threads: stalled)
    parallel.set_workers(4)
    assert parallel.run([lambda i=i: i * i for i in range(6)]) == [0, 1, 4, 9, 16, 25]
    assert len(stalled.submitted) == 3
    for late in stalled.submitted:  # a helper that starts after all: finds nothing left to do
        late()


def test_parallel_run_raises_a_tasks_error_and_runs_nested_runs_in_order():
    parallel.set_workers(2)

    def bad():
        raise KeyError("expert 3")

    with pytest.raises(KeyError, match="expert 3"):
        parallel.run([lambda: 1, bad, lambda: 3])
    inner = parallel.run([lambda: parallel.run([lambda: threading.current_thread().name] * 3)] * 2)
    assert all(len(set(names)) == 1 for names in inner)  # each nested run stayed in its thread


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_experts_side_by_side_give_the_same_numbers_bit_for_bit(rng, activation):
    N, C, F, E, K = 40, 8, 12, 5, 2
    x = rng.standard_normal((N, C))
    idx = np.stack([rng.permutation(N) % E, (rng.permutation(N) + 1) % E], 1)
    idx[:, 1] = np.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % E, idx[:, 1])
    names = ("w1", "w3", "w2") if activation == "swiglu" else ("w1", "w2")
    w = {k: rng.standard_normal((E, F, C) if k == "w2" else (E, C, F)) for k in names}
    x_sorted, offsets, _, _ = experts.dispatch_forward(x, idx[:, :K], E)
    dy = rng.standard_normal(x_sorted.shape)
    out = {}
    for n in (1, 3):
        parallel.set_workers(n)
        y, cache = experts.experts_forward(x_sorted, offsets, w, activation)
        dx, dw = experts.experts_backward(dy, cache)
        out[n] = (y, dx, dw)
    assert np.array_equal(out[1][0], out[3][0]) and np.array_equal(out[1][1], out[3][1])
    for k in names:
        assert np.array_equal(out[1][2][k], out[3][2][k])


def test_train_and_sample_take_threads_and_train_says_what_it_chose(tmp_path, capsys):
    from minimoe import cli, data

    corpus = tmp_path / "tasks.txt"
    corpus.write_text(data.synthetic_corpus(300, seed=0), encoding="utf-8")
    args = ["--data", str(corpus), "--out", str(tmp_path / "run"), "--max-iters", "1", "--n-layer", "1"]
    args += ["--batch-size", "2", "--block-size", "16", "--sample-tokens", "0", "--eval-iters", "1"]
    assert cli.main(["train", *args, "--threads", "0"]) == 2
    assert "--threads = 0 is invalid: it must be an integer >= 1" in capsys.readouterr().err
    assert cli.main(["train", *args, "--threads", "2"]) == 0
    assert "threads 2 (--threads); BLAS 1, 2 experts side by side" in capsys.readouterr().out
    assert parallel.workers() == 2
    assert cli.main(["sample", "--ckpt", str(tmp_path / "run"), "--threads", "0"]) == 2
    assert "--threads = 0 is invalid" in capsys.readouterr().err
    assert (
        cli.main(["sample", "--ckpt", str(tmp_path / "run"), "--max-new-tokens", "3", "--threads", "1"]) == 0
    )
    assert parallel.workers() == 1


def test_attention_batch_rows_side_by_side_give_the_same_numbers_bit_for_bit(rng):
    from minimoe.ops import attention

    q, k, v = (
        rng.standard_normal((5, 4, 6, 8)),
        rng.standard_normal((5, 2, 6, 8)),
        rng.standard_normal((5, 2, 6, 8)),
    )
    dy = rng.standard_normal(q.shape)
    out = {}
    for n in (1, 2, 3):
        parallel.set_workers(n)
        assert len(attention._batch_chunks(5, 100)) >= n
        y, cache = attention.causal_attention_forward(q, k, v)
        out[n] = (y, *attention.causal_attention_backward(dy, cache))
    for n in (2, 3):
        assert all(np.array_equal(a, b) for a, b in zip(out[1], out[n]))


def test_adamw_and_clipping_side_by_side_give_the_same_numbers_bit_for_bit(rng):
    from minimoe.optim import AdamW, clip_grad_norm

    shapes = {
        "wte": (11, 8),
        "a.w": (8, 24),
        "a.b": (24,),
        "moe.w1": (5, 8, 12),
        "ln.g": (8,),
        "head": (8, 11),
    }
    start = {n: rng.standard_normal(s) for n, s in shapes.items()}
    grads = [{n: rng.standard_normal(s) * 3 for n, s in shapes.items()} for _ in range(3)]
    out = {}
    for n in (1, 2, 3):
        parallel.set_workers(n)
        params = {k: v.copy() for k, v in start.items()}
        opt, norms = AdamW(params, lr=1e-2), []
        for g in grads:
            g = {k: v.copy() for k, v in g.items()}
            norms.append(float(clip_grad_norm(g, 1.0)))
            opt.step(g)
        out[n] = (params, opt.m, opt.v, norms)
        if n > 1:  # every parameter in exactly one group, the groups about equally big
            groups = opt._groups_for(n)
            assert len(groups) == n and sorted(sum(groups, [])) == sorted(shapes)
    for n in (2, 3):
        for a, b in zip(out[1][:3], out[n][:3]):
            assert all(np.array_equal(a[k], b[k]) for k in shapes)
        assert out[1][3] == out[n][3]


def test_bench_takes_the_threads_and_a_flavour(capsys):
    import json

    from minimoe import bench

    tiny = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "8", "--batch-size", "2"]
    tiny += ["--iters", "1", "--warmup", "0", "--no-memory", "--json"]
    assert bench.main(["--preset", "dense", "--flavour", "gpt2", "--threads", "2", *tiny]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["config"]["norm"] == "layernorm" and r["config"]["activation"] == "gelu" and r["threads"] == 2
    assert r["threads_chosen"].startswith("threads 2 (--threads)")
    assert bench.main(["--preset", "dense", "--flavour", "gpt3", *tiny]) == 2
    assert "--flavour = 'gpt3' is invalid" in capsys.readouterr().err


def test_the_ranks_of_an_mpi_launch_share_the_cores(monkeypatch, no_env):
    monkeypatch.setattr(threads, "cpu_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda interval=0.2: 0.0)
    assert threads.choose(get_preset("dense"), LAPTOP).threads == 4
    monkeypatch.setenv("PMI_SIZE", "2")
    assert threads.choose(get_preset("dense"), LAPTOP).threads == 2
    monkeypatch.setenv("PMI_SIZE", "8")
    assert threads.choose(get_preset("dense"), LAPTOP).threads == 1
