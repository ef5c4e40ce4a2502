"""Checks for the files minimoe reads from users: JSON documents and .npz archives are judged
(types, shapes, sizes) before anything they describe is allocated, and every read is bounded.

    value = read_json_file("config.json", "config.json", CheckpointError)   # <= MAX_JSON_BYTES
    headers = npz_headers("ckpt.npz", where)       # {key: (shape, dtype)}, no array data read
    check_float_arrays(where, "parameter", params) # real float32/float64, every value finite

Each failure raises the caller's error class (a minimoe.errors.UserError) with one sentence that
names the file, the entry and what is wrong with it.
"""

from __future__ import annotations

import json
import math
import numbers
import zipfile

import numpy

from minimoe import backend
from minimoe.errors import CheckpointError
from minimoe.guards import gib, memory_limit

MAX_JSON_BYTES = 64 * 2**20  # a config.json, an index file or a tokenizer is far smaller
READ_ERRORS = (ValueError, RecursionError)  # json: bad text / nesting deeper than Python's stack


def is_int(v) -> bool:
    """A true integer (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite real number, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def kind(v) -> str:
    """The JSON name of a parsed value's type, for messages: 'a list', 'a number', ..."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(v), "a number")


def parse_json(text, where: str, error=CheckpointError):
    """json.loads(text), or error(...) for text that is not JSON (or nested absurdly deep)."""
    try:
        return json.loads(text)
    except READ_ERRORS as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise error(f"{where} is not valid JSON ({why})") from None


def read_json_file(path, where: str, error=CheckpointError, max_bytes: int | None = None):
    """The parsed JSON of a file of at most max_bytes (default MAX_JSON_BYTES) bytes; a longer
    file is refused after reading max_bytes + 1 bytes."""
    max_bytes = MAX_JSON_BYTES if max_bytes is None else max_bytes
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise error(f"{where} is larger than {gib(max_bytes)}, which no such JSON file needs; it is not one")
    return parse_json(raw, where, error)


def expect_object(value, where: str, error=CheckpointError, null_ok: bool = False):
    """value itself when it is a JSON object (or null with null_ok); else error(...)."""
    if isinstance(value, dict) or (null_ok and value is None):
        return value
    raise error(f"{where} is {kind(value)}, but it must be a JSON object")


# ------------------------------------------------------------------------------------- .npz
def npz_headers(path, where: str) -> dict:
    """{key: (shape, dtype)} of every array of an .npz archive, from the .npy headers alone.

    Refuses, before any array is read: a file that is no zip archive, an entry that is no .npy
    array, pickled Python objects (dtype object), an entry whose header claims more bytes than the
    entry holds (e.g. 10^12 elements in a few bytes), and archives larger than this machine's memory.
    """
    out, total = {}, 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with z.open(info) as f:
                    version = numpy.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = numpy.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = numpy.lib.format.read_array_header_2_0(f)
                    else:
                        raise CheckpointError(
                            f"{where}: entry {key!r} has .npy version {version}; minimoe writes 1.0"
                        )
                if dtype.hasobject:
                    raise CheckpointError(
                        f"{where}: entry {key!r} holds pickled Python objects, which minimoe never loads "
                        "(they could run code); this is not a checkpoint minimoe wrote"
                    )
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > info.file_size:
                    raise CheckpointError(
                        f"{where}: entry {key!r} claims shape {shape} of {dtype} ({gib(nbytes)}) but holds "
                        f"{info.file_size} bytes; the file is corrupt"
                    )
                out[key] = (tuple(shape), dtype)
                total += info.file_size
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, ValueError) as e:
        raise CheckpointError(f"{where} cannot be read ({_why(e)}); it is truncated or corrupt") from None
    have = memory_limit()
    if have is not None and total > have:
        raise CheckpointError(f"{where} holds {gib(total)} of arrays, more than this machine's {gib(have)}")
    return out


def _why(e: Exception) -> str:
    if isinstance(e, zipfile.BadZipFile) and "not a zip file" in str(e):
        return "it is not a .npz archive"
    return f"{type(e).__name__}: {e}"


def text_entry(data: dict, key: str, where: str, raw: bool = False):
    """The parsed JSON of a 0-d text entry of a checkpoint (raw: the text itself)."""
    a = data.get(key)
    if a is None or a.shape != () or a.dtype.kind != "U":
        got = "missing" if a is None else f"of shape {a.shape} and dtype {a.dtype}"
        raise CheckpointError(f"{where} has no text entry {key!r} (it is {got}); the file is corrupt")
    return str(a[()]) if raw else parse_json(str(a[()]), f"{where} entry {key!r}")


def count_entry(data: dict, key: str, where: str) -> int:
    """A 0-d integer entry >= 0 (AdamW's step count), as a Python int."""
    a = data[key]
    if a.shape != () or a.dtype.kind not in "iu" or int(a) < 0:
        raise CheckpointError(
            f"{where} entry {key!r} must be one integer >= 0 (the optimizer's step count), got shape "
            f"{a.shape}, dtype {a.dtype}"
            + (f", value {int(a)}" if a.shape == () and a.dtype.kind in "iu" else "")
        )
    return int(a)


def check_float_arrays(where: str, what: str, arrays: dict, error=CheckpointError) -> None:
    """Every array real float32/float64 and finite; error(...) naming the first that is not."""
    for name, a in arrays.items():
        if numpy.dtype(a.dtype).name not in backend.DTYPES:
            raise error(f"{where}: {what} {name!r} has dtype {a.dtype}; minimoe stores float32 or float64")
        if not bool(backend.xp_of(a).isfinite(a).all()):
            raise error(f"{where}: {what} {name!r} holds NaN or infinite values; it is not a usable model")


def check_rng_state(state, where: str, name: str) -> None:
    """A saved numpy bit-generator state (or null) that a generator of its kind accepts."""
    if state is None:
        return
    kinds = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
    bitgen = state.get("bit_generator") if isinstance(state, dict) else None
    try:
        if bitgen not in kinds:
            raise ValueError(f"bit generator {bitgen!r}")
        getattr(numpy.random, bitgen)().state = state
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise CheckpointError(
            f"{where} holds an unusable state of the {name!r} random generator ({type(e).__name__}: {e}); "
            "a resumed run could not repeat its random draws"
        ) from None


def check_train_state(ts: dict, where: str) -> None:
    """The fields of a checkpoint's train_state that a resume or `info` reads: right types."""
    counts = ("iteration", "tokens_seen", "seed", "best_step", "pending_skipped")
    losses = ("best_val_loss", "last_val_loss", "last_train_loss")
    for key in counts:
        v = ts.get(key)
        if v is not None and not (is_int(v) and v >= 0):
            raise CheckpointError(f"{where}: train_state[{key!r}] = {v!r} must be an integer >= 0")
    for key in (*losses, "elapsed_s"):  # cross-entropy losses and times are never negative
        v = ts.get(key)
        if v is not None and not (is_number(v) and v >= 0):
            raise CheckpointError(
                f"{where}: train_state[{key!r}] = {v!r} must be a finite number >= 0 or null"
            )
    pending = ts.get("pending_losses", [])
    if not (isinstance(pending, list) and all(is_number(x) and x >= 0 for x in pending)):
        raise CheckpointError(f"{where}: train_state['pending_losses'] must be a list of finite losses >= 0")
    expect_object(ts.get("options", {}), f"{where}: train_state['options']")


MAX_TOKEN_BYTES = 4096  # far longer than any token BPE learns from text


def check_tokenizer_dict(d: dict, where: str) -> None:
    """A saved 'char' or 'bpe' tokenizer is checked before it is built (other kinds are left to
    their own from_dict): characters must be strings, merges pairs of existing ids, and no merged
    token longer than MAX_TOKEN_BYTES (merging a token with itself 60 times would make one of
    2^60 bytes)."""
    kind_ = d.get("type")
    if kind_ == "char" and not (
        isinstance(d.get("chars"), list) and all(isinstance(c, str) for c in d["chars"])
    ):
        raise CheckpointError(f"{where}: the char tokenizer's 'chars' must be a list of strings")
    if kind_ != "bpe":
        return
    merges, lengths = d.get("merges"), [1] * 256
    if not isinstance(merges, list):
        raise CheckpointError(f"{where}: the BPE tokenizer's 'merges' must be a list of id pairs")
    for k, pair in enumerate(merges):
        ok = (
            isinstance(pair, list)
            and len(pair) == 2
            and all(is_int(i) and 0 <= i < len(lengths) for i in pair)
        )
        if not ok:
            raise CheckpointError(
                f"{where}: BPE merge {k} is {pair!r}; it must be two ids of tokens made before it"
            )
        lengths.append(lengths[pair[0]] + lengths[pair[1]])
        if lengths[-1] > MAX_TOKEN_BYTES:
            raise CheckpointError(
                f"{where}: BPE merge {k} makes a token of {lengths[-1]} bytes; no text tokenizer does"
            )
