#!/usr/bin/env bash
# A single-node Slurm on this machine, for the tests marked `slurm` (and to try the scripts by hand):
# munged, slurmctld and slurmd on localhost, state and spool under $SLURM_DIR (default /tmp/noise-slurm).
# Needs root and Debian's `slurm-wlm` and `munge`. Prints `export SLURM_CONF=...`: eval it, or pass it on.
#   eval "$(sudo bash scripts/start_slurm.sh)" && sinfo
set -euo pipefail
DIR=${SLURM_DIR:-/tmp/noise-slurm}
HOST=$(hostname -s)
CPUS=$(nproc)
MEMORY=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # MB, leaving a fifth to the system
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"

# munge: a key readable by its daemon alone, the daemon as the munge user
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
fi

cat >"$DIR/slurm.conf" <<CONF
ClusterName=noise
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
MinJobAge=3600
SchedulerParameters=defer_batch
NodeName=$HOST CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$DIR/slurm.conf

pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
sleep 1
/usr/sbin/slurmctld -c -f "$SLURM_CONF"  # -c: a clean start, no jobs from an earlier one
/usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "Slurm did not come up; see $DIR/log/" >&2
exit 1
