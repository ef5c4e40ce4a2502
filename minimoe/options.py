"""Checking option values: the one place where a flag's value is judged, with one sentence that
names the flag, the bad value and what would be valid (an OptionError, exit status 2 at the CLI).

    check(o.lr > 0, "lr", o.lr, "it must be a number > 0")     # --lr = -1 is invalid: ...
    check_int("max_iters", o.max_iters, lo=1)
"""

from __future__ import annotations

import math
import numbers

from minimoe.errors import OptionError


def flag(name: str) -> str:
    """The command-line spelling of an option name: max_iters -> --max-iters."""
    return "--" + name.replace("_", "-")


def check(cond: bool, name: str, value, valid: str) -> None:
    """OptionError "--name = value is invalid: valid" unless cond holds."""
    if not cond:
        raise OptionError(f"{flag(name)} = {value!r} is invalid: {valid}")


def is_int(v) -> bool:
    """A true integer (Python or NumPy), not a bool and not a float that happens to be whole."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(name: str, value, lo: int = 0, hi: int | None = None) -> None:
    """value must be an integer in [lo, hi] (hi None: no upper bound)."""
    valid = f"it must be an integer >= {lo}" if hi is None else f"it must be an integer in [{lo}, {hi}]"
    check(is_int(value) and value >= lo and (hi is None or value <= hi), name, value, valid)


def check_number(name: str, value, lo: float = 0.0, strict: bool = False, hi: float | None = None) -> None:
    """value must be a finite real number > lo (strict) or >= lo, and <= hi when hi is given."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if strict else value >= lo) and (hi is None or value <= hi)
    bound = f"> {lo}" if strict else f">= {lo}"
    check(ok, name, value, f"it must be a finite number {bound}" + ("" if hi is None else f" and <= {hi}"))


def check_choice(name: str, value, choices) -> None:
    """value must be one of choices."""
    check(value in tuple(choices), name, value, f"use one of {', '.join(map(str, choices))}")
