#!/usr/bin/env bash
# The system packages pip cannot provide, installed with apt-get only when missing and only
# where this user may: Open MPI (mpirun + the headers mpi4py builds against) and SLURM + munge
# (for the local test cluster in slurm/local_cluster.sh), bubblewrap (the HumanEval sandbox,
# evals/sandbox.py). Called by scripts/setup.sh.
#
# As root: apt-get directly. Otherwise with `sudo -n` when password-less sudo works. Otherwise
# (a cluster login node, where MPI and SLURM come from the site's modules) nothing is
# installed: one message says what was skipped and the setup goes on. RDP_SKIP_APT=1 skips
# this step on purpose, silently.
set -euo pipefail

[ "${RDP_SKIP_APT:-0}" = 1 ] && exit 0

missing=()
command -v mpirun >/dev/null || missing+=(openmpi-bin libopenmpi-dev)
command -v slurmctld >/dev/null || missing+=(slurmctld slurmd slurm-client munge libpmix2)
command -v bwrap >/dev/null || missing+=(bubblewrap)
[ ${#missing[@]} -eq 0 ] && exit 0

skip() {
  echo "setup: not installing system packages (${missing[*]}): $1. Without them rdp trains and" \
       "evaluates as usual; mpirun launches, the local SLURM test cluster and sandboxed HumanEval" \
       "need them (on a cluster, load its MPI/SLURM modules)." \
       "Set RDP_SKIP_APT=1 to skip this step silently." >&2
  exit 0
}

command -v apt-get >/dev/null || skip "no apt-get on this system (install them with its package manager)"
if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  skip "not root and no password-less sudo (with sudo rights: sudo scripts/system_packages.sh)"
fi
echo "setup: installing system packages: ${missing[*]}"
"${sudo[@]}" apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
