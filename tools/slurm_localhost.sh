#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (slurmctld + slurmd on localhost, munge for
# authentication), for testing the batch templates in examples/slurm/ for real.
#
#   tools/slurm_localhost.sh start DIR [CTLD_PORT SLURMD_PORT]   prints: export SLURM_CONF=DIR/slurm.conf
#   tools/slurm_localhost.sh stop DIR
#
# Everything (config, munge key and socket, state, logs) lives in DIR, so it neither needs
# nor touches a system-wide Slurm or munge set-up. Debian's slurm-wlm and munge are
# installed when missing (as root, like tools/install_system_packages.sh). Jobs run as
# the calling user; the node offers all of this machine's CPUs.
set -euo pipefail

action=${1:?usage: slurm_localhost.sh start|stop DIR [CTLD_PORT SLURMD_PORT]}
dir=$(realpath -m "${2:?usage: slurm_localhost.sh start|stop DIR}")

stop() {
  for pidfile in slurmd.pid slurmctld.pid munged.pid; do
    if [ -f "$dir/$pidfile" ]; then
      kill "$(cat "$dir/$pidfile")" 2>/dev/null || true
      rm -f "$dir/$pidfile"
    fi
  done
}

if [ "$action" = stop ]; then
  stop
  exit 0
fi
[ "$action" = start ] || { echo "unknown action $action (start or stop)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "please install slurm-wlm and munge (Debian/Ubuntu: apt-get install slurm-wlm munge)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

ctld_port=${3:-6817}
slurmd_port=${4:-6818}
host=$(hostname)
user=$(id -un)
mkdir -p "$dir/state" "$dir/spool" "$dir/logs"
[ -f "$dir/munge.key" ] || { head -c 1024 /dev/urandom > "$dir/munge.key"; chmod 600 "$dir/munge.key"; }

cat > "$dir/slurm.conf" <<EOF
ClusterName=megavl-localhost
SlurmctldHost=$host
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
# A requeued job may start again once its old credential expires (Slurm holds it that long).
AuthInfo=socket=$dir/munge.sock,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/logs/slurmctld.log
SlurmdLogFile=$dir/logs/slurmd.log
# No cgroups: processes are tracked by their parent links, which any container allows.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Batch jobs may be requeued (the templates requeue themselves after a preemption).
JobRequeue=1
# Keep finished jobs visible to scontrol for a while, so tests can read their state.
MinJobAge=600
NodeName=$host CPUs=$(getconf _NPROCESSORS_ONLN) RealMemory=$(( $(free -m | awk '/^Mem:/ {print $2}') * 9 / 10 )) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

stop
munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" --log-file="$dir/logs/munged.log" \
  --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed"
export SLURM_CONF="$dir/slurm.conf"
slurmctld
slurmd
for _ in $(seq 1 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
    echo "export SLURM_CONF=$dir/slurm.conf"
    exit 0
  fi
  sleep 0.5
done
echo "the localhost Slurm cluster did not come up; logs in $dir/logs" >&2
tail -n 20 "$dir/logs/slurmctld.log" "$dir/logs/slurmd.log" >&2 || true
stop
exit 1
