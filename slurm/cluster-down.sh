#!/usr/bin/env bash
# Stop the one-node Slurm cluster started by slurm/cluster-up.sh.  Idempotent:
# stopping an already stopped cluster is a no-op.
#
#   bash slurm/cluster-down.sh             # stop slurmd + slurmctld
#   bash slurm/cluster-down.sh --cancel    # first cancel all jobs (queued and running)
#   bash slurm/cluster-down.sh --munge     # also stop munged
#
# By default munged is left running: it is cheap, other tools may use it, and
# cluster-up.sh reuses it.  Without --cancel, queued jobs stay in slurmctld's
# saved state and are picked up again by the next cluster-up.sh; running batch
# steps are not killed by stopping slurmd (that is how Slurm works), so use
# --cancel for a clean slate.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

CANCEL=0
STOP_MUNGE=0
for arg in "$@"; do
    case $arg in
        --cancel) CANCEL=1 ;;
        --munge) STOP_MUNGE=1 ;;
        -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown option: $arg" >&2; exit 2 ;;
    esac
done

CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
export SLURM_CONF=${SLURM_CONF_FILE:-/etc/slurm/slurm.conf}

log() { echo "[cluster-down] $*"; }

[[ $(id -u) -eq 0 ]] || { echo "[cluster-down] ERROR: must run as root" >&2; exit 1; }

# Pid of a running daemon NAME: from its pid file if that is valid, else by
# exact process name (ps -C, not a pattern match on command lines).
daemon_pids() { # PIDFILE NAME
    local pid
    if [[ -s $1 ]]; then
        pid=$(<"$1")
        if [[ $pid =~ ^[0-9]+$ && $(ps -p "$pid" -o comm= 2>/dev/null) == "$2" ]]; then
            echo "$pid"
            return
        fi
    fi
    # Skip zombies (Z): in containers whose PID 1 does not reap orphans, the
    # daemons' exited fork parents linger as zombies with the same name.
    ps -C "$2" -o pid=,stat= 2>/dev/null | awk '$2 !~ /^Z/ {print $1}'
}

stop_daemon() { # PIDFILE NAME
    local pids p
    pids=$(daemon_pids "$1" "$2")
    if [[ -z $pids ]]; then
        log "$2 not running"
        return 0
    fi
    log "stopping $2 (pid $(echo $pids))"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 75); do
        alive=0
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && { rm -f "$1"; return 0; }
        sleep 0.2
    done
    log "$2 did not exit after 15 s; sending SIGKILL"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    rm -f "$1"
}

if [[ $CANCEL -eq 1 ]] && [[ -n $(daemon_pids "$CTLD_PID" slurmctld) ]]; then
    log "cancelling all jobs"
    # %F = array job id (plain job id for non-array jobs): cancels whole arrays.
    mapfile -t ids < <(squeue -h -o '%F' 2>/dev/null | sort -u)
    [[ ${#ids[@]} -eq 0 ]] || scancel --full "${ids[@]}" 2>/dev/null || true
    # Give running jobs a moment to be torn down while slurmd is still up.
    for _ in $(seq 1 30); do
        [[ -z $(squeue -h -t running,completing 2>/dev/null) ]] && break
        sleep 1
    done
fi

stop_daemon "$SLURMD_PID" slurmd
stop_daemon "$CTLD_PID" slurmctld

if [[ $STOP_MUNGE -eq 1 ]]; then
    stop_daemon /run/munge/munged.pid munged
fi

log "Slurm cluster is down"
