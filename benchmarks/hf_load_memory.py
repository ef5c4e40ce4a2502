"""Peak memory of `minimoe.hf.load_pretrained` on a ~1.3B-parameter bf16 checkpoint (not in CI).

Writes a random Granite-3.0-1B-A400M-shaped checkpoint (1.34B parameters; the counted preset
`granite-3.0-1b-a400m`) as sharded bf16 safetensors into a temporary folder, the way transformers
saves one, then loads it with `minimoe.hf.load_pretrained(dtype="float32")` in a fresh Python
process and reports that process's peak resident memory (VmHWM: heap and mapped file pages)
against the model's float32 size. Target (issue 14): peak < 2x the float32 size. Nothing is
downloaded; the folder is removed afterwards (--keep keeps it).

    PYTHONPATH=. python benchmarks/hf_load_memory.py                  # ~2.7 GB on disk, ~5.3 GB float32
    PYTHONPATH=. python benchmarks/hf_load_memory.py --n-layer 6      # a quicker ~0.4B version
    PYTHONPATH=. python benchmarks/hf_load_memory.py --json

Check `df -h` of the temporary folder's disk first (--dir chooses it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from minimoe import get_preset, hf  # noqa: E402
from minimoe.hf.config import family  # noqa: E402
from minimoe.hf.names import name_map, to_theirs  # noqa: E402
from minimoe.layers.moe import init_buffers  # noqa: E402
from minimoe.layers.params import param_shapes  # noqa: E402

SHARD_BYTES = 1 << 30  # transformers' default max_shard_size is larger; 1 GiB gives a sharded folder

LOADER = """
import json, resource, sys, time

def peak():  # this process image's high-water resident set: VmHWM (ru_maxrss would include the
    try:     # memory of the parent that started us, which Linux carries across exec)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

t0 = time.perf_counter()
from minimoe import hf
base = peak()
model, _ = hf.load_pretrained(sys.argv[1], dtype="float32")
seconds = time.perf_counter() - t0
print(json.dumps(dict(peak=peak(), base=base, params=model.num_params(), seconds=seconds)))
"""


def hf_shapes(config, kind):
    """{HF checkpoint name: shape} of a model of `config`, without allocating its weights."""
    shapes = {**param_shapes(config), **{k: v.shape for k, v in init_buffers(config).items()}}
    out = {}
    for ours, how, theirs in name_map(config, kind, shapes):
        fake = [numpy.broadcast_to(numpy.float32(0), shapes[o]) for o in ours]  # views: no memory
        for name, a in zip(theirs, to_theirs(fake, how, config)):
            out[name] = tuple(a.shape)
    return out


def write_bf16_checkpoint(folder, config, seed=0):
    """config.json and random bf16 shards (+ index) of `config`, written one tensor at a time."""
    kind = family(config)
    hf_config = hf.hf_config_from(config)
    hf_config["torch_dtype"] = "bfloat16"
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    shapes = hf_shapes(config, kind)
    shards, current, size = [], [], 0  # split the names into shards of about SHARD_BYTES
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    rng = numpy.random.default_rng(seed)
    weight_map = {}
    for s, names in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {}, 0
        for name in names:
            n = 2 * math.prod(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[name] = file
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(os.path.join(folder, file), "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name in names:  # bf16 = the top 16 bits of a float32
                w = rng.standard_normal(shapes[name], dtype=numpy.float32) * 0.02
                f.write((w.view(numpy.uint32) >> 16).astype("<u2").tobytes())
    index = {
        "metadata": {"total_size": sum(2 * math.prod(s) for s in shapes.values())},
        "weight_map": weight_map,
    }
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)
    return sum(math.prod(s) for s in shapes.values()), len(shards)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--preset", default="granite-3.0-1b-a400m", help="a counted preset to write (default %(default)s)"
    )
    ap.add_argument("--n-layer", type=int, default=None, help="fewer layers for a quicker run")
    ap.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the written folder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    overrides = {"counted_only": False}
    if args.n_layer:
        overrides["n_layer"] = args.n_layer
    config = get_preset(args.preset, **overrides)
    folder = tempfile.mkdtemp(prefix="minimoe-hf-mem-", dir=args.dir)
    try:
        t0 = time.perf_counter()
        n_written, n_shards = write_bf16_checkpoint(folder, config)
        write_s = time.perf_counter() - t0
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run(
            [sys.executable, "-c", LOADER, folder], env=env, check=True, capture_output=True, text=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    f32 = 4 * r["params"]
    result = dict(
        preset=args.preset,
        n_layer=config.n_layer,
        params=r["params"],
        tensors_written=n_written,
        shards=n_shards,
        bf16_bytes=2 * n_written,
        float32_bytes=f32,
        peak_rss_bytes=r["peak"],
        rss_after_import_bytes=r["base"],
        peak_over_float32=r["peak"] / f32,
        load_seconds=round(r["seconds"], 1),
        write_seconds=round(write_s, 1),
        folder=folder if args.keep else None,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    gb = 1e9
    print(
        f"{args.preset} ({config.n_layer} layers): {r['params'] / 1e9:.3f}B parameters in {n_shards} bf16 shard(s)"
    )
    print(f"  float32 size       {f32 / gb:6.2f} GB")
    print(
        f"  peak RSS of load   {r['peak'] / gb:6.2f} GB  = {r['peak'] / f32:.2f}x the float32 size (target < 2x)"
    )
    print(f"  (after imports     {r['base'] / gb:6.2f} GB)")
    print(f"  load {r['seconds']:.1f} s, write {write_s:.1f} s")


if __name__ == "__main__":
    main()
