"""The backend: choosing numpy/cupy, dtypes, the helpers whose spelling differs between the two
libraries, and that ops really take their array module from their inputs."""

import ast
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import fake_cupy
import numpy as np
import pytest
from conftest import (
    asarray,
    assert_allclose,
    assert_array_equal,
    on_host_only,
    rand_ids,
    tiny_config,
    to_numpy,
    xp,
)

import minimoe
from minimoe import GPT, backend

OPS_DIR = Path(minimoe.__file__).parent / "ops"


def _gpu_usable() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Choosing the backend and dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nope", "NumPy", "torch", ""])
def test_unknown_backend_is_a_value_error(restore_backend, name):
    before = backend.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_backend(name)
    assert backend.get_backend() == before  # unchanged


@on_host_only("CuPy (real or fake) is importable there, so set_backend('cupy') succeeds")
def test_cupy_without_gpu_is_a_clear_backend_error(restore_backend):
    if _gpu_usable():
        pytest.skip("a CUDA GPU is usable here, so set_backend('cupy') succeeds")
    with pytest.raises(minimoe.BackendError) as exc:
        backend.set_backend("cupy")
    msg = str(exc.value)
    assert "cupy" in msg and "numpy" in msg and "\n" not in msg
    assert backend.get_backend() == "numpy" and backend.get_xp() is np  # still usable afterwards
    assert issubclass(minimoe.BackendError, RuntimeError)


def test_fresh_process_defaults_to_numpy_float32():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIMOE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(OPS_DIR.parents[1]), env.get("PYTHONPATH", "")])
    code = "import minimoe; print(minimoe.get_backend(), minimoe.get_default_dtype())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["numpy", "float32"]


def test_env_selects_dtype_and_rejects_bad_values():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIMOE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(OPS_DIR.parents[1]), env.get("PYTHONPATH", "")])
    code = "import minimoe; print(minimoe.get_default_dtype())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "MINIMOE_DTYPE": "float64"}, capture_output=True, text=True
    )
    assert out.stdout.split() == ["float64"]
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "MINIMOE_BACKEND": "nope"}, capture_output=True, text=True
    )
    assert out.returncode != 0 and "backend must be one of" in out.stderr


def test_model_dtypes(restore_backend):
    backend.set_default_dtype("float32")
    model = GPT(tiny_config("llama"), seed=0)
    assert model.dtype == "float32" and all(p.dtype == np.float32 for p in model.params.values())
    model64 = GPT(tiny_config("llama"), seed=0, dtype="float64")
    assert all(p.dtype == np.float64 for p in model64.params.values())
    # the same seed gives the same initial numbers in either dtype
    for k in model.params:
        assert_array_equal(model.params[k], model64.params[k].astype(np.float32))
    backend.set_default_dtype(np.float64)  # a numpy dtype is accepted too
    assert backend.get_default_dtype() == "float64"
    assert all(p.dtype == np.float64 for p in GPT(tiny_config(), seed=0).params.values())
    with pytest.raises(ValueError, match="dtype must be one of"):
        backend.set_default_dtype("float16")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(flavour="gpt2", dropout=0.1),
        dict(flavour="llama", n_kv_head=2, dropout=0.1),
        dict(flavour="gpt2", activation="gelu_exact", tie_embeddings=False),
    ],
)
def test_float32_model_stays_float32(overrides):
    # no op may silently upcast: float64 intermediates would double memory and slow a GPU down
    model = GPT(tiny_config(**overrides), seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    logits, loss = model.forward(rand_ids(rng, 11), rand_ids(rng, 11))
    assert logits.dtype == np.float32 and loss.dtype == np.float32
    grads = model.backward()
    assert {k: g.dtype for k, g in grads.items()} == {k: np.dtype(np.float32) for k in model.params}
    assert all(np.isfinite(to_numpy(g)).all() for g in grads.values())


# ---------------------------------------------------------------------------------------------
# Helpers whose spelling differs between numpy and cupy
# ---------------------------------------------------------------------------------------------


def test_erf_matches_math_erf():
    x = np.concatenate(
        [np.linspace(-7.0, 7.0, 2801), [2.5 - 1e-12, 2.5, 2.5 + 1e-12, -2.5, 1e-8, -1e-300, 0.0, 30.0, -40.0]]
    )
    got = backend.erf(asarray(x))
    expected = np.array([math.erf(v) for v in x])
    assert np.abs(to_numpy(got) - expected).max() <= 1e-14
    assert got.dtype == np.float64
    assert_array_equal(backend.erf(asarray(-x)), -got)  # odd
    assert to_numpy(backend.erf(asarray([np.inf, -np.inf]))).tolist() == [1.0, -1.0]
    x32 = x.astype(np.float32)
    assert backend.erf(asarray(x32)).dtype == np.float32
    assert_allclose(backend.erf(asarray(x32)), [math.erf(v) for v in x32.astype(np.float64)], atol=1e-7)


def test_topk_indices_largest_first_and_ties_to_smaller_index():
    x = asarray([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, -1.0, 5.0, 4.0, 5.0]])
    idx = backend.topk_indices(x, 2)
    assert to_numpy(idx).tolist() == [[1, 2], [0, 1], [2, 4]]
    assert to_numpy(backend.topk_indices(x, 4)).tolist() == [[1, 2, 4, 0], [0, 1, 2, 3], [2, 4, 3, 0]]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, (6, 7, 8)).astype(np.float64)  # many ties
    a, b = backend.topk_indices(asarray(y), 3), backend.topk_indices(asarray(y.copy()), 3)
    assert_array_equal(a, b)
    assert a.shape == (6, 7, 3)
    a = to_numpy(a)
    chosen = np.take_along_axis(y, a, axis=-1)
    assert np.all(chosen[..., :-1] >= chosen[..., 1:])  # sorted, largest first
    assert np.all(np.sort(y, axis=-1)[..., -3:][..., ::-1] == chosen)  # really the top 3
    # among equal values, indices increase
    same = chosen[..., :-1] == chosen[..., 1:]
    assert np.all(a[..., 1:][same] > a[..., :-1][same])


def test_scatter_add_accumulates_repeats():
    target = xp().zeros((4, 2))
    backend.scatter_add(target, asarray([1, 3, 1, 1]), xp().arange(8.0).reshape(4, 2))
    assert_array_equal(target, [[0, 0], [0 + 4 + 6, 1 + 5 + 7], [0, 0], [2, 3]])


@pytest.mark.parametrize("shape", [(40, 3), (40,), (1, 5), (0, 3)])
def test_segment_sum_equals_add_at_into_zeros(shape):
    # the numpy path sorts and uses add.reduceat: it must give np.add.at's sums for any number of
    # repeats (and zero rows for ids that never occur, and for no positions at all)
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 7, shape[0])
    values = rng.standard_normal(shape)
    expected = np.zeros((9, *shape[1:]))  # ids 7 and 8 never occur
    np.add.at(expected, indices, values)
    got = backend.segment_sum(asarray(values), asarray(indices), 9)
    assert got.shape == expected.shape and got.dtype == values.dtype
    assert_allclose(got, expected, rtol=1e-14, atol=1e-15)
    assert_array_equal(to_numpy(got)[np.setdiff1d(np.arange(9), indices)], 0.0)
    assert backend.segment_sum(asarray(values.astype(np.float32)), asarray(indices), 9).dtype == np.float32


def test_argsort_stable_keeps_the_order_of_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, (5, 40))  # many ties: quicksort would reorder them
    for axis in (-1, 0):
        order = to_numpy(backend.argsort_stable(asarray(x), axis=axis))
        assert_array_equal(order, np.argsort(x, axis=axis, kind="stable"))
        s = np.take_along_axis(x, order, axis=axis)
        assert np.all(np.diff(s, axis=axis) >= 0)
    order = backend.argsort_stable(asarray([2, 0, 2, 1, 0, 2]))
    assert to_numpy(order).tolist() == [1, 4, 3, 0, 2, 5]  # equal values stay in index order


def test_ignore_overflow_silences_only_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with backend.ignore_overflow():
            assert np.exp(np.array([1000.0]))[0] == np.inf
        with pytest.raises(RuntimeWarning):  # outside the context numpy still warns
            np.exp(np.array([1000.0]))
        with backend.ignore_overflow(), pytest.raises(RuntimeWarning):  # and other errors still warn
            np.array([1.0]) / np.array([0.0])


def test_backend_helpers_on_a_device_array():
    # on (fake) CuPy arrays the helpers take the device path: results stay on the device, the
    # numbers equal numpy's, and nothing is copied to the host
    rng = np.random.default_rng(2)
    indices, values = rng.integers(0, 5, 30), rng.standard_normal((30, 2))
    x = rng.integers(0, 3, 50).astype(np.float64)
    expected = np.zeros((5, 2))
    np.add.at(expected, indices, values)
    with fake_cupy.installed() as cp:
        fake_cupy.transfers.clear()
        target = backend.scatter_add(cp.zeros((5, 2)), cp.asarray(indices), cp.asarray(values))
        sums = backend.segment_sum(cp.asarray(values), cp.asarray(indices), 5)
        order = backend.argsort_stable(cp.asarray(x))
        top = backend.topk_indices(cp.asarray(x.reshape(5, 10)), 3)
        assert all(backend.is_cupy_array(a) for a in (target, sums, order, top))
        assert sum(fake_cupy.transfers.values()) == 0
        assert_allclose(target.get(), expected, rtol=1e-14)
        assert_allclose(sums.get(), expected, rtol=1e-14)
        assert_array_equal(order.get(), np.argsort(x, kind="stable"))
        assert_array_equal(top.get(), backend.topk_indices(x.reshape(5, 10), 3))


def test_conversion_and_rng_helpers():
    a = np.arange(6.0).reshape(2, 3)
    assert backend.xp_of(a) is np and backend.xp_of(1.0, [1]) is np
    assert backend.to_numpy(a) is a
    b = backend.to_device(a, np, dtype="float32")
    assert b.dtype == np.float32 and backend.to_numpy(b).tolist() == a.tolist()
    r1, r2 = backend.make_rng(5, np), backend.make_rng(5, np)
    assert_array_equal(r1.random(4), r2.random(4))
    # the same on the session's backend (numpy, or a device): arrays and random draws stay there
    c = backend.to_device(a, dtype="float32")
    assert backend.xp_of(c) is xp() and c.dtype == np.float32 and to_numpy(c).tolist() == a.tolist()
    d1, d2 = backend.make_rng(5).random(4), backend.make_rng(5).random(4)
    assert backend.xp_of(d1) is xp()
    assert_array_equal(d1, d2)


# ---------------------------------------------------------------------------------------------
# Backend honesty: ops never reach for numpy themselves
# ---------------------------------------------------------------------------------------------


def _ops_sources():
    files = sorted(OPS_DIR.glob("*.py"))
    assert len(files) >= 10
    return files


@pytest.mark.parametrize("path", _ops_sources(), ids=lambda p: p.name)
def test_ops_do_not_use_numpy_directly(path):
    """Ops get xp from their inputs (backend.xp_of) so the same code runs on cupy arrays; a direct
    numpy call would either fail on the GPU or silently copy to the host."""
    tree = ast.parse(path.read_text(), filename=str(path))
    banned = {"numpy", "cupy", "cupyx", "scipy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
            assert not names & banned, f"{path.name}:{node.lineno} imports {names & banned}"
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in banned, (
                f"{path.name}:{node.lineno} from {node.module}"
            )
        elif isinstance(node, ast.Name):
            assert node.id not in {"np", "numpy", "cp", "cupy"}, f"{path.name}:{node.lineno} uses {node.id}"


@pytest.mark.parametrize("path", _ops_sources(), ids=lambda p: p.name)
def test_ops_do_not_branch_on_the_backend(path):
    """Every numpy/cupy difference lives in backend.py: no op asks which library it runs on, sets
    numpy's error state, or picks a sort algorithm (cupy's sort takes no `kind`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"is_cupy_array", "errstate", "__name__", "__module__"}, (
                f"{path.name}:{node.lineno} uses .{node.attr}"
            )
        elif isinstance(node, ast.keyword):
            assert node.arg != "kind", f"{path.name}:{node.lineno} passes kind= (use backend.argsort_stable)"
        elif isinstance(node, ast.Constant):
            assert node.value not in ("errstate", "numpy", "cupy"), (
                f"{path.name}:{node.lineno} {node.value!r}"
            )


class _CountingXP:
    """A stand-in array module: the backend's (numpy or cupy) underneath, counting what the ops ask of it."""

    def __init__(self, xp):
        self.calls, self._xp = {}, xp

    def __getattr__(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        return getattr(self._xp, name)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_ops_take_their_array_module_from_backend(monkeypatch, flavour):
    # Route backend.xp_of through a counting proxy: the model must compute the same numbers while
    # the ops fetch exp, sqrt, zeros, concatenate, ... from the proxy, not from numpy directly.
    model = GPT(tiny_config(flavour), seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    idx, targets = rand_ids(rng, 11), rand_ids(rng, 11)
    _, loss = model.forward(idx, targets)
    grads = {k: v.copy() for k, v in model.backward().items()}
    fake = _CountingXP(xp())
    monkeypatch.setattr(backend, "xp_of", lambda *arrays: fake)
    _, loss2 = model.forward(idx, targets)
    grads2 = model.backward()
    assert float(loss2) == float(loss)
    for k in grads:
        assert_array_equal(grads2[k], grads[k])
    used = set(fake.calls)
    assert {"exp", "sqrt", "zeros"} <= used, used
    if flavour == "llama":
        assert "concatenate" in used  # RoPE halves and the [dq | dk | dv] layout
