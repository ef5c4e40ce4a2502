"""NumPy's BLAS thread count, read and set: through threadpoolctl when it is installed, else
through the C functions of the OpenBLAS that NumPy loaded (Linux). NumPy's elementwise
operations always run on one thread; only its matrix products use these threads."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

_threadpool_limits = []  # keeps a threadpoolctl limit alive for the life of the process


def _openblas_functions():
    """(get, set) C functions of the OpenBLAS loaded by NumPy, or None (not OpenBLAS, not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for path in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        lib = ctypes.CDLL(path)
        for prefix in ("openblas", "scipy_openblas", "openblas64_", "scipy_openblas64_"):
            for suffix in ("", "64_", "_64_"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    return get, put
    return None


def blas_threads(n: int | None = None) -> int | None:
    """NumPy's BLAS thread count; with n, first set it to n. None when it cannot be told."""
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        if n is not None:
            _threadpool_limits.append(threadpoolctl.threadpool_limits(n, user_api="blas"))
        counts = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
        return counts[0] if counts else None
    funcs = _openblas_functions()
    if funcs is None:
        return None
    get, put = funcs
    if n is not None:
        put(ctypes.c_int(n))
    return int(get())
