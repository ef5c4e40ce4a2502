"""GPU check for minimoe: everything issue 17 asks of a real GPU, in one bounded run, with a report.

    bash scripts/gpu_check.sh --report "$OUT/gpu_report.md" --json "$OUT/gpu_report.json"
    bash scripts/gpu_check.sh --fake          # the same steps on the fake CuPy, on any machine

Steps (each bounded in time; the report says what ran, what failed and what was cut short):
  1. tests: the suite on the real CuPy (MINIMOE_TEST_BACKEND=cupy; the lessons and the wheel
     build left out): first the device pass of tests/device_pass.txt, then the tests that pass
     leaves out, then every other file; in parallel (pytest-xdist) where it is installed;
  2. agreement: CuPy against NumPy on the same weights and batch, float32, each toy preset
     (logits, loss, every gradient), eval mode (the two libraries' random streams differ);
  3. gradients: float64 `check_model` on the GPU (dense, mixtral, switch, deepseek, MLA);
  4. speed: one training step (forward, backward, AdamW) of minimoe on CuPy against its PyTorch
     twin (minimoe/bench/torch_twin.py) on CUDA, eager, same weights and batch, at the laptop
     size (mixtral preset, B=12, T=64) and at 6x384 (6 layers, C=384, 6 heads, T=256, B=16);
     the issue's target: minimoe within 1.5x of PyTorch at 6x384;
  5. train: `minimoe train --device gpu` for 200 steps: tokens/s from its metrics.jsonl.
Then it writes a Markdown report (for docs/) and, with --json, the same as JSON. Exit status 0
when every check passed, 1 when one failed, 2 when CuPy is unusable.

--fake runs every step on the numpy-backed fake CuPy (tests/fake_cupy.py) with PyTorch on the
CPU and smaller sizes: it proves that the script runs and reports, not anything about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tests"))  # fake_cupy (for --fake)

import minimoe  # noqa: E402
from minimoe import backend, gradcheck  # noqa: E402

TOYS = ("dense", "mixtral", "switch", "deepseek", "gpt4-rumoured")
LAPTOP = dict(label="laptop (mixtral, B=12, T=64)", preset="mixtral", batch=12, overrides={})
LARGE = dict(
    label="6x384 (mixtral, B=16, T=256)",
    preset="mixtral",
    batch=16,
    overrides=dict(n_layer=6, n_embd=384, n_head=6, block_size=256),
)
TARGET_RATIO = 1.5  # minimoe's step time over PyTorch's at 6x384 (issue 17)
# NumPy-only lessons (they skip on a device backend anyway) and wheel builds: host work, minutes
LEFT_OUT = (
    "test_lessons.py",
    "test_lessons_wheel.py",
    "test_nbgrader.py",
    "test_wrong_answers.py",
    "test_wheel.py",
)
TEST_TIMEOUTS = (150, 120, 120)  # seconds: device pass, the tests it leaves out, the other files


def section(title):
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


# ---------------------------------------------------------------------------------------- tests
def device_pass():
    """(files, -k names) of tests/device_pass.txt."""
    files, skip = [], []
    with open(os.path.join(ROOT, "tests", "device_pass.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("tests/"):
                files.append(line)
            elif line.startswith("-k "):
                skip.append(line[3:].strip())
    return files, skip


def _pytest(label, args, env, timeout):
    """One pytest run, bounded: {label, returncode, summary, failed: [...], seconds}."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *args]
    print(f"[{label}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    # a session of its own, so that a timeout ends pytest-xdist's workers too; Ctrl-C's default
    # action back (a shell's background job ignores SIGINT, and the signal tests need it)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = "timeout"
    lines = [ln for ln in out.splitlines() if ln.strip()]
    summary = next(
        (ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)), ""
    )
    if rc == "timeout":  # count the progress characters printed so far
        dots = "".join(ln.split(" [")[0] for ln in lines if re.fullmatch(r"[.FEsxX]+( +\[ *\d+%\])?", ln))
        summary = f"cut short after {timeout} s: {dots.count('.')} passed, {dots.count('F')} failed so far"
    failed = [ln.split(" - ")[0].split(" ", 1)[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    result = dict(label=label, returncode=rc, summary=summary or "(no summary)", failed=failed,
                  seconds=round(time.time() - t0, 1))  # fmt: skip
    print(f"[{label}] {result['summary']} in {result['seconds']} s", flush=True)
    if rc not in (0, "timeout"):
        print(out[-4000:], flush=True)
    return result


def run_tests(report, fake, timeouts):
    section("1. the test suite on " + ("the fake CuPy" if fake else "the real CuPy"))
    env = dict(os.environ, MINIMOE_TEST_BACKEND="fake-cupy" if fake else "cupy", MPLBACKEND="Agg",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    env.pop("MINIMOE_BACKEND", None)
    parallel = []
    with contextlib.suppress(ImportError):
        import xdist  # noqa: F401  (pytest-xdist: 8 processes share the one GPU)

        parallel = ["-n", str(min(8, os.cpu_count() or 1))]
    files, skip = device_pass()
    others = sorted(
        f"tests/{n}"
        for n in os.listdir(os.path.join(ROOT, "tests"))
        if n.startswith("test_") and n.endswith(".py") and f"tests/{n}" not in files
        and n not in LEFT_OUT
    )  # fmt: skip
    runs = [
        ("device pass", [*files, "-k", " and ".join(f"not {k}" for k in skip)]),
        ("left out of the device pass", [*files, "-k", " or ".join(skip)]),
        ("other files", others),
    ]
    report["tests"] = [
        _pytest(label, [*parallel, *args], env, timeout) for (label, args), timeout in zip(runs, timeouts)
    ]


# ------------------------------------------------------------------------------------ agreement
def agreement(report, fake):
    section("2. CuPy against NumPy on the same weights and batch (float32, eval mode)")
    rows = []
    for name in TOYS:
        out = {}
        for on in ("numpy", "cupy"):
            backend.set_backend(on)
            cfg = minimoe.get_preset(name, vocab_size=97)
            model = minimoe.GPT(cfg, seed=0).eval()  # no dropout or router noise: RNG streams differ
            rng = np.random.default_rng(0)
            idx, tgt = (rng.integers(0, cfg.vocab_size, (4, cfg.block_size)) for _ in range(2))
            logits, loss = model.forward(idx, tgt)
            grads = model.backward()
            out[on] = (
                backend.to_numpy(logits),
                float(loss),
                {k: backend.to_numpy(g) for k, g in grads.items()},
            )
        (l_np, loss_np, g_np), (l_cp, loss_cp, g_cp) = out["numpy"], out["cupy"]
        e_logits = gradcheck.rel_error(l_np, l_cp)
        e_loss = abs(loss_np - loss_cp) / abs(loss_np)
        worst = max(g_np, key=lambda k: gradcheck.rel_error(g_np[k], g_cp[k]))
        e_grad = gradcheck.rel_error(g_np[worst], g_cp[worst])
        ok = e_logits <= 1e-4 and e_loss <= 1e-5 and e_grad <= 1e-3  # float32, other summation orders
        rows.append(dict(preset=name, logits=e_logits, loss=e_loss, grads=e_grad, worst=worst, ok=ok))
        print(f"{name:14s} logits {e_logits:.1e}  loss {e_loss:.1e}  grads {e_grad:.1e} ({worst})  "
              f"{'ok' if ok else 'MISMATCH'}", flush=True)  # fmt: skip
    backend.set_backend("numpy")
    report["agreement"] = rows


# ------------------------------------------------------------------------------------ gradients
def gradients(report, fake):
    section("3. float64 gradient checks on the GPU (check_model, 20 entries per tensor)")
    small = dict(n_layer=2, n_embd=8, n_head=2, block_size=6, vocab_size=11, init_std=0.5, z_loss_coef=0.01)
    cases = {name: minimoe.get_preset(name, **small, **({} if name == "dense" else {"expert_hidden": 6}))
             for name in ("dense", "mixtral", "switch", "deepseek")}  # fmt: skip
    cases["mla-moe"] = minimoe.Config(
        flavour="llama", vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, ffn_hidden=12, init_std=0.5,
        attention="mla", q_lora_rank=6, kv_lora_rank=5, qk_nope_head_dim=3, qk_rope_head_dim=4, v_head_dim=2,
        n_experts=4, top_k=2, expert_hidden=6, n_shared_experts=1, first_dense=1,
    )  # fmt: skip
    rows = []
    backend.set_backend("cupy")
    for name, cfg in cases.items():
        model = minimoe.GPT(cfg, seed=0, dtype="float64")
        rng = np.random.default_rng(1)
        idx, tgt = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
        errors = gradcheck.check_model(model, idx, tgt, eps=1e-5, max_entries=20)
        worst = max(errors, key=errors.get)
        ok = errors[worst] <= 1e-6
        rows.append(dict(model=name, max_rel_error=errors[worst], worst=worst, ok=ok))
        print(f"{name:10s} max rel error {errors[worst]:.1e} ({worst})  {'ok' if ok else 'FAIL'}", flush=True)
    backend.set_backend("numpy")
    report["gradients"] = rows


# ---------------------------------------------------------------------------------------- speed
def speed(report, fake):
    section("4. a training step: minimoe on CuPy against PyTorch eager on " + ("the CPU" if fake else "CUDA"))
    try:
        import torch
    except ImportError as e:
        print(f"skipped: {e}")
        report["speed"] = f"skipped: {e}"
        return
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu_bench import compare  # benchmarks/gpu_bench.py

    device = "cpu" if fake else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        report["speed"] = "skipped: this PyTorch has no CUDA device"
        print(report["speed"])
        return
    rows = []
    for size in (LAPTOP, LARGE):
        overrides, batch, iters, warmup = dict(size["overrides"]), size["batch"], 20, 5
        if fake:  # the fake is numpy on the CPU: shrink, it only has to run
            overrides.update(n_layer=2, block_size=min(overrides.get("block_size", 64), 32))
            batch, iters, warmup = 2, 2, 1
        r = compare(size["preset"], batch, overrides, iters=iters, warmup=warmup, device=device)
        r["label"] = size["label"] + (" shrunk (fake)" if fake else "")
        rows.append(r)
        print(f"{r['label']:34s} minimoe {r['minimoe_ms']:8.2f} ms  torch {r['torch_ms']:8.2f} ms  "
              f"ratio {r['ratio']:.2f}", flush=True)  # fmt: skip
    report["speed"] = rows


# ---------------------------------------------------------------------------------------- train
def train_run(report, fake, steps):
    section(f"5. `minimoe train --device gpu` for {steps} steps")
    out = tempfile.mkdtemp(prefix="minimoe_gpu_check_")
    argv = ["train", "--device", "gpu", "--max-iters", str(steps), "--eval-interval", str(steps),
            "--eval-iters", "5", "--log-interval", "10", "--sample-tokens", "0", "--out", out]  # fmt: skip
    if fake:  # the CLI in a process of its own, with the fake installed first
        code = "import sys, fake_cupy; fake_cupy.install(); from minimoe.cli import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, *argv]
    else:
        cmd = [sys.executable, "-m", "minimoe", *argv]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("MINIMOE_BACKEND", None)
    print("$ minimoe " + " ".join(argv), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds = round(time.time() - t0, 1)
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-3000:])
        report["train"] = dict(
            ok=False, returncode=proc.returncode, seconds=seconds, error=proc.stderr[-500:]
        )
        return
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    tps = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records]  # first: warm-up
    done = next((ln for ln in proc.stdout.splitlines() if ln.startswith("done:")), "")
    report["train"] = dict(ok=True, steps=records[-1]["step"], tokens_per_s=float(np.median(tps)),
                           val_loss=records[-1].get("val_loss"), seconds=seconds, done=done)  # fmt: skip
    print(
        f"{done}\nmedian tokens/s over the log records after the first: {report['train']['tokens_per_s']:,.0f}"
    )


# --------------------------------------------------------------------------------------- report
def environment(fake):
    env = {"numpy": np.__version__, "python": platform.python_version()}
    import cupy

    if fake:
        env["device"] = "fake CuPy (tests/fake_cupy.py: numpy on the CPU) -- NOT A GPU"
    else:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        env["device"] = name.decode() if isinstance(name, bytes) else name
        env["cupy"] = cupy.__version__
        env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    with contextlib.suppress(ImportError):
        import torch

        env["torch"] = torch.__version__
    return env


def _ok(report):
    tests = report.get("tests", [])
    checks = [all(t["returncode"] == 0 for t in tests)]
    checks += [r["ok"] for r in report.get("agreement", []) + report.get("gradients", [])]
    checks += [report.get("train", {}).get("ok", True)]
    return all(checks)


def markdown(report) -> str:
    e, fake = report["environment"], report["fake"]
    lines = [f"# GPU check: {e['device']}", ""]
    if fake:
        lines += ["**FAKE RUN**: every step ran on the numpy-backed fake CuPy with PyTorch on the CPU and "
                  "shrunk sizes. It shows that `scripts/gpu_check.sh` runs and reports; its numbers say "
                  "nothing about a GPU.", ""]  # fmt: skip
    lines += [f"Run {report['date']} with `{report['command']}` in {report['seconds']} s; "
              + ", ".join(f"{k} {v}" for k, v in e.items() if k != "device") + ".", "",
              f"Overall: **{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}**.", ""]  # fmt: skip
    if "tests" in report:
        lines += ["## 1. The test suite on CuPy", "", "| part | result | seconds |", "|---|---|---|"]
        lines += [f"| {t['label']} | {t['summary']} | {t['seconds']} |" for t in report["tests"]]
        failed = [f for t in report["tests"] for f in t["failed"]]
        lines += [""] + ([f"Failed: {', '.join(failed)}", ""] if failed else [])
    if report.get("agreement"):
        lines += ["## 2. CuPy against NumPy, same weights and batch (float32, max-norm relative errors)", "",
                  "| preset | logits | loss | worst gradient | |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['preset']} | {r['logits']:.1e} | {r['loss']:.1e} | {r['grads']:.1e} ({r['worst']}) | "
                  f"{'ok' if r['ok'] else 'MISMATCH'} |" for r in report["agreement"]] + [""]  # fmt: skip
    if report.get("gradients"):
        lines += ["## 3. float64 gradient checks on the GPU (tolerance 1e-6)", "",
                  "| model | max rel error | |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {r['model']} | {r['max_rel_error']:.1e} ({r['worst']}) | {'ok' if r['ok'] else 'FAIL'} |"
                  for r in report["gradients"]] + [""]  # fmt: skip
    if "speed" in report:
        lines += [
            f"## 4. One training step against PyTorch eager (target: at most {TARGET_RATIO}x at 6x384)",
            "",
        ]
        if isinstance(report["speed"], str):
            lines += [report["speed"], ""]
        else:
            lines += ["| size | minimoe ms | PyTorch ms | ratio |", "|---|---|---|---|"]
            lines += [f"| {r['label']} | {r['minimoe_ms']:.2f} | {r['torch_ms']:.2f} | {r['ratio']:.2f} |"
                      for r in report["speed"]]  # fmt: skip
            lines += ["", "Medians of alternating steps, each ended by a device synchronisation.", ""]
    if "train" in report:
        t = report["train"]
        lines += ["## 5. `minimoe train --device gpu`", ""]
        lines += ([f"{t['steps']} steps in {t['seconds']} s (with start-up and one evaluation): median "
                   f"{t['tokens_per_s']:,.0f} tokens/s over the log records after the first; {t['done']}", ""]
                  if t["ok"] else [f"FAILED (exit status {t['returncode']}): {t['error']}", ""])  # fmt: skip
    if report.get("errors"):
        lines += ["## Errors", "", *[f"- {k}: {v}" for k, v in report["errors"].items()], ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fake", action="store_true", help="run every step on the fake CuPy (no GPU needed)")
    ap.add_argument("--report", help="write the Markdown report here (default: docs/gpu_report.md, "
                    "or a temporary file with --fake)")  # fmt: skip
    ap.add_argument("--json", help="also write the report as JSON to this file")
    ap.add_argument("--skip-tests", action="store_true", help="skip step 1, the test suite")
    ap.add_argument("--test-timeouts", type=int, nargs=3, default=TEST_TIMEOUTS, metavar="S",
                    help="seconds for the device pass, the tests it leaves out, and the other files")  # fmt: skip
    ap.add_argument("--steps", type=int, help="training steps of step 5 (default 200; 20 with --fake)")
    args = ap.parse_args(argv)
    if args.fake:
        import fake_cupy

        fake_cupy.install()
    try:
        backend.set_backend("cupy")
    except minimoe.BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backend.set_backend("numpy")
    t0 = time.time()
    report = dict(fake=args.fake, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  command="bash scripts/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
                  environment=environment(args.fake), errors={})  # fmt: skip
    print(f"{report['environment']}")
    steps = [("agreement", agreement), ("gradients", gradients), ("speed", speed),
             ("train", lambda r, f: train_run(r, f, args.steps or (20 if args.fake else 200)))]  # fmt: skip
    if not args.skip_tests:
        steps.insert(0, ("tests", lambda r, f: run_tests(r, f, args.test_timeouts)))
    for name, step in steps:
        try:
            step(report, args.fake)
        except Exception as e:  # one broken step must not hide the others' results
            traceback.print_exc()
            report["errors"][name] = f"{type(e).__name__}: {e}"
            backend.set_backend("numpy")
    report["seconds"] = round(time.time() - t0, 1)
    report["ok"] = _ok(report) and not report["errors"]
    text = markdown(report)
    path = args.report or (os.path.join(tempfile.gettempdir(), "gpu_report_fake.md") if args.fake
                           else os.path.join(ROOT, "docs", "gpu_report.md"))  # fmt: skip
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
    section(f"done in {report['seconds']} s: report in {path}")
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
