#!/usr/bin/env bash
# Check minimoe on an NVIDIA GPU, in one bounded run (about 6 minutes on an H200), and write the
# report for docs/ (docs/gpu.md says what each step proves):
#   1. the test suite on the real CuPy   2. CuPy against NumPy on the same weights
#   3. float64 gradient checks on the GPU   4. a training step against PyTorch CUDA eager
#   5. tokens/s of `minimoe train --device gpu` for 200 steps
# On the project's GPU machine (its results come back from $OUT only):
#   bash scripts/gpu_check.sh --report "$OUT/gpu_report.md" --json "$OUT/gpu_report.json" 2>&1 | tee "$OUT/gpu_check.log"
# Anywhere, to check this script itself: bash scripts/gpu_check.sh --fake (the fake CuPy; no GPU numbers).
# Needs numpy, pytest and CuPy (pip install -e ".[gpu,test]"); PyTorch with CUDA for step 4;
# pytest-xdist, where installed, runs step 1 in parallel. minimoe runs from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
