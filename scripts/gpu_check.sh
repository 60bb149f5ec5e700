#!/usr/bin/env bash
# The first command on a GPU machine: compiled Triton kernel checks (fwd + bwd, bf16) against the
# references, kernel timings against SDPA / torch ops, and a huginn-3.5b training step with
# tokens/s and MFU, all in one JSON report (at most about 8 minutes on one H100/H200).
#   scripts/gpu_check.sh [--out DIR] [--layers full|reduced|auto] [--skip checks,timings,train]
# Details: scripts/gpu_check.py and docs/kernels.md. Refuses in one line without a CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${RDP_PYTHON:-.venv/bin/python}
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a GPU node -- nothing was checked or written" >&2
  exit 2
fi
unset TRITON_INTERPRET
exec "$python" scripts/gpu_check.py "$@"   # parts time out on their own (210 s + 180 s), the report is written after each
