"""A numpy-backed stand-in for `cupy`, for tests only: it catches host/device mixing without a GPU.

    with fake_cupy.installed():      # sys.modules["cupy"], ["cupyx"], ... replaced
        backend.set_backend("cupy")
    fake_cupy.install()              # the same for the rest of the process (a test session)

Its `ndarray` wraps a numpy array and, like real CuPy, refuses to become numpy implicitly:
`numpy.asarray(a)` and numpy functions or ufuncs on it raise TypeError. It is STRICTER than
CuPy in one way: a numpy array handed to a cupy function (other than asarray/array), to an
operator, or used as an index or assigned value raises too, since each would be a silent
host -> device copy. Every device -> host copy (`.get()`, `float()`, `int()`, `bool()`,
`.item()`, `.tolist()`) is counted in `transfers`, by kind.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import types

import numpy

transfers: collections.Counter = collections.Counter()
_HOST_OK = ("asarray", "array")  # the explicit host -> device copies


_PLAIN = (int, float, bool, str, slice, type(None), type(Ellipsis), numpy.dtype, type)  # passed as they are


def _unwrap(x, where: str):
    """Wrapped arrays -> their numpy array (recursively in lists/tuples/dicts); numpy arrays refused."""
    t = type(x)
    if t is ndarray:
        return x._a
    if t in _PLAIN:
        return x
    if t is numpy.ndarray:
        raise TypeError(f"fake cupy: a host numpy array was passed to {where} (a hidden host->device copy)")
    if t is tuple or t is list:
        return t([_unwrap(v, where) for v in x])
    return _unwrap_other(x, where)


def _unwrap_other(x, where):
    """_unwrap for the rarer types (subclasses, dicts): the general isinstance tests."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, numpy.ndarray):
        raise TypeError(f"fake cupy: a host numpy array was passed to {where} (a hidden host->device copy)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, where) for k, v in x.items()}
    return x


def _wrap(x):
    """numpy results -> device results: arrays and scalars become ndarray (cupy reductions give 0-d arrays)."""
    t = type(x)
    if t is numpy.ndarray:
        return ndarray(x)
    if isinstance(x, numpy.ndarray):
        return ndarray(x)
    if isinstance(x, numpy.generic):
        return ndarray(numpy.asarray(x))
    if t is tuple:
        return tuple([_wrap(v) for v in x])
    if t is list:
        return [_wrap(v) for v in x]
    if isinstance(x, numpy.random.Generator):
        return _Proxy(x, "Generator")
    return x


class _Proxy:
    """A numpy callable/namespace seen through the device: arguments unwrapped, results wrapped."""

    def __init__(self, obj, name, host_ok=None):
        self._obj, self._name = obj, name
        self._host_ok = name.split(".")[-1] in _HOST_OK if host_ok is None else host_ok

    def __call__(self, *args, **kwargs):
        if self._host_ok:
            out = self._obj(*(_unwrap_soft(a) for a in args), **kwargs)
            return ndarray(out if isinstance(args[0], ndarray) else out.copy())  # host data: a copy
        if kwargs:
            kwargs = {k: _unwrap(v, self._name) for k, v in kwargs.items()}
        return _wrap(self._obj(*_unwrap(args, self._name), **kwargs))

    def __getattr__(self, name):
        attr = getattr(self._obj, name)
        if isinstance(attr, type):
            return attr  # dtypes (float32, int64, ...)
        if callable(attr) or isinstance(attr, types.ModuleType):
            attr = _Proxy(attr, f"{self._name}.{name}")
        if isinstance(self._obj, types.ModuleType):
            setattr(self, name, attr)  # a module's functions do not change: look each up once
        return attr


def _unwrap_soft(x):
    """For asarray/array: host data is welcome (an explicit copy), device arrays inside lists unwrapped."""
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap_soft(v) for v in x)
    return x._a if isinstance(x, ndarray) else x


class ndarray:  # noqa: N801 (cupy's spelling)
    __module__ = "cupy"  # backend.xp_of tells the backends apart by this
    __array_ufunc__ = None  # numpy ufuncs on a device array: TypeError
    __hash__ = None

    made = 0  # device arrays made so far in this process (tells whether a test ran on the "device")

    def __init__(self, a):
        self._a = a
        ndarray.made += 1

    def __array__(self, *args, **kwargs):
        raise TypeError("fake cupy: implicit conversion to a numpy array is not allowed; use .get()")

    def __array_function__(self, func, types, args, kwargs):
        return NotImplemented  # numpy functions on a device array: TypeError

    # device -> host copies, counted
    def get(self):
        transfers["get"] += 1
        return self._a.copy()

    def _scalar(self, kind, conv):
        transfers[kind] += 1
        return conv(self._a)

    def __float__(self):
        return self._scalar("float", float)

    def __int__(self):
        return self._scalar("int", int)

    def __index__(self):
        return self._scalar("index", lambda a: a.__index__())

    def __bool__(self):
        return self._scalar("bool", bool)

    def item(self):
        return self._scalar("item", lambda a: a.item())

    def tolist(self):
        return self._scalar("tolist", lambda a: a.tolist())

    # metadata lives on the host in CuPy too
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    T = property(lambda self: ndarray(self._a.T))

    # everything else: numpy's method or attribute, results kept on the "device"
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        return _Proxy(attr, f"ndarray.{name}", host_ok=False) if callable(attr) else _wrap(attr)

    def argsort(self, axis=-1, kind=None):
        return ndarray(numpy.argsort(self._a, axis=axis, kind="stable"))

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "an index")])

    def __setitem__(self, key, value):
        self._a[_unwrap(key, "an index")] = _unwrap(value, "an assignment")

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return f"fake_cupy.{self._a!r}"


def _binary(name):
    def op(self, other):
        result = getattr(self._a, name)(_unwrap(other, f"operator {name}"))
        return NotImplemented if result is NotImplemented else _wrap(result)

    return op


def _inplace(name):
    def op(self, other):
        getattr(self._a, name)(_unwrap(other, f"operator {name}"))
        return self

    return op


_OPS = "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift".split()
for _n in _OPS:
    setattr(ndarray, f"__{_n}__", _binary(f"__{_n}__"))
    setattr(ndarray, f"__r{_n}__", _binary(f"__r{_n}__"))
    setattr(ndarray, f"__i{_n}__", _inplace(f"__i{_n}__"))
for _n in "lt le gt ge eq ne".split():
    setattr(ndarray, f"__{_n}__", _binary(f"__{_n}__"))
for _n in "neg pos abs invert".split():
    setattr(ndarray, f"__{_n}__", lambda self, _n=_n: _wrap(getattr(self._a, f"__{_n}__")()))


def _make_modules() -> dict:
    """Fresh `cupy`, `cupyx`, `cupyx.scipy`, `cupyx.scipy.special` module objects."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = ndarray
    cupy.random = _Proxy(numpy.random, "random")
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        # nothing runs asynchronously: waiting for the device is a no-op
        Device=lambda *args: types.SimpleNamespace(synchronize=lambda: None),
        get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None),
    )
    cupy.asnumpy = lambda a: a.get() if isinstance(a, ndarray) else numpy.asarray(a)
    np_proxy = _Proxy(numpy, "cupy")
    cupy.__getattr__ = lambda name: getattr(np_proxy, name)  # PEP 562 module __getattr__
    # CuPy's sort is always stable (numpy's default quicksort is not): mimic it
    cupy.argsort = lambda a, axis=-1, kind=None: ndarray(numpy.argsort(a._a, axis=axis, kind="stable"))

    def scatter_add(target, indices, values):
        numpy.add.at(target._a, _unwrap(indices, "scatter_add"), _unwrap(values, "scatter_add"))

    def erf(x):
        from minimoe import backend  # the numpy series, on the wrapped array

        return ndarray(backend.erf(x._a))

    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add = scatter_add
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.special = types.ModuleType("cupyx.scipy.special")
    cupyx.scipy.special.erf = erf
    return {
        "cupy": cupy,
        "cupyx": cupyx,
        "cupyx.scipy": cupyx.scipy,
        "cupyx.scipy.special": cupyx.scipy.special,
    }


def install():
    """Put the fake modules into sys.modules for good (a whole test session) and return `cupy`."""
    mods = _make_modules()
    sys.modules.update(mods)
    return mods["cupy"]


@contextlib.contextmanager
def installed():
    """Put the fake modules into sys.modules (restored afterwards) and yield the fake `cupy`."""
    mods = _make_modules()
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield mods["cupy"]
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
