"""Checkpoints: one `.npz` file holding everything needed to sample from or resume a run.

Layout of OUT/ckpt.npz (every entry a plain array, so it loads with allow_pickle=False):
    format             "minimoe-checkpoint-1"
    config             JSON of Config.to_dict()
    tokenizer          JSON of tokenizer.to_dict()  ("null" when none was saved)
    train_state        JSON: iteration, best val loss, options, metrics summary, ...
    rng                JSON: bit-generator states of the data-sampling rng and of model.rng
    param/<name>       model.params[name]    (host copies, in the model's dtype)
    buffer/<name>      model.buffers[name]   (state not trained by the optimizer)
    optim/t            AdamW step count, int64 0-d
    optim/m/<name>, optim/v/<name>           AdamW first and second moments
Text is stored as 0-d unicode arrays (np.array("...")): NumPy saves those without pickle.

The file is written to a temporary file in the same directory and moved into place with
os.replace, which is atomic: a reader sees the old checkpoint or the new one, never half of one,
and a failed write leaves the old checkpoint untouched. A process killed during a save leaves its
temporary file (.ckpt.npz.*.tmp); training removes them (minimoe.rundir, under its lock).

Both directions are checked (minimoe.filecheck): a model whose parameters hold NaN/inf is never
written; a file is read only after its .npy headers were judged (no pickles, no sizes its bytes do
not hold), and its JSON entries, arrays (real, finite float32/float64), optimizer step count,
random-generator states and config are checked before a model is built from it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minimoe import backend, filecheck, guards
from minimoe.config import Config
from minimoe.errors import CheckpointError
from minimoe.model import GPT
from minimoe.options import MODEL_FLAGS
from minimoe.presets import PRESETS
from minimoe.tokenizer import tokenizer_from_dict

FORMAT = "minimoe-checkpoint-1"
FILENAME = "ckpt.npz"


class NonFiniteError(CheckpointError):
    """A model or optimizer state holding NaN/inf, refused by save_checkpoint."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, on the host (numpy arrays and JSON values)."""

    path: Path
    config: Config
    params: dict
    buffers: dict = field(default_factory=dict)
    optimizer: dict | None = None  # {"t": int, "m": {name: array}, "v": {name: array}}
    tokenizer: dict | None = None
    train_state: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)


def checkpoint_path(path) -> Path:
    """OUT/ckpt.npz for a directory OUT (existing or not, unless it ends in .npz); else the path."""
    p = Path(path)
    if p.is_dir() or p.suffix != ".npz":
        return p / FILENAME
    return p


def rng_state(rng):
    """The JSON-able state of a random generator (numpy's bit_generator.state), or None when the
    generator does not expose one (e.g. CuPy's); such a generator is reseeded on resume."""
    try:
        state = rng.bit_generator.state
        json.dumps(state)
        return state
    except Exception:
        return None


def set_rng_state(rng, state) -> bool:
    """Restore a state saved by `rng_state`; False when it cannot be applied to this generator."""
    if state is None:
        return False
    try:
        rng.bit_generator.state = state
        return True
    except Exception:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _text(obj) -> np.ndarray:
    return np.array(json.dumps(obj))


def save_checkpoint(path, model, optimizer=None, tokenizer=None, train_state=None, rngs=None) -> Path:
    """Write model (+ optimizer, tokenizer, training state, rng states) to `path` atomically.

    path: a directory (the file is path/ckpt.npz) or a file name ending in .npz.
    rngs: {"data": numpy Generator, "model": model.rng, ...}; their states are stored as JSON.
    Returns the checkpoint's path.
    """
    dest = checkpoint_path(path)
    arrays = {
        "format": np.array(FORMAT),
        "config": _text(model.config.to_dict()),
        "tokenizer": _text(tokenizer.to_dict() if tokenizer is not None else None),
        "train_state": _text(train_state or {}),
        "rng": _text({k: rng_state(r) for k, r in (rngs or {}).items()}),
    }
    for name, value in model.params.items():
        arrays["param/" + name] = backend.to_numpy(value)
    for name, value in model.buffers.items():
        arrays["buffer/" + name] = backend.to_numpy(value)
    if optimizer is not None:
        state = optimizer.state_dict()
        arrays["optim/t"] = np.array(int(state["t"]), dtype=np.int64)
        for name in model.params:
            arrays["optim/m/" + name] = backend.to_numpy(state["m"][name])
            arrays["optim/v/" + name] = backend.to_numpy(state["v"][name])
    check_writable(dest, arrays)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix="." + dest.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; use the usual mode
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def check_writable(dest, arrays: dict) -> None:
    """NonFiniteError unless every parameter, buffer and optimizer moment is real and finite: a
    diverged model must never replace a good checkpoint."""
    floats = {k: v for k, v in arrays.items() if k.startswith(("param/", "buffer/", "optim/m/", "optim/v/"))}
    try:
        filecheck.check_float_arrays(f"refusing to write {str(dest)!r}", "entry", floats, NonFiniteError)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}; the file on disk is kept") from None


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint file (or OUT/ckpt.npz for a directory OUT) into host arrays.

    Raises CheckpointError for a missing, truncated, corrupt, crafted or foreign file (see the
    module docstring for what is checked).
    """
    p = checkpoint_path(path)
    where = f"checkpoint {str(p)!r}"
    if not p.is_file():
        raise CheckpointError(
            f"no checkpoint exists at {str(p)!r}; train one first with `minimoe train --out DIR`"
        )
    if "format" not in filecheck.npz_headers(p, where):  # judged before any array is read
        raise CheckpointError(f"{str(p)!r} is a .npz file but not a minimoe checkpoint (no 'format' entry)")
    try:
        with np.load(p, allow_pickle=False) as z:
            # read every array now: a truncated zip often fails only when an entry is read
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CheckpointError(
            f"{where} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt"
        ) from None
    fmt = filecheck.text_entry(data, "format", where, raw=True)
    if fmt != FORMAT:
        raise CheckpointError(f"{where} has format {fmt!r}; this version of minimoe reads {FORMAT!r}")
    config = filecheck.expect_object(filecheck.text_entry(data, "config", where), f"{where} config")
    try:
        config = Config.from_dict(config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where} holds an invalid model config ({e})") from None

    def group(prefix):
        return {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}

    optimizer = None
    if "optim/t" in data:
        optimizer = {
            "t": filecheck.count_entry(data, "optim/t", where),
            "m": group("optim/m/"),
            "v": group("optim/v/"),
        }
    ckpt = Checkpoint(
        path=p,
        config=config,
        params=group("param/"),
        buffers=group("buffer/"),
        optimizer=optimizer,
        tokenizer=filecheck.expect_object(
            filecheck.text_entry(data, "tokenizer", where), f"{where} tokenizer", null_ok=True
        ),
        train_state=filecheck.expect_object(
            filecheck.text_entry(data, "train_state", where), f"{where} train_state", null_ok=True
        )
        or {},
        rng=filecheck.expect_object(filecheck.text_entry(data, "rng", where), f"{where} rng", null_ok=True)
        or {},
    )
    check_contents(ckpt, where)
    return ckpt


def check_contents(ckpt: Checkpoint, where: str) -> None:
    """What load_checkpoint checks once the entries are parsed: finite real arrays of one dtype,
    the run's state and generators, and a config that agrees with the file (its layers, and the
    model options the run was started with): another model's weights or config are refused."""
    filecheck.check_float_arrays(where, "parameter", ckpt.params)
    filecheck.check_float_arrays(where, "buffer", ckpt.buffers)
    if ckpt.optimizer is not None:
        filecheck.check_float_arrays(where, "optimizer first moment", ckpt.optimizer["m"])
        filecheck.check_float_arrays(where, "optimizer second moment", ckpt.optimizer["v"])
        negative = [k for k, v in ckpt.optimizer["v"].items() if (v < 0).any()]
        if negative:  # a mean of squared gradients: sqrt(v) of a negative one would be NaN
            raise CheckpointError(f"{where}: optimizer second moment {negative[0]!r} holds negative values")
    filecheck.check_train_state(ckpt.train_state, where)
    for name, state in ckpt.rng.items():
        filecheck.check_rng_state(state, where, name)
    dtypes = {a.dtype.name for a in ckpt.params.values()}
    c, opts = ckpt.config, ckpt.train_state.get("options") or {}
    if len(dtypes) > 1 or (opts.get("dtype") and dtypes and dtypes != {opts["dtype"]}):
        raise CheckpointError(
            f"{where} mixes parameter dtypes {sorted(dtypes)} (its run used {opts.get('dtype')!r})"
        )
    blocks = {int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, ckpt.params) if m}
    if len(blocks) != c.n_layer or (blocks and max(blocks) != c.n_layer - 1):  # blocks 0 .. n_layer - 1
        raise CheckpointError(
            f"{where} has weights of {len(blocks)} blocks but its config says n_layer = {c.n_layer}"
        )
    mismatched = [k for k in MODEL_FLAGS if opts.get(k) is not None and opts[k] != getattr(c, k)]
    preset = opts.get("preset")
    if isinstance(preset, str) and preset in PRESETS and c.name in PRESETS and preset != c.name:
        mismatched.insert(0, "preset")
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(
            f"{where} holds a {c.name!r} model whose {k} = {getattr(c, 'name' if k == 'preset' else k)!r}, but its "
            f"run was started with {k} = {opts[k]!r}; the file mixes two models"
        )


def _check_arrays(where, kind, got: dict, want: dict):
    """Same names and shapes as the model's arrays, or a CheckpointError naming the first misfit."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        what = f"lacks {kind} {missing[:3]}" if missing else f"has unexpected {kind} {extra[:3]}"
        raise CheckpointError(f"{where} {what} for its config; it does not belong to this model")
    for name, arr in want.items():
        if tuple(got[name].shape) != tuple(arr.shape):
            raise CheckpointError(
                f"{where} has {kind} {name!r} of shape {tuple(got[name].shape)} but its config needs "
                f"{tuple(arr.shape)}; the file is corrupt or mismatched"
            )


def build_model(ckpt: Checkpoint, dtype: str | None = None):
    """A GPT with the checkpoint's config, parameters and buffers (on the current backend)."""
    where = f"checkpoint {str(ckpt.path)!r}"
    if dtype is None:
        first = next(iter(ckpt.params.values()), None)
        dtype = first.dtype.name if first is not None and first.dtype.name in backend.DTYPES else None
    guards.check_fits(
        {"parameters": guards.weights_bytes(ckpt.config, dtype or "float32")},
        f"the model of {where}",
        CheckpointError,
        "its config describes a model far larger than its weights",
    )
    try:
        model = GPT(ckpt.config, seed=int(ckpt.train_state.get("seed", 0)), dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"{where} cannot be built into a model ({e})") from None
    _check_arrays(where, "parameter(s)", ckpt.params, model.params)
    _check_arrays(where, "buffer(s)", ckpt.buffers, model.buffers)
    for name, value in ckpt.params.items():
        model.params[name][...] = backend.to_device(value, model.xp, model.dtype)
    for name, value in ckpt.buffers.items():
        model.buffers[name][...] = backend.to_device(value, model.xp, model.dtype)
    return model


def check_resumable(ckpt: Checkpoint) -> None:
    """CheckpointError unless the checkpoint holds what resuming its run needs: the optimizer's
    state, the step count and options of the run, and the data generator's state."""
    ts = ckpt.train_state
    missing = [] if filecheck.is_int(ts.get("iteration")) else ["step count (train_state 'iteration')"]
    missing += [] if isinstance(ts.get("options"), dict) else ["options (train_state 'options')"]
    missing += [] if ckpt.rng.get("data") else ["state of the data generator (rng 'data')"]
    if ckpt.optimizer is None:
        missing.insert(0, "optimizer state")
    if missing:
        raise CheckpointError(
            f"checkpoint {str(ckpt.path)!r} holds no {missing[0]}, so its run cannot be resumed"
        )


def load_optimizer_state(ckpt: Checkpoint, optimizer, model):
    """Restore AdamW moments and step count from the checkpoint into `optimizer` (in place)."""
    where = f"checkpoint {str(ckpt.path)!r}"
    if ckpt.optimizer is None:
        raise CheckpointError(f"{where} holds no optimizer state, so the run cannot be resumed from it")
    _check_arrays(where, "optimizer moment(s)", ckpt.optimizer["m"], model.params)
    _check_arrays(where, "optimizer moment(s)", ckpt.optimizer["v"], model.params)
    optimizer.load_state_dict(ckpt.optimizer)


def load_tokenizer(ckpt: Checkpoint):
    """The checkpoint's tokenizer object, or a CheckpointError when it has none."""
    if not ckpt.tokenizer:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} holds no tokenizer")
    filecheck.check_tokenizer_dict(ckpt.tokenizer, f"checkpoint {str(ckpt.path)!r}")
    try:
        tok = tokenizer_from_dict(ckpt.tokenizer)
        tok.decode(range(tok.vocab_size))  # every id must decode (e.g. chars must be strings)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} holds an unreadable tokenizer ({e})") from None
    if tok.vocab_size != ckpt.config.vocab_size:
        raise CheckpointError(
            f"checkpoint {str(ckpt.path)!r} holds a tokenizer of {tok.vocab_size} tokens for a model of "
            f"vocab_size {ckpt.config.vocab_size}; the file mixes two runs"
        )
    return tok


def load_model(path, dtype: str | None = None):
    """(model, tokenizer, checkpoint) from a checkpoint file or run directory."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, dtype)
    return model, load_tokenizer(ckpt), ckpt
