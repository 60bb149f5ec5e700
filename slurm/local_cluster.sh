#!/usr/bin/env bash
# A real single-node SLURM cluster (munged + slurmctld + slurmd) with all its state under
# one folder, for the test suite and for trying `rdp submit` on a laptop or a CI box.
#
#   slurm/local_cluster.sh start [DIR]    start the daemons, wait for an idle node,
#                                          print the line to export SLURM_CONF
#   slurm/local_cluster.sh stop  [DIR]    cancel jobs, stop the daemons started from DIR
#   slurm/local_cluster.sh env   [DIR]    print `export SLURM_CONF=...` for DIR
#
# DIR defaults to $RDP_SLURM_DIR or /tmp/rdp-slurm. Needs root (slurmd runs jobs as their
# user; as root run it directly, no sudo needed) and the Debian packages slurmctld slurmd
# slurm-client munge (scripts/setup.sh installs them). Nothing outside DIR is written, except /etc/hosts when the short host
# name does not resolve. Settings (environment):
#   RDP_SLURM_CPUS          CPUs the node declares (default 8; more than the real cores
#                           so several 1-CPU jobs run at once; SlurmdParameters=config_overrides)
#   RDP_SLURM_CTLD_PORT     slurmctld port (default 6817), RDP_SLURM_SLURMD_PORT (default 6818)
# Partitions: `debug` (default, PriorityTier=1) and `urgent` (PriorityTier=2): a job in
# `urgent` preempts (requeues) jobs of `debug` when it needs their CPUs.
set -euo pipefail

action="${1:-}"
state_dir="${2:-${RDP_SLURM_DIR:-/tmp/rdp-slurm}}"
cpus="${RDP_SLURM_CPUS:-8}"
ctld_port="${RDP_SLURM_CTLD_PORT:-6817}"
slurmd_port="${RDP_SLURM_SLURMD_PORT:-6818}"
node="$(hostname -s)"

die() { echo "local_cluster: $*" >&2; exit 1; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll, never a fixed sleep
  local deadline=$((SECONDS + $1)) what="$2"; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
  [ -n "$what" ] || true
}

write_config() {
  local memory_mb
  # declare a bit less than what is free so slurmd never reports the node as short of memory
  memory_mb=$(awk '/MemAvailable/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
  echo "NodeName=$node Name=token Count=1" >"$state_dir/gres.conf"
  # PMIx keeps per-step folders named by job id; under /tmp a folder left by a killed step of
  # an earlier cluster (job ids restart) makes a later step with the same id fail to launch
  mkdir -p "$state_dir/pmix"
  echo "PMIxCliTmpDirBase=$state_dir/pmix" >"$state_dir/mpi.conf"
  cat >"$state_dir/slurm.conf" <<EOF
# written by slurm/local_cluster.sh; the comments below say why a line is needed
ClusterName=rdp-local
SlurmctldHost=$node
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job otherwise waits ~120 s in PENDING before it may run again
AuthInfo=socket=$state_dir/munge/munge.socket,cred_expire=10
MailProg=/bin/true
StateSaveLocation=$state_dir/state
SlurmdSpoolDir=$state_dir/spool
SlurmctldPidFile=$state_dir/run/slurmctld.pid
SlurmdPidFile=$state_dir/run/slurmd.pid
SlurmctldLogFile=$state_dir/log/slurmctld.log
SlurmdLogFile=$state_dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups and no accounting database on these machines
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=pmix
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
# job ids differ from one cluster start to the next, so nothing keyed by job id collides
FirstJobId=$(( $(date +%s) % 100000 * 100 + 1 ))
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# one "token": a count-only resource a job can hold, so a test can preempt exactly that job
GresTypes=token
NodeName=$node CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$memory_mb Gres=token:1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=NO
PartitionName=urgent Nodes=$node Default=NO MaxTime=INFINITE State=UP PriorityTier=2 OverSubscribe=NO
EOF
}

start_munge() {
  local munge_dir="$state_dir/munge"
  mkdir -p "$munge_dir"
  if [ ! -s "$munge_dir/munge.key" ]; then
    dd if=/dev/urandom of="$munge_dir/munge.key" bs=1024 count=1 status=none
  fi
  # the socket directory must be world-executable (munge checks), the key private
  chmod 0755 "$munge_dir"; chmod 0600 "$munge_dir/munge.key"
  local munge_user=root
  getent passwd munge >/dev/null && munge_user=munge
  chown -R "$munge_user:" "$munge_dir"
  local args=(--socket="$munge_dir/munge.socket" --key-file="$munge_dir/munge.key"
              --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log"
              --seed-file="$munge_dir/munged.seed")
  if [ "$munge_user" = munge ]; then
    runuser -u munge -- munged "${args[@]}" </dev/null >>"$state_dir/log/munged.out" 2>&1
  else
    munged --force "${args[@]}" </dev/null >>"$state_dir/log/munged.out" 2>&1
  fi
  wait_for 10 munge test -S "$munge_dir/munge.socket" || die "munged did not start; see $munge_dir/munged.log"
}

node_state() { scontrol show node "$node" 2>/dev/null | sed -n 's/.*State=\([A-Z+_]*\).*/\1/p'; }
node_idle() { case "$(node_state)" in IDLE*|MIXED*|ALLOCATED*) return 0 ;; *) return 1 ;; esac; }

start() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their users): sudo $0 start $state_dir"
  for binary in slurmctld slurmd munged scontrol sbatch; do
    command -v "$binary" >/dev/null || die "$binary not found; install slurmctld slurmd slurm-client munge (scripts/setup.sh)"
  done
  getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >>/etc/hosts
  if pid_alive "$state_dir/run/slurmctld.pid"; then
    die "a cluster already runs from $state_dir (slurmctld pid $(cat "$state_dir/run/slurmctld.pid")); stop it first"
  fi
  mkdir -p "$state_dir"/{state,spool,run,log}
  write_config
  export SLURM_CONF="$state_dir/slurm.conf"
  start_munge
  # -c: start from a clean job state; stdio to files so no caller's pipe stays open
  slurmctld -c </dev/null >>"$state_dir/log/slurmctld.out" 2>&1 \
    || die "slurmctld failed; see $state_dir/log/slurmctld.log"
  wait_for 30 ctld scontrol ping || die "slurmctld does not answer; see $state_dir/log/slurmctld.log"
  slurmd </dev/null >>"$state_dir/log/slurmd.out" 2>&1 || die "slurmd failed; see $state_dir/log/slurmd.log"
  wait_for 60 node node_idle || die "node $node never became idle (state $(node_state)); see $state_dir/log/slurmd.log"
  echo "export SLURM_CONF=$state_dir/slurm.conf"
}

stop_pid() {  # stop_pid PIDFILE: TERM, wait, KILL; only the process this cluster started
  local pidfile="$1" pid
  pid_alive "$pidfile" || return 0
  pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  wait_for 20 "" sh -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
}

stop() {
  export SLURM_CONF="$state_dir/slurm.conf"
  if [ -f "$SLURM_CONF" ] && pid_alive "$state_dir/run/slurmctld.pid"; then
    scancel --full --quiet --partition=debug,urgent 2>/dev/null || true
    # let running jobs end so no job process outlives the daemons
    wait_for 30 "" sh -c '[ -z "$(squeue -h -t RUNNING,COMPLETING -o %i)" ]' || true
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  stop_pid "$state_dir/run/slurmctld.pid"
  stop_pid "$state_dir/run/slurmd.pid"
  stop_pid "$state_dir/munge/munged.pid"
  echo "local_cluster: stopped (state left in $state_dir)"
}

case "$action" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$state_dir/slurm.conf" ;;
  *) echo "usage: $0 start|stop|env [STATE_DIR]" >&2; exit 2 ;;
esac
