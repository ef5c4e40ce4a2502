"""The safetensors file format, read and written with numpy alone (no torch, no safetensors package).

A .safetensors file is:
    8 bytes   n, a little-endian uint64
    n bytes   a JSON header {name: {"dtype": "F32", "shape": [...], "data_offsets": [start, end]},
                             "__metadata__": {str: str}}
    the rest  the raw little-endian bytes of every tensor; offsets count from the end of the header.
A large checkpoint is split into shards, with model.safetensors.index.json mapping each tensor
name to the shard that holds it ({"weight_map": {name: file}}).

    tensors = read_safetensors("model.safetensors")       # name -> numpy array
    write_safetensors("out.safetensors", tensors, {"format": "pt"})
    tensors = read_checkpoint("path/to/folder")           # every shard of a folder
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct

import numpy

from minimoe.errors import CheckpointError
from minimoe.filecheck import expect_object, is_int, kind, parse_json, read_json_file
from minimoe.guards import gib, memory_limit

# safetensors dtype -> numpy dtype (little-endian). BF16 has no numpy dtype: we read its raw
# 16 bits and widen them to float32 (see read_safetensors).
DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}

INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on its JSON header


def bf16_to_float32(bits):
    """uint16 bfloat16 bits -> float32, exactly: a bfloat16 number is the top 16 bits of the
    float32 with the same value, so shifting the bits up 16 places gives that float32."""
    return (bits.astype(numpy.uint32) << 16).view(numpy.float32)


def read_safetensors(path: str) -> dict:
    """name -> numpy array of one .safetensors file; bfloat16 becomes float32 (exactly).

    The arrays are ordinary writable copies in native byte order, not views of the file.
    CheckpointError for a file that is not safetensors, whose header is malformed (checked entry
    by entry before any tensor is read) or contradicts its size, or whose tensors would not fit
    in this machine's memory.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        header = parse_json(f.read(n), f"{path}: the safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is {kind(header)}, but it must be a JSON object"
        )
    empty = size == 8 + n  # numpy cannot memory-map zero bytes
    entries = {
        name: _entry(path, name, info, size - 8 - n)
        for name, info in header.items()
        if name != "__metadata__"
    }
    need = sum(
        math.prod(shape) * (4 if dt == "BF16" else numpy.dtype(DTYPES[dt]).itemsize)
        for dt, shape, _ in entries.values()
    )
    have = memory_limit()
    if have is not None and need > have:
        raise CheckpointError(f"{path} holds {gib(need)} of tensors, more than this machine's {gib(have)}")
    data = numpy.zeros(0, numpy.uint8) if empty else numpy.memmap(path, numpy.uint8, mode="r", offset=8 + n)
    out = {}
    for name, (dt, shape, (start, end)) in entries.items():
        a = (
            data[start:end].view(numpy.dtype(DTYPES[dt])).reshape(shape)
        )  # a view of the file, maybe unaligned
        if dt == "BF16":
            a = bf16_to_float32(a)
        out[name] = a.astype(a.dtype.newbyteorder("="))  # an aligned, native-order copy in memory
    return out


def _entry(path, name, info, data_size: int):
    """(dtype, shape, (start, end)) of one header entry, checked: an object with a known dtype, a
    shape of integers >= 0, and offsets inside the data whose length fits the shape."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} is described by {kind(info)}, but it must be a JSON object")
    dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dt, str) or dt not in DTYPES:
        raise CheckpointError(f"{where} has dtype {dt!r}; supported: {sorted(DTYPES)}")
    if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where} has shape {shape!r}; it must be a list of integers >= 0")
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
    if not (ok and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(
            f"{where} has data_offsets {offsets!r}; they must be two integers 0 <= start <= end"
        )
    nbytes = math.prod(shape) * numpy.dtype(DTYPES[dt]).itemsize
    start, end = offsets
    if end - start != nbytes or end > data_size:
        raise CheckpointError(
            f"{where} has bytes [{start}, {end}) of {data_size}, but shape {list(shape)} of {dt} needs {nbytes}"
        )
    return dt, tuple(shape), (start, end)


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write name -> numpy array (float64/32/16, integer or bool) as one .safetensors file."""
    writable = {numpy.dtype(v).name: k for k, v in DTYPES.items() if k != "BF16"}
    header, blobs, pos = {}, [], 0
    for name, a in tensors.items():
        a = numpy.asarray(a)
        if a.dtype.name not in writable:
            raise ValueError(f"tensor {name!r} has dtype {a.dtype}; writable: {sorted(writable)}")
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": writable[a.dtype.name],
            "shape": list(a.shape),
            "data_offsets": [pos, pos + len(raw)],
        }
        blobs.append(raw)
        pos += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so that the tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)


def read_checkpoint(path: str) -> dict:
    """Every tensor of a folder's safetensors: the shards named by model.safetensors.index.json,
    else every *.safetensors file in it. CheckpointError when there is none, when the index is
    malformed or names a shard outside the folder, or names a shard that does not hold the tensor."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        weight_map = expect_object(read_json_file(index, index), index).get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"{index} has no 'weight_map' object of tensor name -> shard file name")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            if (
                os.path.basename(shard) != shard
                or shard in ("", ".", "..")
                or not os.path.isfile(os.path.join(path, shard))
            ):
                raise CheckpointError(f"{index} names shard {shard!r}, which is not a file in {path}")
            part = read_safetensors(os.path.join(path, shard))
            missing = sorted(k for k, f in weight_map.items() if f == shard and k not in part)
            if missing:
                raise CheckpointError(f"{index} puts {missing[0]!r} in {shard}, which does not hold it")
            tensors.update(part)
        return tensors
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(
            f"{path} holds no *.safetensors file (a pytorch_model.bin is not read: it needs torch)"
        )
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(file))
    return tensors
