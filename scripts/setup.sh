#!/usr/bin/env bash
# Sets up everything rdp needs on a fresh Debian/Ubuntu machine (or a cluster login node):
#   - system packages pip cannot provide, only when missing: Open MPI (mpirun + mpi4py),
#     SLURM + munge (for the local test cluster in slurm/local_cluster.sh), bubblewrap (the
#     sandbox HumanEval's generated code runs in)
#   - a virtual environment in .venv with torch, DeepSpeed, megatron-core, WebDataset,
#     lm-eval, Triton, ... and rdp itself (editable), exposing the `rdp` command.
# Environment: RDP_TORCH (default torch==2.13.0, the CPU build on this project's machines;
# set it to e.g. "torch==2.5.1" on a cluster), RDP_SKIP_APT=1 to leave system packages alone
# (without root or password-less sudo they are skipped anyway, with a message).
set -euo pipefail
cd "$(dirname "$0")/.."

# system packages (MPI, SLURM, bubblewrap): skipped with a message where this user cannot install them
scripts/system_packages.sh

python3 -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q --upgrade pip 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${RDP_TORCH:-torch==2.13.0}" 2> >(grep -v "^WARNING: Location" >&2)
# DS_BUILD_OPS=0: DeepSpeed JIT-builds its CUDA ops on first use instead of at install
DS_BUILD_OPS=0 .venv/bin/pip install -q -e '.[test]' 2> >(grep -v "^WARNING: Location" >&2)
# fail here, not in the first test, when an install step went wrong
.venv/bin/python -W ignore -c "import torch, deepspeed, megatron.core, webdataset, lm_eval, rdp.pretrain, rdp.kernels" 2>/dev/null \
  || { echo "setup: the environment in .venv does not import; see the pip output above" >&2; exit 1; }
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
