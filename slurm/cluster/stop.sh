#!/usr/bin/env bash
# Stop the test cluster started by slurm/cluster/start.sh (same BASE).
#
#   bash slurm/cluster/stop.sh [--purge]
#
# Cancels the jobs still in the queue (so no job processes outlive slurmd), then stops every
# daemon by its PID file under $BASE/run (slurmd x2, slurmctld, slurmdbd, MariaDB, munged) and
# waits for each to exit (SIGKILL after STOP_TIMEOUT seconds, default 30).
# --purge also deletes $BASE (config, state, database, logs).
# Environment: BASE (default /tmp/proseco-slurm), STOP_TIMEOUT.
set -uo pipefail

BASE=${BASE:-/tmp/proseco-slurm}
TIMEOUT=${STOP_TIMEOUT:-30}
PURGE=0
for a in "$@"; do
  case "$a" in
    --purge) PURGE=1 ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stop.sh: unknown argument: $a" >&2; exit 2 ;;
  esac
done
export PATH="$PATH:/usr/sbin:/sbin"
RUN=$BASE/run
CONF=$BASE/slurm.conf
ORDER=(slurmd-node1 slurmd-node2 slurmctld slurmdbd mysqld munged)

# pid_of NAME: the PID from $RUN/NAME.pid if it is a live (non-zombie) process of the expected
# program; never trusts a stale file whose PID now belongs to something else.
pid_of() {
  local f=$RUN/$1.pid pid comm state
  [ -s "$f" ] || return 1
  pid=$({ tr -dc '0-9' <"$f"; } 2>/dev/null); [ -n "$pid" ] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  case "$1" in
    mysqld) [[ "$comm" == mariadbd || "$comm" == mysqld ]] || return 1 ;;
    slurmd-*) [[ "$comm" == slurmd* ]] || return 1 ;;
    *) [[ "$comm" == "$1"* ]] || return 1 ;;
  esac
  echo "$pid"
}

# 1. cancel leftover jobs while slurmctld and the slurmds are still up
if pid_of slurmctld >/dev/null && [ -f "$CONF" ]; then
  export SLURM_CONF=$CONF
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "stop.sh: cancelling jobs: $jobs"
    # shellcheck disable=SC2086  # one argument per job id
    timeout 10 scancel $jobs 2>/dev/null || true
    # wait until no job is pending/running/completing (KillWait=3 s for jobs that ignore SIGTERM)
    end=$((SECONDS + 20))
    while [ $SECONDS -lt $end ] && [ -n "$(timeout 10 squeue -h -t PD,R,CG,S,CF -o %i 2>/dev/null)" ]; do sleep 0.5; done
  fi
fi

# 2. SIGTERM every daemon, then wait for each
declare -A PIDS=()
for d in "${ORDER[@]}"; do
  if pid=$(pid_of "$d"); then
    kill -TERM "$pid" 2>/dev/null && PIDS[$d]=$pid && echo "stop.sh: stopping $d ($pid)"
    # the slurmds first, and slurmctld/slurmdbd before the database they write to
    if [[ "$d" == slurmdbd || "$d" == slurmctld ]]; then
      end=$((SECONDS + TIMEOUT)); while [ $SECONDS -lt $end ] && pid_of "$d" >/dev/null; do sleep 0.1; done
    fi
  fi
done
rc=0
for d in "${ORDER[@]}"; do
  [ -n "${PIDS[$d]:-}" ] || continue
  end=$((SECONDS + TIMEOUT))
  while [ $SECONDS -lt $end ] && pid_of "$d" >/dev/null; do sleep 0.1; done
  if pid=$(pid_of "$d"); then
    echo "stop.sh: $d ($pid) still running after ${TIMEOUT}s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null; sleep 0.5
    pid_of "$d" >/dev/null && { echo "stop.sh: error: $d ($pid) would not die" >&2; rc=1; }
  fi
  rm -f "$RUN/$d.pid"
done
[ ${#PIDS[@]} -gt 0 ] && echo "stop.sh: all stopped" || echo "stop.sh: nothing was running under $BASE"

# 3. optional purge (only a folder that start.sh made)
if [ $PURGE = 1 ] && [ -d "$BASE" ]; then
  if [ $rc = 0 ] && [ -f "$BASE/.proseco-slurm-cluster" ]; then
    rm -rf -- "$BASE" && echo "stop.sh: removed $BASE"
  else
    echo "stop.sh: not removing $BASE (daemons left, or not made by start.sh)" >&2; rc=1
  fi
fi
exit $rc
