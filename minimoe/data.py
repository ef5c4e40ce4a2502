"""Text corpora, token storage and batching for minimoe.

Everything here runs on the host with NumPy (and the standard library):

* corpora:  ``builtin_corpus`` (ships inside CPython, no download),
  (dialogues for fine-tuning, ``--data chat-builtin`` or a .jsonl file: minimoe.chat_data),
  ``tinyshakespeare`` (downloaded once, checksummed, cached),
  ``synthetic_corpus`` (a deterministic multi-task toy corpus),
  ``read_text_file`` and ``load_corpus`` (pick one by name or path);
* token storage: ``save_tokens`` / ``load_tokens`` (a small binary format
  read back with ``np.memmap``);
* training data: ``train_val_split`` and ``get_batch``.

Every user mistake raises ``DataError`` (a ``ValueError``) whose message is
one sentence naming the bad value and what would be valid.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from minimoe.errors import DataError
from minimoe.synthetic import TASK_TAGS, TASKS, synthetic_corpus, synthetic_examples

__all__ = [
    "DataError",
    "builtin_corpus",
    "read_text_file",
    "MAX_DATA_BYTES",
    "download",
    "default_cache_dir",
    "tinyshakespeare",
    "TASKS",
    "TASK_TAGS",
    "synthetic_examples",
    "synthetic_corpus",
    "load_corpus",
    "save_tokens",
    "load_tokens",
    "check_variety",
    "train_val_split",
    "get_batch",
]


# --------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------


def builtin_corpus() -> str:
    """Return the default corpus: CPython's own reference text (~465k chars).

    ``pydoc_data.topics.topics`` maps help-topic names to English text about
    the Python language. We join the texts in sorted key order so the corpus
    is identical on every run with the same Python version.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some minimal Python builds strip pydoc_data
        raise DataError(
            "this Python installation lacks the pydoc_data module needed for the "
            "builtin corpus; use --data PATH (a UTF-8 text file) or --data tinyshakespeare instead"
        ) from exc
    return "\n\n".join(topics[key] for key in sorted(topics))


MAX_DATA_BYTES = 256 * 2**20  # the default limit on a data file's size (train --max-data-mb)
_READ_BLOCK = 1 << 20


def read_text_file(path: str | os.PathLike, max_bytes: int = MAX_DATA_BYTES) -> str:
    """Read a whole UTF-8 text file of at most ``max_bytes`` bytes, with a clear DataError for
    every failure. The file is read in blocks and refused as soon as it passes the limit or shows
    a NUL byte (text has none: it is binary data, or a device such as /dev/zero)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no file exists at {str(p)!r}; pass the path of an existing UTF-8 text file")
    if p.is_dir():
        raise DataError(f"{str(p)!r} is a directory, not a file; pass the path of a UTF-8 text file")
    too_big = (
        f"{str(p)!r} is larger than the data size limit of {max_bytes / 2**20:.4g} MB; raise the limit "
        "(--max-data-mb) if this machine has the memory, or use a smaller file"
    )
    if p.is_file() and p.stat().st_size > max_bytes:
        raise DataError(too_big)
    blocks, size = [], 0
    with open(p, "rb") as f:  # a pipe or device has no size: bound the reading itself
        while block := f.read(_READ_BLOCK):
            nul = block.find(b"\0")
            if nul >= 0:
                raise DataError(
                    f"{str(p)!r} holds a NUL byte at byte offset {size + nul}: it is binary data, not "
                    "UTF-8 text; pass a text file"
                )
            size += len(block)
            if size > max_bytes:
                raise DataError(too_big)
            blocks.append(block)
    raw = b"".join(blocks)
    if not raw:
        raise DataError(f"{str(p)!r} is empty; pass a UTF-8 text file that contains some text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(p)!r} is not valid UTF-8 (bad byte 0x{raw[exc.start]:02x} at byte offset "
            f"{exc.start}); convert it to UTF-8 text first"
        ) from None


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    size: int | None = None,
    timeout: float = 30,
) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there.

    * If ``dest`` exists and matches ``sha256`` (or no hash is given), it is
      reused and the network is not touched.
    * Otherwise the body is streamed into a temporary file in the same
      directory, checked against ``size`` and ``sha256``, then moved into
      place with ``os.replace`` (atomic), so ``dest`` is never half-written.
      The temporary file is deleted on any failure.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    if dest.is_file() and (expected is None or _sha256_of(dest) == expected):
        return dest  # cached copy is good: stay offline

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        n_bytes = 0
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                for block in iter(lambda: resp.read(1 << 16), b""):
                    out.write(block)
                    h.update(block)
                    n_bytes += len(block)
        except urllib.error.HTTPError as exc:
            raise DataError(
                f"could not download {url} (HTTP {exc.code} {exc.reason}); check the URL or try again later"
            ) from None
        except urllib.error.URLError as exc:
            raise DataError(
                f"could not download {url} ({exc.reason}); check your network connection or pass --data PATH"
            ) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise DataError(
                f"could not download {url} ({type(exc).__name__}: {exc}); check the URL and your network connection"
            ) from None

        if size is not None and n_bytes != size:
            raise DataError(f"download of {url} has {n_bytes} bytes but {size} were expected; try again")
        got = h.hexdigest()
        if expected is not None and got != expected:
            raise DataError(
                f"download of {url} has sha256 {got} but {expected} was expected; the file is corrupt or changed"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_SIZE = 1_115_394
DEFAULT_URL = TINYSHAKESPEARE_URL


def default_cache_dir() -> Path:
    """``$MINIMOE_CACHE``, else ``$XDG_CACHE_HOME/minimoe``, else ``~/.cache/minimoe``."""
    if os.environ.get("MINIMOE_CACHE"):
        return Path(os.environ["MINIMOE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "minimoe"
    return Path.home() / ".cache" / "minimoe"


def tinyshakespeare(
    cache_dir: str | os.PathLike | None = None,
    url: str = DEFAULT_URL,
    timeout: float = 30,
    sha256: str | None = TINYSHAKESPEARE_SHA256,
    size: int | None = TINYSHAKESPEARE_SIZE,
) -> str:
    """Return the tiny-Shakespeare text (~1.1 MB), downloading it once into the cache."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = download(url, folder / "tinyshakespeare.txt", sha256=sha256, size=size, timeout=timeout)
    return read_text_file(path)


def load_corpus(spec: str | os.PathLike | None = None, max_bytes: int = MAX_DATA_BYTES) -> str:
    """Pick a corpus: None/"builtin", "tinyshakespeare", "synthetic", or a file path (of at most
    ``max_bytes`` bytes, see read_text_file)."""
    if spec is None or spec == "builtin":
        return builtin_corpus()
    if spec == "tinyshakespeare":
        return tinyshakespeare()
    if spec == "synthetic":
        return synthetic_corpus()
    return read_text_file(spec, max_bytes)


# --------------------------------------------------------------------------
# Token storage
# --------------------------------------------------------------------------
# File layout (all little-endian):
#   bytes 0..7   magic b"MMTOKENS"
#   bytes 8..11  uint32 bytes per token (2 -> uint16, 4 -> uint32)
#   bytes 12..15 uint32 reserved (0)
#   bytes 16..23 uint64 number of tokens
#   bytes 24..   the token ids
_MAGIC = b"MMTOKENS"
_HEADER_BYTES = 24
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def save_tokens(path: str | os.PathLike, ids) -> Path:
    """Save token ids as uint16 (if all < 65536) or uint32, with a small header."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(
            f"token ids must be a 1-D sequence of integers, got shape {arr.shape} dtype {arr.dtype}"
        )
    lo = int(arr.min()) if arr.size else 0
    hi = int(arr.max()) if arr.size else 0
    if lo < 0 or hi >= 2**32:
        raise DataError(f"token ids must lie in [0, 2**32), got range [{lo}, {hi}]")
    dtype = _DTYPES[2] if hi < 2**16 else _DTYPES[4]
    header = _MAGIC + np.array([dtype.itemsize, 0], "<u4").tobytes() + np.array([arr.size], "<u8").tobytes()
    path = Path(path)
    with open(path, "wb") as f:
        f.write(header)
        f.write(arr.astype(dtype).tobytes())
    return path


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """Load ids saved by ``save_tokens`` as a read-only ``np.memmap`` (no copy into RAM)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no token file exists at {str(path)!r}; create one with save_tokens")
    with open(path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    itemsize = int(np.frombuffer(header[8:12], "<u4")[0]) if len(header) == _HEADER_BYTES else 0
    if header[:8] != _MAGIC or itemsize not in _DTYPES:
        raise DataError(
            f"{str(path)!r} is not a minimoe token file (bad header); create one with save_tokens"
        )
    n = int(np.frombuffer(header[16:24], "<u8")[0])
    dtype = _DTYPES[itemsize]
    if path.stat().st_size != _HEADER_BYTES + n * itemsize:
        raise DataError(
            f"{str(path)!r} is truncated: header says {n} tokens but the file size does not match"
        )
    if n == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=_HEADER_BYTES, shape=(n,))


# --------------------------------------------------------------------------
# Splitting and batching
# --------------------------------------------------------------------------


def check_variety(ids, spec) -> None:
    """DataError when the token ids of corpus ``spec`` hold fewer than two distinct tokens: a
    model would learn to repeat the one token with loss 0, which teaches nothing."""
    ids = np.asarray(ids)
    if ids.size and np.count_nonzero(np.bincount(ids)) < 2:
        raise DataError(
            f"the data {spec!r} holds one distinct token only (id {int(ids[0])}, repeated {ids.size} times): "
            "there is nothing to learn; use a text with some variety"
        )


def train_val_split(ids, val_fraction: float = 0.1, min_len: int = 2):
    """Split ids into (train, val): the last ``val_fraction`` is validation.

    The split is contiguous (no shuffling), so validation text is unseen text.
    Both parts must have at least ``min_len`` tokens.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    n = len(ids)
    n_val = int(round(n * val_fraction))
    n_train = n - n_val
    if n_train < min_len or n_val < min_len:
        raise DataError(
            f"splitting {n} tokens with val_fraction={val_fraction} gives {n_train} train and {n_val} "
            f"validation tokens, but each part needs at least {min_len}; use more data or another val_fraction"
        )
    return ids[:n_train], ids[n_train:]


def get_batch(ids, batch_size: int, block_size: int, rng: np.random.Generator):
    """Sample a batch of next-token-prediction examples.

    Picks ``batch_size`` random start offsets with ``rng``; row b of ``x`` is
    ``ids[o_b : o_b + block_size]`` and row b of ``y`` is the same window
    shifted one token to the right (the targets). Returns int64 arrays (B, T).
    A stream that batches itself (it has a ``get_batch`` method, e.g. minimoe.chat_data's
    MaskedTokens of conversations with a loss mask) is handed the same arguments.
    """
    for name, value in (("batch_size", batch_size), ("block_size", block_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise DataError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(rng, np.random.Generator):
        raise DataError(
            f"rng must be a numpy Generator such as np.random.default_rng(0), got {type(rng).__name__}"
        )
    if hasattr(ids, "get_batch"):
        return ids.get_batch(batch_size, block_size, rng)
    n = len(ids)
    if n < block_size + 1:
        raise DataError(
            f"the token sequence has {n} tokens but block_size={block_size} needs at least "
            f"{block_size + 1}; use more data or a smaller block_size"
        )
    offsets = rng.integers(0, n - block_size, size=batch_size)  # (B,)
    index = offsets[:, None] + np.arange(block_size + 1)[None, :]  # (B, T+1)
    windows = np.asarray(ids)[index].astype(np.int64)  # gathers only these rows
    return windows[:, :-1], windows[:, 1:]
