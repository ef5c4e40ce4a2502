"""Options and their validation: the one place where a flag's value is judged, with one sentence
that names the flag, the bad value and what would be valid (an OptionError, exit status 2 at the
command line, which itself only converts types).

    check(o.lr > 0, "lr", o.lr, "it must be a number > 0")     # --lr = -1 is invalid: ...
    check_int("max_iters", o.max_iters, lo=1)

`minimoe train`'s options are one dataclass, `TrainOptions`. A field left at None was not given:
`resolve_options` fills it from the checkpoint being resumed, else from `DEFAULTS`, so a value
the caller sets always wins, even one equal to its default. `check_options` then judges the
result; the model's shape flags (n_layer, n_embd, ...) are judged by `Config.validate` when
`model_config` builds the model's Config, and its errors are re-worded to name the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Optional

from minimoe import backend
from minimoe.config import Config
from minimoe.errors import ConfigError, OptionError
from minimoe.presets import PRESETS, get_preset, toy_presets


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


# --------------------------------------------------------------------------------- minimoe train
TOKENIZERS = ("char", "bpe")
DEVICES = ("cpu", "gpu")
PARALLEL = ("auto", "data", "expert")  # how P ranks share the work (minimoe.dist)


@dataclass
class TrainOptions:
    """Every option of `minimoe train` (the CLI flags are these names with dashes).
    None = not given (see DEFAULTS for what that means)."""

    preset: Optional[str] = None
    data: Optional[str] = None
    tokenizer: Optional[str] = None
    vocab_size: Optional[int] = None
    out: Optional[str] = None
    max_iters: Optional[int] = None
    batch_size: Optional[int] = None
    block_size: Optional[int] = None
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    n_experts: Optional[int] = None
    top_k: Optional[int] = None
    capacity_groups: Optional[int] = None
    dropout: Optional[float] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_iters: Optional[int] = None
    weight_decay: Optional[float] = None
    grad_clip: Optional[float] = None
    eval_interval: Optional[int] = None
    eval_iters: Optional[int] = None
    log_interval: Optional[int] = None
    seed: Optional[int] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    resume: Optional[bool] = None
    sample_tokens: Optional[int] = None
    parallel: Optional[str] = None
    max_bad_steps: Optional[int] = None
    keep_best: Optional[bool] = None
    max_data_mb: Optional[float] = None
    init_from: Optional[str] = None


# The one place the defaults are written. The fields left out stay None after resolution:
# block_size ... dropout mean "the preset's", min_lr means lr / 10.
DEFAULTS = TrainOptions(
    preset="mixtral",
    data="builtin",  # builtin | synthetic | tinyshakespeare | a path to a UTF-8 text file
    tokenizer="char",  # char | bpe
    vocab_size=512,  # BPE only: 256 byte tokens + (vocab_size - 256) merges
    out="out",  # run directory: ckpt.npz and metrics.jsonl
    max_iters=1500,
    batch_size=12,
    lr=1e-3,  # peak of the warmup + cosine schedule
    warmup_iters=100,
    weight_decay=0.1,
    grad_clip=1.0,  # 0: no clipping
    eval_interval=250,  # evaluate and checkpoint every N steps
    eval_iters=20,
    log_interval=10,
    seed=0,
    device="cpu",  # cpu | gpu (CuPy)
    dtype="float32",
    resume=False,
    sample_tokens=200,  # printed at the end; 0: none
    parallel="auto",  # under MPI: expert when the experts split evenly over the ranks, else data
    max_bad_steps=3,  # stop after this many steps in a row with a non-finite loss/gradient
    keep_best=False,  # also keep OUT/best.npz, the checkpoint of the best validation loss
    max_data_mb=256,  # refuse a --data file larger than this (MB)
    # init_from: a base checkpoint whose weights and tokenizer a new run starts from (minimoe.finetune)
)
FIELDS = tuple(f.name for f in dataclasses.fields(TrainOptions))
# The model flags override the preset's Config fields of the same names.
MODEL_FLAGS = (
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "n_experts",
    "top_k",
    "capacity_groups",
    "dropout",
)
# A checkpoint's model is fixed: these may not change when resuming.
LOCKED_ON_RESUME = ("preset", "tokenizer", "vocab_size", *MODEL_FLAGS, "dtype")
# Options of one session, not of the run: never taken from the checkpoint being resumed
# (a run saved by 4 expert-parallel ranks resumes in one process, or on 2 ranks, as data parallel).
SESSION_ONLY = ("parallel",)


def given_options(options) -> dict:
    """The options a caller set: the non-None entries of a TrainOptions, a dict or an argparse
    Namespace (its `command` and `func` entries are the CLI's own)."""
    if options is None:
        return {}
    if isinstance(options, TrainOptions):
        d = dataclasses.asdict(options)
    else:
        d = dict(vars(options) if isinstance(options, argparse.Namespace) else options)
        d = {k: v for k, v in d.items() if k not in ("command", "func")}
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise OptionError(f"unknown training option(s) {unknown}; valid options are {sorted(FIELDS)}")
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in d.items() if v is not None}


def resolve_options(given: dict, saved: dict | None = None) -> TrainOptions:
    """Every option: given > saved (the options of the checkpoint being resumed) > DEFAULTS.

    When resuming, the model is the checkpoint's: a LOCKED_ON_RESUME option given with another
    value than the checkpoint's is an OptionError."""
    merged = dataclasses.asdict(DEFAULTS)
    if saved is not None:
        saved = {k: v for k, v in saved.items() if k in FIELDS and k not in SESSION_ONLY}
        for k in LOCKED_ON_RESUME:
            if k in given and k in saved and given[k] != saved[k]:
                raise OptionError(
                    f"{flag(k)} {given[k]!r} differs from the checkpoint's {saved[k]!r}; a resumed run keeps "
                    f"its model, so drop {flag(k)} or start a new run in another --out directory"
                )
        merged.update(saved)
        given = {k: v for k, v in given.items() if k not in LOCKED_ON_RESUME}
    merged.update(given)
    return TrainOptions(**merged)


def check_options(o: TrainOptions) -> None:
    """OptionError naming the first bad option (as its flag) and what would be valid.

    The model flags are judged by `model_config` (Config.validate knows which shapes fit together).
    """
    toys = ", ".join(toy_presets())
    check(isinstance(o.preset, str) and o.preset in PRESETS, "preset", o.preset, f"valid presets are {toys}")
    check(
        o.preset in toy_presets(),
        "preset",
        o.preset,
        f"it is a published full-size configuration, kept for counting only; train one of {toys}",
    )
    check_choice("tokenizer", o.tokenizer, TOKENIZERS)
    check_choice("device", o.device, DEVICES)
    check_choice("dtype", o.dtype, backend.DTYPES)
    check_choice("parallel", o.parallel, PARALLEL)
    check_int("vocab_size", o.vocab_size, lo=256)  # the 256 byte tokens of BPE come first
    for name in ("max_iters", "batch_size", "eval_interval", "eval_iters", "log_interval"):
        check_int(name, getattr(o, name), lo=1)
    for name in ("warmup_iters", "sample_tokens", "seed"):
        check_int(name, getattr(o, name), lo=0)
    check_number("lr", o.lr, lo=0.0, strict=True)
    if o.min_lr is not None:
        check_number("min_lr", o.min_lr, lo=0.0, hi=o.lr)
    check_number("weight_decay", o.weight_decay, lo=0.0)
    check_number("grad_clip", o.grad_clip, lo=0.0)  # 0: no clipping
    check_run_guards(o)
    if o.init_from is not None:
        check(isinstance(o.init_from, str) and o.init_from != "", "init_from", o.init_from,
              "it must be the path of a base checkpoint (a run directory or a ckpt.npz)")  # fmt: skip


def check_run_guards(o: TrainOptions) -> None:
    """The options of the run's guards (minimoe.guards, minimoe.rundir), and the types of the
    options that name things (a checkpoint's saved options are read from a file)."""
    for name in ("data", "out"):
        check(
            isinstance(getattr(o, name), str), name, getattr(o, name), "it must be a path or name (a string)"
        )
    for name in ("resume", "keep_best"):
        check(isinstance(getattr(o, name), bool), name, getattr(o, name), "it must be true or false")
    check_int("max_bad_steps", o.max_bad_steps, lo=1)
    check_number("max_data_mb", o.max_data_mb, lo=0.0, strict=True)


def model_config(o: TrainOptions, vocab_size: int) -> Config:
    """The preset's Config with the model flags given and the tokenizer's vocabulary size.

    Config.validate judges the model flags; its message names the Config field, which becomes
    the flag here (Config.n_embd = 100 ... -> --n-embd = 100 ...)."""
    overrides = {k: getattr(o, k) for k in MODEL_FLAGS if getattr(o, k) is not None}
    for k, v in overrides.items():  # the types here; Config.validate judges the values
        if k == "dropout":
            check_number(k, v, lo=0.0)
        else:
            check(is_int(v), k, v, "it must be an integer")
    try:
        return get_preset(o.preset, vocab_size=vocab_size, **overrides)
    except ConfigError as e:
        raise OptionError(_name_flags(str(e), o.preset)) from None


def _name_flags(message: str, preset: str) -> str:
    """'Config.top_k = 5 is invalid: ...' -> '--top-k = 5 is invalid: ...' for a model flag."""
    m = re.match(r"Config\.(\w+)", message)
    if m and m.group(1) in MODEL_FLAGS:
        return flag(m.group(1)) + message[m.end() :]
    return f"the preset {preset!r} with the flags given is not a valid model: {message}"
