#!/usr/bin/env bash
# Check minimoe on an NVIDIA GPU: tests on CuPy, CuPy vs NumPy agreement, speed vs PyTorch CUDA.
# Needs: pip install -e ".[gpu,test]" (CuPy), and optionally PyTorch with CUDA for the speed part.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python scripts/gpu_check.py "$@"
