"""Data and expert parallelism without MPI: P ranks simulated by threads (tests/thread_comm.py).

The all-to-all pair (layers/exchange.py) is a block transpose and its backward the transpose
back (float64 gradient check across the ranks); the expert-parallel MoE layer equals the
one-process layer on the whole batch (outputs, gradients, global statistics), for every router;
a whole training step on P ranks equals one process; GShard's per-group capacity
(Config.capacity_groups); the exchange stages device arrays through the host unless MPI is
CUDA-aware (fake CuPy); launch detection, layout errors, agreed set-up errors, abort, watchdog.
The same things with real MPI processes are in tests/test_dist_mpi.py.
"""

import json
import math
import re
import sys
import time
from types import SimpleNamespace

import fake_cupy
import numpy as np
import pytest
from conftest import array_equal, asarray, to_numpy, xp
from thread_comm import run_ranks

from minimoe import backend, dist
from minimoe.config import Config
from minimoe.errors import OptionError, UserError
from minimoe.gradcheck import check_gradients, numerical_gradient, rel_error
from minimoe.layers import exchange, moe
from minimoe.model import GPT
from minimoe.optim import AdamW
from minimoe.train import train_step

EXACT = 1e-12  # P ranks against one process, float64: the same sums in another order


# ------------------------------------------------------------------------------------------------
# the all-to-all pair
# ------------------------------------------------------------------------------------------------


def _blocks(P, seed=0, C=3):
    """n[s, d] rows from rank s to rank d (zeros included), and each rank's x_s (M_s, C)."""
    rng = np.random.default_rng(seed)
    n = rng.integers(0, 4, (P, P))
    n[0, P - 1] = 0
    return n, [rng.standard_normal((int(n[s].sum()), C)) for s in range(P)]


@pytest.mark.parametrize("P", [1, 2, 3])
def test_all_to_all_is_a_block_transpose(P):
    n, xs = _blocks(P)

    def rank(comm):
        r = comm.Get_rank()
        g = exchange.Group(comm)
        y, cache = exchange.all_to_all_forward(asarray(xs[r]), n[r], n[:, r], g)
        return y, exchange.all_to_all_backward(y, cache)

    out = run_ranks(P, rank)
    at = np.concatenate([np.zeros((P, 1), int), np.cumsum(n, axis=1)], axis=1)  # block s->d of x_s
    twin = exchange.all_to_all_forward_reference([asarray(x) for x in xs], n)
    for d in range(P):
        expected = np.concatenate([xs[s][at[s, d] : at[s, d + 1]] for s in range(P)])
        assert array_equal(out[d][0], expected)  # y_d = concat_s (block s->d)
        assert array_equal(twin[d], expected)  # the plain twin, all ranks in one process
        assert array_equal(out[d][1], xs[d])  # the backward sends every row home
    back = exchange.all_to_all_backward_reference(twin, n)
    assert all(array_equal(back[s], xs[s]) for s in range(P))


def test_all_to_all_gradient_check_across_ranks():
    """L = sum_d <W_d, y_d>: dL/dx_s from the backward against central differences, perturbing
    every entry of every rank's x (each evaluation runs all ranks)."""
    P = 3
    n, xs = _blocks(P, seed=1)
    xs = [asarray(x) for x in xs]
    rng = np.random.default_rng(2)
    ws = [asarray(rng.standard_normal((int(n[:, d].sum()), 3))) for d in range(P)]

    def loss():
        def rank(comm):
            r = comm.Get_rank()
            y, _ = exchange.all_to_all_forward(xs[r], n[r], n[:, r], exchange.Group(comm))
            return float((y * ws[r]).sum())

        return sum(run_ranks(P, rank))

    def grads(comm):
        r = comm.Get_rank()
        g = exchange.Group(comm)
        _, cache = exchange.all_to_all_forward(xs[r], n[r], n[:, r], g)
        right = exchange.all_to_all_backward(ws[r], cache)
        wrong = ws[r][: xs[r].shape[0]] if ws[r].shape[0] >= xs[r].shape[0] else None  # no exchange back
        return right, wrong

    analytic = run_ranks(P, grads)
    for s in range(P):
        picks, num = numerical_gradient(loss, xs[s], eps=1e-6)
        assert rel_error(to_numpy(analytic[s][0]).reshape(-1)[picks], num) < 1e-9
        if analytic[s][1] is not None and analytic[s][1].size:  # keeping the rows where they are is wrong
            assert rel_error(to_numpy(analytic[s][1]).reshape(-1)[picks], num) > 1e-2


def test_all_to_all_refuses_counts_that_do_not_add_up():
    def rank(comm):
        with pytest.raises(ValueError, match="rows"):
            exchange.all_to_all_forward(xp().zeros((3, 2)), [1, 1], [1, 1], exchange.Group(comm))

    run_ranks(2, rank)


def test_expert_major_lists_rows_by_expert_then_source():
    counts = np.array([[2, 1], [0, 3]])  # from rank 0: 2 rows for expert 0, 1 for expert 1; rank 1: 0, 3
    # received rows 0,1 (r0 e0), 2 (r0 e1), 3,4,5 (r1 e1)
    assert exchange.expert_major(counts).tolist() == [0, 1, 2, 3, 4, 5]
    assert exchange.expert_major(np.array([[1, 2], [3, 0]])).tolist() == [0, 3, 4, 5, 1, 2]


# ------------------------------------------------------------------------------------------------
# the MoE layer on P ranks equals the layer on the whole batch in one process
# ------------------------------------------------------------------------------------------------


def _layer_config(**kw):
    base = dict(flavour="llama", n_layer=1, n_embd=6, n_head=1, vocab_size=5, block_size=8, n_experts=4,
                top_k=2, expert_hidden=3, init_std=0.5, aux_loss_coef=0.3, z_loss_coef=0.2)  # fmt: skip
    return Config(**{**base, **kw})


LAYERS = {
    "mixtral": dict(router="softmax", renormalize=True),
    "switch-capacity": dict(router="softmax", renormalize=False, top_k=1, capacity_factor=1.0),
    "deepseek": dict(router="sigmoid_bias", top_k=2, n_shared_experts=1, capacity_factor=0.75),
    "noisy-train": dict(router="noisy", n_shared_experts=1),
}


def _layer_on_ranks(c, P, expert_parallel, seed=3, B=4, T=4):
    """(one-process y, dh, grads, stats), [(y, dh, grads, stats) of each rank], E/P."""
    rng = np.random.default_rng(seed)
    pre, E = "moe.", c.n_experts
    p = moe.init_params(c, pre, rng, c.init_std, c.init_std / math.sqrt(2))
    if c.router == "noisy":
        p[pre + "router.w_noise"] = rng.standard_normal(p[pre + "router.w_noise"].shape) * 0.5
    p = {k: asarray(v) for k, v in p.items()}
    buffers = (
        {pre + "router_bias": asarray(rng.standard_normal(E) * 0.1)} if c.router == "sigmoid_bias" else {}
    )
    h, dy = asarray(rng.standard_normal((B, T, c.n_embd))), asarray(rng.standard_normal((B, T, c.n_embd)))
    training = c.router == "noisy"
    one = c.replace(capacity_groups=P)  # GShard: one group per rank

    def run(cfg, h, dy, p, group=None):
        noise = backend.make_rng(7)
        if group is not None:
            noise = exchange.ShardedRng(noise, group)
        y, cache, stats = moe.moe_forward(cfg, h, p, buffers, pre, noise, training, group)
        grads = {}
        dh = moe.moe_backward(cfg, dy, cache, pre, grads)
        return y, dh, grads, stats

    El = E // P if expert_parallel else E

    def rank(comm):
        g = exchange.Group(comm, expert_parallel=expert_parallel)
        r = comm.Get_rank()
        mine = {
            k: (v[r * El : (r + 1) * El] if ".experts." in k and expert_parallel else v) for k, v in p.items()
        }
        return run(c, g.local_rows(h), g.local_rows(dy), mine, g)

    return run(one, h, dy, p), run_ranks(P, rank), El


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("name", list(LAYERS))
def test_expert_parallel_layer_equals_one_process(name, P):
    c = _layer_config(**LAYERS[name])
    (y, dh, grads, stats), ranks, El = _layer_on_ranks(c, P, expert_parallel=True)
    assert rel_error(xp().concatenate([r[0] for r in ranks]), y) < EXACT
    assert rel_error(xp().concatenate([r[1] for r in ranks]), dh) < EXACT
    for k, g in grads.items():
        if ".experts." in k:  # each rank holds the gradients of its own experts only
            assert ranks[0][2][k].shape[0] == El
            assert rel_error(xp().concatenate([r[2][k] for r in ranks]), g) < EXACT, k
        else:  # replicated: the ranks' gradients add up to the one-process gradient
            assert rel_error(sum(r[2][k] for r in ranks), g) < EXACT, k
    for key in ("aux_loss", "z_loss", "router_entropy", "dropped_fraction"):
        for r in ranks:
            assert abs(float(r[3][key]) - float(stats[key])) <= EXACT * max(1.0, abs(float(stats[key]))), key
    for r in ranks:
        assert array_equal(r[3]["tokens_per_expert"], stats["tokens_per_expert"])
    if c.capacity_factor:
        assert stats["dropped_fraction"] > 0  # capacity really drops slots here


def test_data_parallel_layer_uses_global_statistics():
    c = _layer_config(**LAYERS["deepseek"])
    (y, dh, grads, stats), ranks, _ = _layer_on_ranks(c, 2, expert_parallel=False)
    assert rel_error(xp().concatenate([r[0] for r in ranks]), y) < EXACT
    assert rel_error(sum(r[2]["moe.router.w"] for r in ranks), grads["moe.router.w"]) < EXACT
    assert abs(float(ranks[1][3]["aux_loss"]) - float(stats["aux_loss"])) < EXACT
    assert array_equal(ranks[1][3]["tokens_per_expert"], stats["tokens_per_expert"])


def test_local_statistics_would_differ_from_global_ones():
    """The reason for the all-reduce: one rank's own balancing loss is not the batch's."""
    c = _layer_config(**LAYERS["mixtral"])
    rng = np.random.default_rng(3)
    p = {k: asarray(v) for k, v in moe.init_params(c, "moe.", rng, c.init_std, c.init_std).items()}
    h = asarray(rng.standard_normal((4, 4, c.n_embd)))
    whole = moe.moe_forward(c, h, p, {}, "moe.", None, False)[2]
    half = moe.moe_forward(c, h[:2], p, {}, "moe.", None, False)[2]
    assert abs(float(whole["aux_loss"]) - float(half["aux_loss"])) > 1e-6


# ------------------------------------------------------------------------------------------------
# GShard's per-group capacity in one process
# ------------------------------------------------------------------------------------------------


def test_capacity_groups_keep_what_each_group_would_keep_alone():
    c = _layer_config(top_k=1, renormalize=False, capacity_factor=1.0, capacity_groups=3)
    rng = np.random.default_rng(0)
    N, G = 12, 3
    x = asarray(rng.standard_normal((N, c.n_embd)))
    idx = asarray([[0], [0], [0], [1], [0], [0], [2], [0], [3], [3], [3], [3]])
    xs, offsets, counts, cache = moe.dispatch(c, x, idx)
    alone = c.replace(capacity_groups=1)
    kept = {n: e for e in range(4) for n in cache.token[offsets[e] : offsets[e + 1]].tolist()}
    for g in range(G):
        rows = slice(g * 4, (g + 1) * 4)
        _, off_g, _, cache_g = moe.dispatch(alone, x[rows], idx[rows])
        kept_g = {n + g * 4: e for e in range(4) for n in cache_g.token[off_g[e] : off_g[e + 1]].tolist()}
        assert {n: e for n, e in kept.items() if g * 4 <= n < (g + 1) * 4} == kept_g
    assert counts.tolist() == [6, 1, 1, 4]  # before drops
    one_group = moe.dispatch(alone, x, idx)[3]
    assert one_group.M != cache.M  # the grouping changes which slots are kept here
    # within each expert: group by group, and the rows are the kept tokens' rows
    assert array_equal(xs, x[cache.token])


def test_capacity_groups_gradients():
    c = _layer_config(router="softmax", renormalize=False, top_k=1, capacity_factor=1.0, capacity_groups=2)
    rng = np.random.default_rng(5)
    p = {k: asarray(v) for k, v in moe.init_params(c, "moe.", rng, c.init_std, c.init_std).items()}
    h, dy = asarray(rng.standard_normal((2, 4, c.n_embd))), asarray(rng.standard_normal((2, 4, c.n_embd)))

    def loss():
        y, _, st = moe.moe_forward(c, h, p, {}, "moe.", None, False)
        return float((y * dy).sum() + c.aux_loss_coef * st["aux_loss"] + c.z_loss_coef * st["z_loss"])

    y, cache, stats = moe.moe_forward(c, h, p, {}, "moe.", None, False)
    grads = {}
    grads["h"] = moe.moe_backward(c, dy, cache, "moe.", grads)
    errors = check_gradients(loss, {"h": h, **p}, grads, eps=1e-5)
    assert max(errors.values()) < 1e-6, errors
    assert stats["dropped_fraction"] > 0


def test_capacity_groups_is_validated():
    with pytest.raises(UserError, match="capacity_groups"):
        _layer_config(capacity_groups=0)


# ------------------------------------------------------------------------------------------------
# whole training steps on P ranks
# ------------------------------------------------------------------------------------------------


def _tiny(**kw):
    base = dict(flavour="llama", vocab_size=13, block_size=6, n_layer=2, n_head=2, n_embd=8, n_experts=4,
                top_k=2, expert_hidden=6, init_std=0.3, z_loss_coef=0.01)  # fmt: skip
    return Config(**{**base, **kw})


def _train(c, P, mode, steps=3, B=4, clip=0.05):
    """Parameters after `steps` AdamW steps: in one process, and gathered from P thread-ranks."""
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, c.vocab_size, (B, c.block_size)),) * 2 for _ in range(steps)]
    batches = [(x, np.roll(x, -1, axis=1)) for x, _ in batches]

    def steps_of(model, opt, world=None):
        losses = []
        for x, y in batches:
            losses.append(float(train_step(model, opt, x, y, 1e-2, clip, world=world)))
            model.update_router_biases()
        return losses

    one_cfg = c.replace(capacity_groups=P) if mode == "expert" or c.capacity_factor else c
    one = GPT(one_cfg, seed=1, dtype="float64")
    one.opt = AdamW(one.params)
    one_losses = steps_of(one, one.opt)

    def rank(comm):
        model = GPT(c, seed=1, dtype="float64")
        opt = AdamW(model.params)
        w = dist.World(comm)
        w.attach(model, opt, mode)
        losses = steps_of(model, opt, w)
        full, fopt = w.full_state(model, opt)
        return losses, full, fopt, w.standalone_model(model)

    return one, one_losses, run_ranks(P, rank)


@pytest.mark.parametrize(
    "kw, P, mode",
    [
        (dict(), 2, "expert"),
        (dict(dropout=0.2, router="noisy"), 2, "expert"),  # the same random numbers as one process
        (dict(router="sigmoid_bias", n_shared_experts=1, capacity_factor=1.0), 4, "expert"),
        (dict(router="sigmoid_bias", attention="mla", q_lora_rank=6, kv_lora_rank=5), 2, "expert"),
        (dict(renormalize=False, top_k=1, capacity_factor=1.0), 2, "data"),
        (dict(n_experts=0), 2, "data"),
    ],
    ids=[
        "mixtral-ep2",
        "dropout-noisy-ep2",
        "deepseek-capacity-ep4",
        "deepseek-v3-mla-ep2",
        "switch-dp2",
        "dense-dp2",
    ],
)
def test_training_steps_on_ranks_equal_one_process(kw, P, mode):
    one, one_losses, ranks = _train(_tiny(**kw), P, mode)
    for losses, *_ in ranks:
        assert np.allclose(losses, one_losses, rtol=EXACT, atol=0)
    full, fopt, standalone = ranks[0][1], ranks[0][2], ranks[0][3]
    assert ranks[1][1] is None and ranks[1][3] is None  # only rank 0 gets the whole model
    state = fopt.state_dict()
    assert state["t"] == one.opt.t
    for k, v in one.params.items():
        assert full.params[k].shape == v.shape
        assert rel_error(full.params[k], v) < EXACT, k
        assert rel_error(standalone.params[k], v) < EXACT, k
        assert rel_error(state["m"][k], one.opt.m[k]) < EXACT, k
        assert rel_error(state["v"][k], one.opt.v[k]) < EXACT, k
    for k, v in one.buffers.items():
        assert rel_error(full.buffers[k], v) < EXACT, k


def test_expert_parallel_ranks_store_only_their_experts():
    c = _tiny()

    def rank(comm):
        model = GPT(c, seed=1, dtype="float64")
        opt = AdamW(model.params)
        full = {k: v.copy() for k, v in model.params.items()}
        dist.World(comm).attach(model, opt, "expert")
        r = comm.Get_rank()
        w1 = "blocks.0.moe.experts.w1"
        assert model.params[w1].shape[0] == opt.m[w1].shape[0] == 2
        assert array_equal(model.params[w1], full[w1][2 * r : 2 * r + 2])
        assert model.params["wte"].shape == full["wte"].shape
        return True

    assert run_ranks(2, rank) == [True, True]


# ------------------------------------------------------------------------------------------------
# GPU: device buffers with a CUDA-aware MPI, host staging otherwise (fake CuPy)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_buffers", [False, True], ids=["host-staging", "cuda-aware"])
def test_exchange_of_device_arrays(device_buffers, monkeypatch):
    c = _layer_config(**LAYERS["mixtral"])
    rng = np.random.default_rng(3)
    p = moe.init_params(c, "moe.", rng, c.init_std, c.init_std)
    h = rng.standard_normal((4, 4, c.n_embd))
    want = moe.moe_forward(c.replace(capacity_groups=2), h, p, {}, "moe.", None, False)[0]
    seen, syncs = set(), []
    with fake_cupy.installed() as cp:
        cp.cuda.get_current_stream = lambda: SimpleNamespace(synchronize=lambda: syncs.append(1))
        fake_cupy.transfers.clear()
        hd = cp.asarray(h)

        def rank(comm):
            r, g = comm.Get_rank(), exchange.Group(comm, expert_parallel=True, device_buffers=device_buffers)
            mine = {k: cp.asarray(v[r * 2 : r * 2 + 2] if ".experts." in k else v) for k, v in p.items()}
            y, cache, _ = moe.moe_forward(c, g.local_rows(hd), mine, {}, "moe.", None, False, g)
            grads = {}
            moe.moe_backward(c, y, cache, "moe.", grads)
            return backend.is_cupy_array(y) and all(backend.is_cupy_array(v) for v in grads.values()), y.get()

        out = run_ranks(2, rank, seen)
        transfers = dict(fake_cupy.transfers)
    assert all(ok for ok, _ in out)  # results stay on the device
    assert rel_error(np.concatenate([y for _, y in out]), want) < EXACT
    if device_buffers:
        assert "cupy" in seen and syncs  # MPI was handed device memory, after a synchronisation
    else:
        assert seen == {"numpy"} and transfers.get("get", 0) > 0  # staged through the host, explicitly


@pytest.mark.parametrize("aware", ["0", "1"])
def test_training_step_on_device_ranks(aware, monkeypatch, restore_backend):
    """A whole step on 2 expert-parallel ranks with CuPy arrays: the start-up line says how MPI
    gets them, everything stays on the device, and the result is the numpy one."""
    monkeypatch.setenv("MINIMOE_CUDA_AWARE_MPI", aware)
    c = _tiny()
    x = np.random.default_rng(0).integers(0, c.vocab_size, (4, c.block_size))
    y = np.roll(x, -1, axis=1)

    def rank(comm):
        model = GPT(c, seed=1, dtype="float64")
        opt = AdamW(model.params)
        w = dist.World(comm)
        w.attach(model, opt, "expert")
        train_step(model, opt, x, y, 1e-2, 0.05, world=w)
        on_device = all(backend.is_cupy_array(v) for v in [*model.params.values(), *model.grads.values()])
        return w.describe(model), on_device, w.full_state(model, opt)[0]

    backend.set_backend("numpy")
    want = run_ranks(2, rank)[0][2].params  # numpy
    with fake_cupy.installed() as cp:
        cp.cuda.get_current_stream = lambda: SimpleNamespace(synchronize=lambda: None)
        backend.set_backend("cupy")
        out = run_ranks(2, rank)
    said = "device buffers (CUDA-aware MPI)" if aware == "1" else "host buffers (MPI is not CUDA-aware)"
    assert all(said in line for line, _, _ in out)
    assert all(on_device for _, on_device, _ in out)
    for k, v in want.items():
        assert rel_error(out[0][2].params[k], v) < EXACT, k


def test_cuda_awareness_can_be_forced(monkeypatch):
    monkeypatch.setenv("MINIMOE_CUDA_AWARE_MPI", "1")
    assert dist.cuda_aware_mpi()
    monkeypatch.setenv("MINIMOE_CUDA_AWARE_MPI", "0")
    assert not dist.cuda_aware_mpi()


# ------------------------------------------------------------------------------------------------
# launch, layout, failures
# ------------------------------------------------------------------------------------------------


def test_launch_is_detected_from_the_launchers_environment():
    assert dist.launched({}) == (1, 0)
    assert dist.launched({"PMI_SIZE": "4", "PMI_RANK": "3"}) == (4, 3)  # MPICH / Intel MPI (hydra)
    assert dist.launched({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == (2, 1)  # Open MPI


def test_without_a_launcher_nothing_changes(monkeypatch):
    for size, _ in dist.LAUNCHER_ENV:
        monkeypatch.delenv(size, raising=False)
    monkeypatch.delenv("MINIMOE_MPI", raising=False)
    monkeypatch.setattr(dist, "_WORLD", {})
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # not even imported
    assert dist.world() is None


def test_a_launch_without_mpi4py_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setattr(dist, "_WORLD", {})
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(dist.DistError, match=r"2 ranks, but mpi4py is not installed.*minimoe\[dist\]"):
        dist.world()


def test_cli_error_is_printed_by_rank_0_only(monkeypatch, capsys):
    from minimoe import cli

    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(dist, "_WORLD", {})
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    argv = ["train", "--max-iters", "1"]
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("PMI_RANK", rank)
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert (err.count("error:") == 1) if printed else err == ""


def test_layout_errors_name_the_flag():
    moe_cfg, dense = _tiny(), _tiny(n_experts=0)
    assert dist.choose_mode(moe_cfg, 2, None) == "expert"
    assert dist.choose_mode(moe_cfg, 3, None) == "data"  # 4 experts do not split 3 ways
    assert dist.choose_mode(dense, 2, None) == "data"
    with pytest.raises(
        OptionError, match=r"--parallel expert .* 4 is not divisible by 3 ranks: launch 2 or 4"
    ):
        dist.choose_mode(moe_cfg, 3, "expert")
    with pytest.raises(OptionError, match="dense"):
        dist.choose_mode(dense, 2, "expert")
    with pytest.raises(OptionError, match=r"--batch-size = 6 .* multiple of 4"):
        dist.check_layout(6, 4)
    dist.check_layout(8, 4)


def test_parallel_option_is_checked():
    from minimoe.options import DEFAULTS, check_options

    with pytest.raises(OptionError, match="--parallel"):
        check_options(DEFAULTS.__class__(**{**DEFAULTS.__dict__, "parallel": "pipeline"}))


@pytest.mark.parametrize(
    "failures, expect",
    [
        ({1: dist.DistError("no such file")}, r"rank 1 failed during set-up: no such file"),
        ({0: OptionError("bad flag"), 1: OptionError("bad flag")}, r"^bad flag$"),
        ({1: ZeroDivisionError("a bug")}, r"rank 1 failed during set-up with a bug: a bug"),
    ],
)
def test_set_up_errors_stop_every_rank(failures, expect):
    def rank(comm):
        try:
            with dist.together(dist.World(comm)):
                if comm.Get_rank() in failures:
                    raise failures[comm.Get_rank()]
        except Exception as e:
            return e
        return None

    errors = run_ranks(2, rank)
    for r, e in enumerate(errors):
        if isinstance(failures.get(r), ZeroDivisionError):
            assert isinstance(e, ZeroDivisionError)  # the bug itself, with its traceback, on its rank
        else:
            assert isinstance(e, UserError) and re.search(expect, str(e)), (r, e)


def test_guard_aborts_every_rank_on_an_exception(capsys):
    def rank(comm):
        w = dist.World(comm)
        with pytest.raises(SystemExit, match="Abort"):  # thread_comm's Abort
            with dist.guard(w):
                raise RuntimeError("broken batch")
        with pytest.raises(KeyboardInterrupt):  # an agreed stop passes through
            with dist.guard(w):
                raise KeyboardInterrupt
        return True

    assert run_ranks(1, rank) == [True]
    err = capsys.readouterr().err
    assert "error: rank 0: broken batch; stopping every rank" in err and "Traceback" in err


def test_watchdog_aborts_when_no_step_finishes():
    aborted = []
    w = SimpleNamespace(rank=1, comm=SimpleNamespace(Abort=lambda code: aborted.append(code)))
    with dist.Watchdog(w, timeout=0.3) as dog:
        for _ in range(4):
            time.sleep(0.1)
            dog.beat()
        assert not aborted  # beating in time
        time.sleep(1.0)
    assert aborted == [1]


# ------------------------------------------------------------------------------------------------
# the cost model of `minimoe info --expert-parallel`
# ------------------------------------------------------------------------------------------------


def test_cost_model_counts_the_all_to_all_bytes():
    from minimoe.info import expert_parallel_cost
    from minimoe.presets import get_preset

    mixtral = get_preset("mixtral-8x7b")  # 32 MoE layers, K = 2, C = 4096, 8 experts
    d = expert_parallel_cost(mixtral, 8, 4096)
    assert d["all_to_all_bytes_per_device"] == 4 * 32 * 4096 * 2 * 4096 * 2 * 7 / 8
    assert d["all_to_all_bytes_between_nodes"] == 0 and d["experts_per_device"] == 1  # one node of 8
    d16 = expert_parallel_cost(mixtral, 16, 4096)  # each expert on 2 devices, 2 nodes
    assert d16["experts_per_device"] == 0.5
    assert d16["all_to_all_bytes_between_nodes"] == pytest.approx(4 * 32 * 4096 * 2 * 4096 * 2 * 8 / 16)
    # compute and traffic both grow with T: their ratio is the model's
    small, big = (expert_parallel_cost(mixtral, 16, T) for T in (512, 8192))
    assert small["all_to_all_over_compute"] == pytest.approx(big["all_to_all_over_compute"])
    assert small["grad_allreduce_bytes_per_device"] == big["grad_allreduce_bytes_per_device"]
    with pytest.raises(OptionError, match="--expert-parallel = 3"):
        expert_parallel_cost(mixtral, 3, 4096)
    with pytest.raises(OptionError, match="dense"):
        expert_parallel_cost(get_preset("gpt3-175b"), 8, 4096)


def test_info_prints_the_cost_of_expert_parallelism(capsys):
    from minimoe import cli

    argv = ["info", "--preset", "mixtral-8x7b", "--expert-parallel", "8", "--tokens", "4096"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "expert parallel over 8 devices (1 of the 8 experts" in out
    assert "= 7.52 GB per device per step" in out and "the matmuls limit" in out
    assert cli.main([*argv, "--network-gbs", "1", "--node-gbs", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["expert_parallel"]
    assert d["all_to_all_s"] == pytest.approx(d["all_to_all_bytes_per_device"] / 1e9)
    assert cli.main([*argv, "--tokens", "0"]) == 2
    assert "--tokens = 0" in capsys.readouterr().err
