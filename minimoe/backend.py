"""The one place that knows whether arrays live in NumPy (CPU) or CuPy (GPU).

Ops never import numpy for array math: they ask `xp_of(x)` for the module of the arrays they
were given, so the same code runs on either backend. Everything that differs between the two
libraries is wrapped here, once: host<->device copies, random numbers, scatter-add, stable sorting,
floating-point warnings and erf.

    MINIMOE_BACKEND=cupy python ...      # or
    minimoe.set_backend("cupy")

float32 is the default dtype for parameters and activations; gradient checks use float64.
"""

from __future__ import annotations

import math
import os

import numpy

from minimoe.errors import BackendError, OptionError

_VALID_BACKENDS = ("numpy", "cupy")
DTYPES = ("float32", "float64")  # the float types minimoe trains and checks in

_state = {"name": "numpy", "xp": numpy, "dtype": "float32"}


def _load_cupy():
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        raise BackendError(
            f"backend 'cupy' was requested but CuPy cannot be imported ({type(e).__name__}: {e}); "
            "install it with `pip install minimoe[gpu]` on a machine with an NVIDIA GPU, or use 'numpy'"
        ) from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise BackendError(
            f"backend 'cupy' was requested but no CUDA device is usable ({type(e).__name__}: {e}); "
            "use backend 'numpy' on this machine"
        ) from None
    if n < 1:
        raise BackendError("backend 'cupy' was requested but CUDA reports 0 devices; use backend 'numpy'")
    return cupy


def set_backend(name: str) -> None:
    """Select the array library for new arrays: 'numpy' (default) or 'cupy'."""
    if name not in _VALID_BACKENDS:
        raise OptionError(f"backend must be one of {_VALID_BACKENDS}, got {name!r}")
    _state["xp"] = numpy if name == "numpy" else _load_cupy()
    _state["name"] = name


def get_backend() -> str:
    """The name of the current backend, 'numpy' or 'cupy'."""
    return _state["name"]


def get_xp():
    """The array module of the current backend (numpy or cupy)."""
    return _state["xp"]


def set_default_dtype(dtype: str) -> None:
    """Set the default float dtype for new parameters: 'float32' (default) or 'float64'."""
    name = numpy.dtype(dtype).name if dtype in (numpy.float32, numpy.float64) else dtype
    if name not in DTYPES:
        raise OptionError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _state["dtype"] = name


def get_default_dtype() -> str:
    return _state["dtype"]


def xp_of(*arrays):
    """The array module (numpy or cupy) of the given arrays; numpy for plain Python values."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy

            return cupy
    return numpy


def is_cupy_array(a) -> bool:
    return type(a).__module__.startswith("cupy")


def to_numpy(a):
    """Copy an array to the host as numpy (no copy when it already is numpy)."""
    if is_cupy_array(a):
        return a.get()
    return numpy.asarray(a)


def to_device(a, xp=None, dtype=None):
    """Move a host array to the current (or given) backend, optionally casting."""
    xp = xp or get_xp()
    if xp is numpy:
        return numpy.asarray(to_numpy(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def synchronize(a) -> None:
    """Wait until the device has finished the work queued for array a (no-op for numpy): needed
    before a library outside CuPy reads device memory directly (a CUDA-aware MPI)."""
    if is_cupy_array(a):
        xp_of(a).cuda.get_current_stream().synchronize()


def make_rng(seed, xp=None):
    """A random Generator of the backend's own library (so random numbers are made on the device)."""
    xp = xp or get_xp()
    return xp.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Operations whose spelling differs between numpy and cupy
# ---------------------------------------------------------------------------------------------


def scatter_add(target, indices, values):
    """target[indices[i]] += values[i] for every i, repeated indices accumulating (in place).

    target (V, ...), indices (N,) integer, values (N, ...); returns target. `ufunc.at` is the
    unbuffered form of `+=` that numpy and CuPy (13+, an atomic-add kernel) both spell
    `xp.add.at`; a plain `target[indices] += values` would keep only one update per repeated index.
    """
    xp_of(target).add.at(target, indices, values)
    return target


def segment_sum(values, indices, n: int):
    """out[j] = sum of values[i] over every i with indices[i] == j, for j < n: a new array.

    values (N, ...), indices (N,) integer -> (n, ...); rows no index points at are 0. The same
    numbers as scatter_add into zeros.
    CuPy: scatter_add, an atomic-add kernel.
    NumPy: its `add.at` works element by element and is slow, so we sort the positions by index
    (stably) and sum each run of equal indices with `add.reduceat` (the same sums, added in the
    same order); each row that occurs is then written once.
    """
    xp = xp_of(values)
    out = xp.zeros((n, *values.shape[1:]), dtype=values.dtype)
    if is_cupy_array(values) or indices.size == 0:
        return scatter_add(out, indices, values)
    order = argsort_stable(indices)
    sorted_idx = indices[order]
    starts = xp.flatnonzero(xp.concatenate([[True], sorted_idx[1:] != sorted_idx[:-1]]))
    out[sorted_idx[starts]] = xp.add.reduceat(values[order], starts, axis=0)
    return out


def argsort_stable(x, axis=-1):
    """Indices that sort x along `axis`, equal values keeping their original order.

    numpy's default sort (quicksort) is not stable, so we ask for kind="stable"; CuPy's sort is
    always stable and takes no `kind`.
    """
    xp = xp_of(x)
    if is_cupy_array(x):
        return xp.argsort(x, axis=axis)
    return xp.argsort(x, axis=axis, kind="stable")


def topk_indices(x, k: int):
    """Indices of the k largest entries along the last axis, largest first.

    x (..., E) -> (..., k) integer. Ties go to the smaller index (a stable sort of -x), so the
    choice is deterministic and identical on numpy and cupy.
    E is small (experts), so a full sort costs little and is easier to trust than argpartition.
    """
    return argsort_stable(-x, axis=-1)[..., :k]


def ignore_overflow():
    """A context in which float overflow (exp(800) = inf, say) raises no warning.

    Only numpy warns about floating-point errors; CuPy never does, so numpy's errstate is all
    either backend needs.
    """
    return numpy.errstate(over="ignore")


# erf: numpy has none (scipy is not a dependency); cupy has one in cupyx.scipy.special.
_SQRT_PI = math.sqrt(math.pi)


def erf(x):
    """The error function erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt, elementwise.

    On numpy we evaluate it ourselves to float64 accuracy (~1e-15), so the exact GELU and its
    backward (which uses d erf/dx = 2/sqrt(pi) exp(-x^2)) agree to the last digits:
      |x| < 2.5 : erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n 2^n x^(2n+1) / (1*3*...*(2n+1))
                  (all terms positive, so no cancellation; 60 terms suffice)
      |x| >= 2.5: erfc(x) by its continued fraction, evaluated bottom-up with 60 levels:
                  erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + ...)))))
    """
    xp = xp_of(x)
    if xp is not numpy:
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)
    dtype = x.dtype
    z = numpy.abs(x.astype(numpy.float64))
    small = z < 2.5
    out = numpy.empty_like(z)
    zs = z[small]
    if zs.size:
        z2 = zs * zs
        term = zs.copy()
        total = zs.copy()
        for n in range(1, 60):
            term *= 2.0 * z2 / (2 * n + 1)
            total += term
        out[small] = 2.0 / _SQRT_PI * numpy.exp(-z2) * total
    zl = z[~small]
    if zl.size:
        frac = numpy.zeros_like(zl)
        for n in range(60, 0, -1):
            frac = (n / 2.0) / (zl + frac)
        erfc = numpy.exp(-zl * zl) / _SQRT_PI / (zl + frac)
        out[~small] = 1.0 - erfc
    return (numpy.sign(x) * out).astype(dtype, copy=False)


def _init_from_env():
    name = os.environ.get("MINIMOE_BACKEND", "").strip().lower()
    if name:
        set_backend(name)
    dtype = os.environ.get("MINIMOE_DTYPE", "").strip().lower()
    if dtype:
        set_default_dtype(dtype)


_init_from_env()
