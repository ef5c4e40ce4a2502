"""GPU check for minimoe: run it on a machine with an NVIDIA GPU and CuPy installed.

    bash scripts/gpu_check.sh            # or: python scripts/gpu_check.py [--skip-tests] [--json OUT]

It (1) runs the whole test suite with MINIMOE_BACKEND=cupy, (2) checks CuPy results against NumPy
on the same weights and batch (float32 tolerance) and runs float64 gradient checks on the GPU,
and (3) times a training step of minimoe on CuPy against a PyTorch CUDA eager model of the same
architecture (if PyTorch with CUDA is installed), printing a short report. Budget: < 5 minutes
on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import minimoe  # noqa: E402
from minimoe import backend, gradcheck  # noqa: E402

LARGE = dict(n_layer=6, n_embd=384, n_head=6, block_size=256)  # the "larger config" of the speed issue


def section(title):
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run_tests(report):
    section("1. test suite on CuPy (MINIMOE_BACKEND=cupy)")
    env = dict(os.environ, MINIMOE_BACKEND="cupy", MPLBACKEND="Agg")
    t0 = time.time()
    # the lesson notebooks are skipped here: they are CPU lessons and take minutes
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests",
        "--ignore=tests/test_lessons.py",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    print(proc.stdout[-3000:] if proc.returncode else tail[0])
    report["tests"] = {
        "returncode": proc.returncode,
        "summary": tail[0],
        "seconds": round(time.time() - t0, 1),
    }


def _model_pair(name, dtype, **overrides):
    cfg = minimoe.get_preset(name, **overrides)
    backend.set_backend("numpy")
    m_np = minimoe.GPT(cfg, seed=0, dtype=dtype)
    backend.set_backend("cupy")
    m_cp = minimoe.GPT(cfg, seed=0, dtype=dtype)
    return cfg, m_np, m_cp


def agreement(report):
    section("2. CuPy vs NumPy on the same weights and batch (float32)")
    rows = []
    for name in ("dense", "mixtral", "switch", "deepseek", "gpt4-rumoured"):
        cfg, m_np, m_cp = _model_pair(name, "float32", vocab_size=97)
        rng = np.random.default_rng(0)
        idx = rng.integers(0, cfg.vocab_size, (4, cfg.block_size))
        tgt = rng.integers(0, cfg.vocab_size, (4, cfg.block_size))
        l_np, loss_np = m_np.forward(idx, tgt)
        g_np = m_np.backward()
        l_cp, loss_cp = m_cp.forward(idx, tgt)
        g_cp = m_cp.backward()
        err_logits = gradcheck.rel_error(l_np, l_cp)
        err_grads = max(gradcheck.rel_error(g_np[k], g_cp[k]) for k in g_np)
        ok = err_logits < 1e-4 and abs(float(loss_np) - float(loss_cp)) < 1e-4 and err_grads < 1e-3
        rows.append(
            dict(
                preset=name,
                logits=err_logits,
                loss_np=float(loss_np),
                loss_cp=float(loss_cp),
                grads=err_grads,
                ok=ok,
            )
        )
        print(
            f"{name:14s} logits rel err {err_logits:.1e}  loss {float(loss_np):.6f} vs {float(loss_cp):.6f}"
            f"  max grad rel err {err_grads:.1e}  {'ok' if ok else 'MISMATCH'}"
        )
    section("2b. float64 gradient checks on the GPU")
    for name in ("dense", "mixtral", "switch", "deepseek"):
        backend.set_backend("cupy")
        cfg = minimoe.get_preset(
            name,
            n_layer=2,
            n_embd=8,
            n_head=2,
            block_size=6,
            vocab_size=11,
            init_std=0.5,
            z_loss_coef=0.01,
            **({} if name == "dense" else {"expert_hidden": 6}),
        )
        m = minimoe.GPT(cfg, seed=0, dtype="float64")
        rng = np.random.default_rng(1)
        idx = rng.integers(0, 11, (2, 6))
        errs = gradcheck.check_model(m, idx, rng.integers(0, 11, (2, 6)), eps=1e-5, max_entries=20)
        worst = max(errs.values())
        rows.append(dict(preset=name + " gradcheck", grads=worst, ok=worst <= 1e-6))
        print(f"{name:14s} float64 max rel error {worst:.1e}  {'ok' if worst <= 1e-6 else 'FAIL'}")
    backend.set_backend("numpy")
    report["agreement"] = rows


def benchmark(report):
    section("3. training step: minimoe on CuPy vs PyTorch CUDA eager")
    try:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from gpu_bench import compare  # benchmarks/gpu_bench.py
    except Exception as e:  # torch missing, or no CUDA build
        print(f"skipped: {type(e).__name__}: {e}")
        report["benchmark"] = f"skipped: {e}"
        return
    rows = []
    for label, name, overrides, batch in (
        ("mixtral toy", "mixtral", {}, 12),
        ("mixtral 6x384", "mixtral", LARGE, 16),
    ):
        r = compare(name, batch, overrides)
        r["label"] = label
        rows.append(r)
        print(
            f"{label:14s} minimoe {r['minimoe_ms']:.2f} ms  torch {r['torch_ms']:.2f} ms  "
            f"ratio {r['ratio']:.2f} (target <= 1.5)"
        )
    report["benchmark"] = rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-tests", action="store_true", help="skip running the test suite on CuPy")
    ap.add_argument("--json", help="also write the report as JSON to this file")
    args = ap.parse_args(argv)
    try:
        backend.set_backend("cupy")
    except minimoe.BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import cupy

    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    dev = dev.decode() if isinstance(dev, bytes) else dev
    report = {"device": dev, "cupy": cupy.__version__, "numpy": np.__version__}
    print(f"device {dev}, CuPy {cupy.__version__}, NumPy {np.__version__}")
    t0 = time.time()
    if not args.skip_tests:
        run_tests(report)
    agreement(report)
    benchmark(report)
    report["seconds"] = round(time.time() - t0, 1)
    section(f"done in {report['seconds']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    bad = (report.get("tests", {}).get("returncode", 0) != 0) or not all(r["ok"] for r in report["agreement"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
