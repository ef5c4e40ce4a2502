"""Check helpers for the lessons' graded check cells: failures that teach.

Every check cell of a lesson tests one learner function, in this order: shapes and dtypes first,
then (for a backward) a float64 numerical gradient check, then a comparison with reference values
that `python -m minimoe.lessons build` computed with the package's own functions and stored beside
the lesson (`NN_slug.npz`). A check never calls the package's version of the function being
written, so a learner's function is judged on its own.

The only exception a check raises is `CheckFailed`, whose message is one line:

    "<function>, case <case>: <what is wrong> (<numbers>)"
    e.g. "softmax_topk_backward, case k=2 renormalize=True: gradient dlogits rel error 3.1e-01,
          expected < 1e-06"

    from minimoe.lessons.checks import CheckFailed, case, check_shape, check_close, check_gradient, reference

    with case("softmax_topk_forward", "k=2 renormalize=True"):   # learner code runs inside
        gates, idx, cache = softmax_topk_forward(logits, 2, True)
    check_shape("softmax_topk_forward", "k=2 renormalize=True", "gates", gates, (7, 2), "f")
    check_close("softmax_topk_forward", "k=2 renormalize=True", "gates", gates, reference("05", "gates"), 1e-10)

Relative errors are max-norm relative errors, max|a - b| / max(max|a|, max|b|) (see
`minimoe.gradcheck.rel_error`): scale free, and not fooled by entries that happen to be near zero.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import numpy

from minimoe import backend
from minimoe.gradcheck import rel_error

__all__ = ["CheckFailed", "case", "check_close", "check_gradient", "check_shape", "reference"]


class CheckFailed(Exception):
    """A lesson check failed; the message names the function, the case, and the numbers."""


def _fail(fn: str, case_name: str, what: str) -> CheckFailed:
    return CheckFailed(f"{fn}, case {case_name}: {what}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def case(fn: str, case_name: str):
    """Run learner code for one case of a check: any exception it raises becomes a CheckFailed
    naming the function, the case, and the original error's type and first line (the original
    stays attached as the cause, so its traceback still shows where it happened)."""
    try:
        yield
    except CheckFailed:
        raise
    except NotImplementedError as e:
        raise _fail(fn, case_name, f"not written yet (NotImplementedError: {_first_line(e)})") from e
    except Exception as e:
        detail = _first_line(e)
        raise _fail(fn, case_name, f"raised {type(e).__name__}" + (f": {detail}" if detail else "")) from e


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    if value is None:
        return "None"
    return f"a {type(value).__name__}"


def _as_host(value):
    """A NumPy view of an array on either backend (one explicit copy for CuPy), or None."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return numpy.asarray(backend.to_numpy(value))
    if isinstance(value, (bool, int, float, numpy.number, numpy.bool_)):
        return numpy.asarray(value)
    return None


_KIND_NAMES = {"f": "float", "i": "integer", "u": "unsigned integer", "b": "bool", "c": "complex"}


def check_shape(fn: str, case_name: str, name: str, array, shape, dtype_kind: str | None = None) -> None:
    """`array` must be an array (NumPy or CuPy) of exactly `shape`; with `dtype_kind`, its dtype's
    kind must be one of those letters (numpy's dtype.kind: "f" float, "i"/"u" integer, "b" bool).
    A Python or NumPy scalar counts as an array of shape ()."""
    shape = tuple(int(s) for s in shape)
    a = _as_host(array)
    if a is None:
        raise _fail(fn, case_name, f"{name} is {_describe(array)}, expected an array of shape {shape}")
    if a.shape != shape:
        raise _fail(fn, case_name, f"{name} has shape {a.shape}, expected {shape}")
    if dtype_kind is not None and a.dtype.kind not in dtype_kind:
        wanted = " or ".join(_KIND_NAMES.get(k, k) for k in dtype_kind)
        article = "an" if wanted[0] in "aeiou" else "a"
        raise _fail(fn, case_name, f"{name} has dtype {a.dtype}, expected {article} {wanted} dtype")


def _index(flat_i: int, shape) -> str:
    return str(tuple(int(i) for i in numpy.unravel_index(flat_i, shape))) if shape else "()"


def check_close(fn: str, case_name: str, name: str, got, expected, rtol: float, *, atol: float = 0.0) -> None:
    """`got` must equal `expected` to a max-norm relative error below `rtol` (rtol=0: exactly,
    the right test for integer indices, masks and counts), or, with `atol`, to an absolute error of
    at most `atol` (for values that should be 0, where a relative error means nothing). Shapes are
    compared first."""
    exp = _as_host(expected)
    if exp is None:
        raise TypeError(
            f"check_close: the expected value of {name} must be an array, got {_describe(expected)}"
        )
    check_shape(fn, case_name, name, got, exp.shape)
    g = _as_host(got)
    if rtol == 0 or exp.dtype.kind in "biu":
        wrong = numpy.flatnonzero(g.reshape(-1) != exp.reshape(-1))
        if wrong.size and exp.ndim == 0:
            raise _fail(fn, case_name, f"{name} is {g[()]}, expected {exp[()]}")
        if wrong.size:
            i = int(wrong[0])
            raise _fail(
                fn,
                case_name,
                f"{name} differs from the reference at {wrong.size} of {exp.size} entries "
                f"(first at {_index(i, exp.shape)}: got {g.reshape(-1)[i]}, expected {exp.reshape(-1)[i]})",
            )
        return
    if g.dtype.kind not in "fiub":
        raise _fail(fn, case_name, f"{name} has dtype {g.dtype}, expected numbers")
    if not numpy.all(numpy.isfinite(g)):
        n_bad = int((~numpy.isfinite(g)).sum())
        raise _fail(fn, case_name, f"{name} has {n_bad} non-finite entries (nan or inf) of {g.size}")
    err = rel_error(g, exp)
    diff = numpy.abs(g.astype(numpy.float64) - exp).reshape(-1)
    if not (err < rtol or (atol > 0 and diff.max(initial=0.0) <= atol)):
        i = int(diff.argmax())
        where = "" if exp.ndim == 0 else f"worst at {_index(i, exp.shape)}: "
        size = f"expected < {rtol:.0e}" + (f" or abs error <= {atol:.0e}" if atol > 0 else "")
        raise _fail(
            fn,
            case_name,
            f"{name} differs from the reference: rel error {err:.1e}, {size} "
            f"({where}got {g.reshape(-1)[i]:.6g}, expected {exp.reshape(-1)[i]:.6g})",
        )


def check_gradient(fn: str, case_name: str, f, x, analytic, tol: float, *, name="gradient", eps=1e-6) -> None:
    """The learner's `analytic` gradient of the scalar f() with respect to the float64 array `x`
    must match central differences, (f(x + eps e_i) - f(x - eps e_i)) / (2 eps), to a max-norm
    relative error below `tol`. f takes no arguments and reads x, which is perturbed in place (and
    always restored). Errors raised inside f (learner code) become CheckFailed, like in `case`.

    With eps = 1e-6 in float64 a correct gradient agrees to ~1e-8 or better; a wrong one (a
    missing term, a wrong sign, a transpose) typically disagrees at 1e-2 or worse."""
    if getattr(x, "dtype", None) != numpy.float64:
        raise TypeError(f"check_gradient needs a float64 NumPy array x, got {_describe(x)}")
    check_shape(fn, case_name, name, analytic, x.shape, "f")
    ana = _as_host(analytic).astype(numpy.float64)
    if not numpy.all(numpy.isfinite(ana)):
        raise _fail(fn, case_name, f"{name} has non-finite entries (nan or inf)")
    flat = x.reshape(-1)  # a view: writing to it perturbs x
    if not numpy.shares_memory(flat, x):
        raise TypeError("check_gradient needs a contiguous array x (it perturbs x in place)")
    num = numpy.empty(x.size)
    with case(fn, case_name):
        for i in range(x.size):
            old = float(flat[i])
            try:
                flat[i] = old + eps
                fp = float(f())
                flat[i] = old - eps
                fm = float(f())
            finally:
                flat[i] = old
            num[i] = (fp - fm) / (2 * eps)
    err = rel_error(ana.reshape(-1), num)
    if not err < tol:
        i = int(numpy.abs(ana.reshape(-1) - num).argmax())
        raise _fail(
            fn,
            case_name,
            f"{name} does not match the numerical gradient: rel error {err:.1e}, expected < {tol:.0e} "
            f"(worst at {_index(i, x.shape)}: yours {ana.reshape(-1)[i]:.6g}, numerical {num[i]:.6g})",
        )


# ---------------------------------------------------------------------------------------------
# reference values: lessons/NN_slug.npz, written by `python -m minimoe.lessons build`
# ---------------------------------------------------------------------------------------------

_LOADED: dict = {}
_LESSON_RE = re.compile(r"^\d\d(_[A-Za-z0-9_]+)?$")


def _search_dirs() -> list[Path]:
    """Where a lesson's .npz may be: the current directory (a notebook runs in its own folder),
    its lessons/ subfolder (a script run from the repository root), the folder of the running
    script, and the lesson data installed with the package (any folder under minimoe/lessons/)."""
    dirs = [Path.cwd(), Path.cwd() / "lessons"]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        dirs.append(Path(main_file).resolve().parent)
    here = Path(__file__).resolve().parent
    dirs += [here] + sorted(p for p in here.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and d.is_dir():
            seen.add(d)
            out.append(d)
    return out


def _find(lesson: str) -> Path:
    pattern = f"{lesson}.npz" if "_" in lesson else f"{lesson}_*.npz"
    dirs = _search_dirs()
    for d in dirs:
        hits = sorted(d.glob(pattern))
        if len(hits) > 1:
            raise FileNotFoundError(f"more than one reference file for lesson {lesson} in {d}: {hits}")
        if hits:
            return hits[0]
    raise FileNotFoundError(
        f"no reference values for lesson {lesson} ({pattern}) in {', '.join(str(d) for d in dirs)}; "
        "keep the .npz file beside the notebook, or run `python -m minimoe.lessons build`"
    )


def reference(lesson: str, key: str) -> numpy.ndarray:
    """The reference array `key` of a lesson ("05" or "05_router"), from its NN_slug.npz, loaded
    once with allow_pickle=False. A key that is not there raises a KeyError listing the keys."""
    if not _LESSON_RE.match(lesson):
        raise ValueError(f"lesson must be two digits like '05' or a name like '05_router', got {lesson!r}")
    path = _find(lesson)
    stamp = (path, path.stat().st_mtime_ns)  # a rebuilt file is read again
    if stamp not in _LOADED:
        with numpy.load(path, allow_pickle=False) as data:
            _LOADED[stamp] = {k: data[k] for k in data.files}
    values = _LOADED[stamp]
    if key not in values:
        raise KeyError(f"{path.name} has no reference {key!r}; it has: {', '.join(sorted(values))}")
    return values[key].copy()
