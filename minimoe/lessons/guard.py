"""Inside a graded kernel: notice a learner function that hands its work to the package's own.

`watch(names)` runs first in the kernel. It imports every minimoe module and wraps each module-level
function whose name is one of the learner's functions (e.g. minimoe.ops.router.softmax_topk_forward
for a learner's softmax_topk_forward) in every module that holds it. The wrapper looks up the call
stack: if a function of the same name that lives outside the package (the learner's, defined in a
notebook cell) is calling it, directly or through other code, the call is recorded. `report()`
runs last and prints what was recorded, plus learner names that are simply bound to the package's
function, on one line that the grader reads back. Everything else about the calls is unchanged.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path

MARKER = "MINIMOE_GUARD "
_PACKAGE = Path(__file__).resolve().parents[1]  # minimoe/
_CALLED: dict = {}  # learner function name -> the package function it called
_WRAPPED: dict = {}  # original package function -> its wrapper


_OUTSIDE: dict = {}  # co_filename -> whether it lies outside the package (cached: checked per call)


def _outside_package(filename: str) -> bool:
    if filename not in _OUTSIDE:
        try:
            Path(filename).resolve().relative_to(_PACKAGE)
            _OUTSIDE[filename] = False
        except (ValueError, OSError):
            _OUTSIDE[filename] = True
    return _OUTSIDE[filename]


def _wrap(fn):
    qualified = f"{fn.__module__}.{fn.__qualname__}"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if code.co_name == fn.__name__ and _outside_package(code.co_filename):
                _CALLED.setdefault(fn.__name__, qualified)
                break
            frame = frame.f_back
        return fn(*args, **kwargs)

    return wrapper


def _package_modules():
    for info in pkgutil.walk_packages([str(_PACKAGE)], "minimoe."):
        if info.name.startswith("minimoe.lessons") or info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # a module whose optional dependency is absent cannot be called either
            continue
    return [m for name, m in list(sys.modules.items()) if name.split(".")[0] == "minimoe" and m is not None]


def watch(names) -> list[str]:
    """Wrap the package's functions named like the learner's; returns their qualified names."""
    names = set(names)
    for module in _package_modules():
        if module.__name__.startswith("minimoe.lessons"):
            continue
        for attr, obj in list(vars(module).items()):
            if inspect.isfunction(obj) and obj.__name__ in names and obj.__module__.startswith("minimoe."):
                if obj not in _WRAPPED:
                    _WRAPPED[obj] = _wrap(obj)
                setattr(module, attr, _WRAPPED[obj])
    return sorted(f"{fn.__module__}.{fn.__qualname__}" for fn in _WRAPPED)


def report(namespace=None) -> dict:
    """Print (and return) {learner function: package function it used} on one marked line."""
    namespace = vars(sys.modules["__main__"]) if namespace is None else namespace
    found = dict(_CALLED)
    originals = {id(w): fn for fn, w in _WRAPPED.items()} | {id(fn): fn for fn in _WRAPPED}
    for fn in _WRAPPED.values():
        bound = namespace.get(fn.__name__)
        if id(bound) in originals:  # e.g. softmax_topk_forward = router.softmax_topk_forward
            original = originals[id(bound)]
            found.setdefault(fn.__name__, f"{original.__module__}.{original.__qualname__}")
    print(MARKER + json.dumps(found, sort_keys=True))
    return found
