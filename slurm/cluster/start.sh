#!/usr/bin/env bash
# Start a throw-away SLURM test cluster on this machine, everything under $BASE and on loopback:
#   munged + MariaDB + slurmdbd (so sacct works) + slurmctld + two slurmd (virtual nodes node1, node2).
# For tests and CI only; not a production set-up (root daemons, fixed passwords, no cgroups).
#
#   bash slurm/cluster/start.sh [--cpus N]      # last line printed: export SLURM_CONF=...
#
# Environment:
#   BASE            where config, state, logs, PID files and the database live (default /tmp/proseco-slurm)
#   CPUS_PER_NODE   CPUs of each virtual node (default 1; may exceed the real core count)
#   MEM_PER_NODE    RealMemory of each node in MB (default 4000)
#   START_TIMEOUT   seconds to wait for each daemon / for both nodes to be idle (default 60)
#
# Idempotent: when the cluster under $BASE is already running, it says so and exits 0.
# Stop it with slurm/cluster/stop.sh (same BASE).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BASE=${BASE:-/tmp/proseco-slurm}
CPUS=${CPUS_PER_NODE:-1}
MEM=${MEM_PER_NODE:-4000}
TIMEOUT=${START_TIMEOUT:-60}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpus) CPUS=$2; shift 2 ;;
    --cpus=*) CPUS=${1#--cpus=}; shift ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "start.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || { echo "start.sh: CPUs per node must be a positive integer, got '$CPUS'" >&2; exit 2; }

export PATH="$PATH:/usr/sbin:/sbin"
CLUSTER=proseco
USER_NAME=$(id -un)
# Ports: slurmctld 16817, slurmd (unused default) 16818, slurmdbd 16819, node1/node2 16821/16822, MariaDB 13306.
DAEMONS=(munged mysqld slurmdbd slurmctld slurmd-node1 slurmd-node2)

T0=$EPOCHREALTIME
elapsed() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'; }
die() { echo "start.sh: error: $*" >&2; exit 1; }

# ---- binaries
missing=()
for b in munged mariadbd mariadb mariadb-install-db slurmdbd slurmctld slurmd sinfo sacctmgr sbatch srun squeue sacct scontrol; do
  command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
if [ ${#missing[@]} -gt 0 ]; then
  die "missing binaries: ${missing[*]}
  install them with:  bash $HERE/install.sh
  (= apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server)"
fi

BASE=$(mkdir -p "$BASE" && cd "$BASE" && pwd)
CONF=$BASE/slurm.conf
RUN=$BASE/run
LOG=$BASE/log
SOCK=$BASE/munge/munge.socket.2
DBSOCK=$RUN/mysqld.sock

# ---- already running?
# alive NAME: the PID in $RUN/NAME.pid is a live (non-zombie) process of the expected program.
alive() {
  local f=$RUN/$1.pid pid comm state
  [ -s "$f" ] || return 1
  pid=$({ tr -dc '0-9' <"$f"; } 2>/dev/null); [ -n "$pid" ] || return 1
  [ -r "/proc/$pid/stat" ] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  case "$1" in
    mysqld) [[ "$comm" == mariadbd || "$comm" == mysqld ]] ;;
    slurmd-*) [[ "$comm" == slurmd* ]] ;;
    *) [[ "$comm" == "$1"* ]] ;;
  esac
}
running=(); stopped=()
for d in "${DAEMONS[@]}"; do if alive "$d"; then running+=("$d"); else stopped+=("$d"); fi; done
if [ ${#stopped[@]} -eq 0 ]; then
  echo "start.sh: the cluster under $BASE is already running (${DAEMONS[*]}); nothing to do."
  have=$(sed -n 's/^NodeName=.* CPUs=\([0-9]*\) .*/\1/p' "$CONF" 2>/dev/null || true)
  [ "$have" = "$CPUS" ] || echo "start.sh: note: it runs with CPUs=$have per node, not $CPUS; stop it first to change that." >&2
  SLURM_CONF=$CONF timeout 10 sinfo -N 2>&1 || true
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
if [ ${#running[@]} -gt 0 ]; then
  echo "start.sh: partially running (up: ${running[*]}; down: ${stopped[*]}); restarting it." >&2
  BASE=$BASE bash "$HERE/stop.sh"
fi

# from here on, a failed start stops whatever it had started (logs stay under $BASE/log)
on_exit() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "start.sh: start failed; stopping the daemons started so far" >&2
    BASE=$BASE bash "$HERE/stop.sh" >&2 || true
  fi
}
trap on_exit EXIT

# ---- node names must resolve (torch rendezvous uses MASTER_ADDR=<first node name>)
unresolved=()
for n in node1 node2; do getent hosts "$n" >/dev/null 2>&1 || unresolved+=("$n"); done
if [ ${#unresolved[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && [ -w /etc/hosts ]; then
    echo "127.0.0.1 ${unresolved[*]}   # proseco SLURM test cluster (slurm/cluster/start.sh)" >>/etc/hosts
    echo "start.sh: added '127.0.0.1 ${unresolved[*]}' to /etc/hosts"
  else
    echo "start.sh: warning: ${unresolved[*]} do(es) not resolve, so torch rendezvous on MASTER_ADDR=node1 will hang;" >&2
    echo "start.sh:   add this line to /etc/hosts (as root):  127.0.0.1 ${unresolved[*]}" >&2
  fi
fi

mkdir -p "$BASE"/{munge,state,spool,mysql} "$RUN" "$LOG"
touch "$BASE/.proseco-slurm-cluster"   # marker: stop.sh --purge only deletes folders that carry it

# wait_until SECONDS CMD...: poll CMD every 0.2 s until it succeeds; fails after SECONDS.
wait_until() {
  local secs=$1; shift
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.2
  done
}
logtail() { echo "---- last lines of $1:" >&2; tail -n "${2:-25}" "$1" >&2 2>/dev/null || echo "(no log)" >&2; }

# ---- munge (own key and socket; --force: we run as root and the socket is under /tmp)
if [ ! -s "$BASE/munge/munge.key" ]; then
  dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$BASE/munge/munge.key"
chmod 711 "$BASE/munge"
munged --force --socket="$SOCK" --key-file="$BASE/munge/munge.key" --pid-file="$RUN/munged.pid" \
  --log-file="$LOG/munged.log" --seed-file="$BASE/munge/munged.seed" </dev/null >>"$LOG/munged.log" 2>&1 \
  || { logtail "$LOG/munged.log"; die "munged failed to start"; }
wait_until 10 test -S "$SOCK" || { logtail "$LOG/munged.log"; die "munged socket $SOCK did not appear"; }

# ---- MariaDB (private instance: own datadir, socket, port; root via unix socket)
cat >"$BASE/my.cnf" <<EOC
[mysqld]
datadir=$BASE/mysql
socket=$DBSOCK
pid-file=$RUN/mysqld.pid
log-error=$LOG/mysqld.err
bind-address=127.0.0.1
port=13306
user=$USER_NAME
skip-name-resolve
innodb_buffer_pool_size=64M
innodb_log_file_size=16M
EOC
newdb=0
if [ ! -d "$BASE/mysql/mysql" ]; then
  mariadb-install-db --defaults-file="$BASE/my.cnf" --auth-root-authentication-method=socket \
    >"$LOG/mariadb-install.log" 2>&1 || { logtail "$LOG/mariadb-install.log"; die "mariadb-install-db failed"; }
  newdb=1
fi
setsid mariadbd --defaults-file="$BASE/my.cnf" </dev/null >>"$LOG/mariadbd.out" 2>&1 &
mpid=$!
end=$((SECONDS + TIMEOUT))
until mariadb --socket="$DBSOCK" -uroot -e 'select 1' >/dev/null 2>&1; do
  kill -0 "$mpid" 2>/dev/null || { logtail "$LOG/mysqld.err"; die "mariadbd exited (port 13306 taken by another cluster?)"; }
  [ $SECONDS -lt $end ] || { logtail "$LOG/mysqld.err"; die "MariaDB did not come up within ${TIMEOUT}s"; }
  sleep 0.2
done
if [ $newdb = 1 ]; then
  mariadb --socket="$DBSOCK" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
fi

# ---- slurmdbd
cat >"$BASE/slurmdbd.conf" <<EOC
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=16819
SlurmUser=$USER_NAME
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=13306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOC
chmod 600 "$BASE/slurmdbd.conf"

# ---- slurm.conf (rewritten on every start, so CPUS_PER_NODE / MEM_PER_NODE changes apply)
cat >"$CONF" <<EOC
# Generated by slurm/cluster/start.sh -- throw-away test cluster, do not edit (rewritten on start).
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=$USER_NAME
SlurmdUser=$USER_NAME
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
# no cgroups in containers
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# nodes may declare more CPUs than the machine has
SlurmdParameters=config_overrides
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=16819
# the munge socket for slurmctld/sacct -> slurmdbd (AuthInfo above does not cover that link)
AccountingStoragePass=$SOCK
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
# SIGTERM -> SIGKILL grace of a cancelled step (30 s by default); short here, the test jobs save in < 1 s
KillWait=3
Waittime=0
NodeName=node[1-2] NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=[16821-16822] CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOC
export SLURM_CONF=$CONF

slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 || { logtail "$LOG/slurmdbd.log"; die "slurmdbd failed to start"; }
wait_until "$TIMEOUT" sacctmgr -n list cluster \
  || { logtail "$LOG/slurmdbd.log"; die "slurmdbd did not answer within ${TIMEOUT}s"; }
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi

# ---- slurmctld and the two nodes
slurmctld -i </dev/null >>"$LOG/slurmctld.out" 2>&1 || { logtail "$LOG/slurmctld.log"; die "slurmctld failed to start"; }
for n in node1 node2; do
  slurmd -N "$n" </dev/null >>"$LOG/slurmd-$n.out" 2>&1 || { logtail "$LOG/slurmd-$n.log"; die "slurmd -N $n failed to start"; }
done

both_idle() { [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2=="idle"' | sort -u | wc -l)" = 2 ]; }
resumed=0
end=$((SECONDS + TIMEOUT))
until both_idle; do
  if [ $SECONDS -ge $end ]; then
    sinfo -N -o '%N %T %E' >&2 || true
    logtail "$LOG/slurmctld.log" 30
    die "the two nodes were not idle within ${TIMEOUT}s"
  fi
  # a node left drained/down by an earlier unclean stop: put it back once
  if [ $resumed = 0 ] && sinfo -h -N -o '%T' 2>/dev/null | grep -Eq 'drain|down'; then
    scontrol update NodeName=node1,node2 State=RESUME >/dev/null 2>&1 || true
    resumed=1
  fi
  sleep 0.2
done

trap - EXIT
sinfo -N
echo "start.sh: cluster up in $(elapsed) s (BASE=$BASE, ${CPUS} CPU(s)/node; logs in $LOG)"
echo "export SLURM_CONF=$CONF"
