#!/usr/bin/env bash
# A one-node SLURM on this machine, for tests, CI and trying the sbatch scripts.
#
#   slurm/local-cluster.sh up       install slurm-wlm if missing (apt-get), start slurmctld + slurmd
#                                   (exit 3 when it cannot be installed, 1 when it does not start)
#   slurm/local-cluster.sh status   is it answering? (exit 0 if yes)
#   slurm/local-cluster.sh down     stop both daemons and remove the state directory
#
# Then point the clients at it:  export SLURM_CONF=${ARTSCALE_SLURM_DIR:-/tmp/artscale-slurm}/slurm.conf
#
# Everything (slurm.conf, state, spool, logs, pid files) lives under ARTSCALE_SLURM_DIR
# (default /tmp/artscale-slurm); `down` removes it. No munge (auth/none), no systemd, no
# accounting database (so `sacct` does not answer: poll `squeue` / `scontrol show job`).
# Ports: ARTSCALE_SLURMCTLD_PORT (default 6817), ARTSCALE_SLURMD_PORT (default 6818).
# Only for a machine you control: auth/none lets any local user act as any other.
set -euo pipefail

DIR=${ARTSCALE_SLURM_DIR:-/tmp/artscale-slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${ARTSCALE_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${ARTSCALE_SLURMD_PORT:-6818}
export SLURM_CONF=$CONF

say() { echo "local-cluster: $*" >&2; }

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return 0
    command -v apt-get >/dev/null || { say "slurm is not installed and apt-get is missing; install slurm-wlm yourself"; return 1; }
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { say "installing slurm-wlm needs root (or sudo)"; return 1; }
        sudo="sudo -n"
    fi
    say "installing slurmctld slurmd slurm-client (Debian slurm-wlm)"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client >/dev/null
}

write_conf() {
    local host node user
    host=$(hostname)
    # `slurmd -C` reports this machine's real CPUs, sockets and memory in slurm.conf syntax.
    node=$(slurmd -C | head -n 1)
    user=$(id -un)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF.tmp" <<EOF
ClusterName=artscale-local
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
# no munge: fine on a single machine you control, never on a shared cluster
AuthType=auth/none
CredType=cred/none
# without it a requeued job waits 120 s before it may start again
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# look at pending jobs every second (defaults 60 s / 30 s: a requeued job would idle that long)
SchedulerParameters=sched_interval=1,bf_interval=1
# a job whose dependency failed is cancelled instead of pending forever
DependencyParameters=kill_invalid_depend
MpiDefault=none
ReturnToService=2
JobRequeue=1
# finished jobs stay visible to squeue/scontrol for 10 minutes (there is no sacct)
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
$node State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

answering() { scontrol ping 2>/dev/null | grep -q "UP" && sinfo -h -o %t 2>/dev/null | grep -Eq "^(idle|mix|alloc)"; }

daemon_alive() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

up() {
    # exit 3: SLURM cannot be installed here (the tests marked slurm then skip); 1: it would not start
    install_slurm || exit 3
    if daemon_alive slurmctld && daemon_alive slurmd && answering; then
        say "already up"; echo "export SLURM_CONF=$CONF"; return 0
    fi
    write_conf
    daemon_alive slurmctld || slurmctld -f "$CONF"
    daemon_alive slurmd || slurmd -f "$CONF"
    for _ in $(seq 1 60); do
        if answering; then
            say "up in $DIR"; echo "export SLURM_CONF=$CONF"; return 0
        fi
        sleep 0.5
    done
    say "did not come up in 30 s; logs: $DIR/log"; tail -n 5 "$DIR"/log/*.log >&2 || true
    return 1
}

stop_daemon() {
    local pidfile=$DIR/$1.pid pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    if [ -f "$CONF" ] && command -v scancel >/dev/null; then scancel --full --user "$(id -un)" 2>/dev/null || true; fi
    stop_daemon slurmd
    stop_daemon slurmctld
    rm -rf "$DIR"
    say "down"
}

status() {
    if answering; then sinfo; echo "export SLURM_CONF=$CONF"; else say "not running"; return 1; fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
