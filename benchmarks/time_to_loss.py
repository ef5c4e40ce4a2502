"""Wall-clock time to a validation loss on tiny Shakespeare, at nanoGPT's laptop settings.

    PYTHONPATH=. python benchmarks/time_to_loss.py PATH/tinyshakespeare.txt      # dense, mixtral
    PYTHONPATH=. python benchmarks/time_to_loss.py PATH --presets mixtral --threads 1

nanoGPT's README trains its character-level Shakespeare model on a laptop CPU with
    batch 12, block 64, 4 layers, 4 heads, 128 wide, 2000 iterations, learning rate 1e-3
    (warmup 100, cosine to 1e-4), weight decay 0.1, grad clip 1.0, dropout 0, eval every 250
    iterations on 20 batches, seed 1337,
and reaches a validation loss of about 1.88. minimoe's toy presets have that size; this script
trains each preset given at exactly those settings (character tokens, the last 10% of the file
held out, as nanoGPT does), each in a fresh process with minimoe's default threads (or
--threads), and reports when the validation loss first reached --target: the wall time since
the run started (evaluations included) at the first evaluation at or below it. Evaluations come
every 250 steps, so the time is that of an evaluation point, not an interpolation. The file is
passed on the command line; nothing is downloaded and nothing here runs in the test suite.
--reference-s prints each time as a ratio of another program's time to the same loss (95 s:
nanoGPT measured on the 2-core machine of issue 15, quoted there; nanoGPT is not run here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NANOGPT_LAPTOP = dict(
    max_iters=2000,
    batch_size=12,
    lr=1e-3,
    min_lr=1e-4,
    warmup_iters=100,
    weight_decay=0.1,
    grad_clip=1.0,
    dropout=0.0,
    eval_interval=250,
    eval_iters=20,
    seed=1337,
    tokenizer="char",
    sample_tokens=0,
)


def child(args) -> None:
    """Train one preset in this process; print one JSON line: the evaluations and the threads."""
    import io

    from minimoe.train import train

    out = tempfile.mkdtemp(prefix="time_to_loss_")
    log = io.StringIO()
    t0 = time.time()
    settings = dict(NANOGPT_LAPTOP, max_iters=args.max_iters)
    summary = train(preset=args.child, data=args.data, out=out, threads=args.threads, log_interval=250,
                    stream=log, **settings)  # fmt: skip
    wall = time.time() - t0
    evals = []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            evals.append({"step": rec["step"], "val_loss": rec["val_loss"], "elapsed_s": rec["elapsed_s"]})
    threads = next((s for s in log.getvalue().splitlines() if s.startswith("threads ")), "?")
    print(json.dumps({"evals": evals, "wall_s": wall, "threads": threads, "run_s": summary["elapsed_s"]}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help="the tiny Shakespeare text file")
    p.add_argument("--presets", nargs="+", default=["dense", "mixtral"])
    p.add_argument("--target", type=float, default=1.886, help="validation loss to reach (default 1.886)")
    p.add_argument("--threads", type=int, help="passed to train (default: minimoe's own choice)")
    p.add_argument("--max-iters", type=int, default=2000, help="nanoGPT's 2000; fewer for a quick try")
    p.add_argument("--reference-s", type=float, default=95.0, help="another program's time (default 95)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.data or not Path(args.data).is_file():
        p.error("give the path of the tiny Shakespeare text file (it is not downloaded)")
    if args.child:
        return child(args)

    print(f"time to val loss {args.target} at nanoGPT's laptop settings; {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")  # fmt: skip
    print(
        f"| preset | threads | reached {args.target} at step | seconds | / {args.reference_s:g} s "
        "| final val loss | total s | val loss at each evaluation |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    chosen = []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for preset in args.presets:
        cmd = [sys.executable, os.path.abspath(__file__), args.data, "--child", preset]
        cmd += ["--max-iters", str(args.max_iters)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{preset} failed:\n{res.stderr}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        hit = next((e for e in r["evals"] if e["val_loss"] <= args.target), None)
        step, secs = (hit["step"], f"{hit['elapsed_s']:.1f}") if hit else ("not reached", "-")
        ratio = f"{hit['elapsed_s'] / args.reference_s:.2f}" if hit else "-"
        curve = ", ".join(f"{e['val_loss']:.3f}" for e in r["evals"])
        chosen.append(f"{preset}: {r['threads']}")
        print(f"| {preset} | {r['threads'].split(' (')[0].split()[-1]} | {step} | {secs} | {ratio} | {r['evals'][-1]['val_loss']:.3f} "
              f"| {r['run_s']:.1f} | {curve} |", flush=True)  # fmt: skip
    print("\n" + "\n".join(chosen))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
