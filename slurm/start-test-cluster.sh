#!/usr/bin/env bash
# A real one-node Slurm on this machine (Debian 12 / Slurm 22.05), for trying the slurm
# backend and for its tests. Idempotent: a second call finds the daemons up and returns.
#
#   sudo slurm/start-test-cluster.sh            # install (apt), configure, start
#   sudo slurm/start-test-cluster.sh --stop     # stop the daemons it started (munged only if it started it)
#   export SLURM_CONF=/var/tmp/faster-qat-slurm/slurm.conf   # printed at the end
#
# What it starts: munged, MariaDB + slurmdbd (so `sacct` works and accounts are enforced),
# slurmctld and slurmd (one CPU-only node, partition `debug`, account `studies`).
# Jobs run as root. SchedulerParameters has no kill_invalid_depend: a job whose upstream
# failed stays PENDING with reason DependencyNeverSatisfied, as on most clusters; the
# backend reports it as blocked and `python -m pipeline cancel` removes it.
# Set FQ_SLURM_KILL_INVALID_DEPEND=1 to have Slurm cancel such jobs itself instead.
set -euo pipefail

STATE_DIR="${FQ_SLURM_DIR:-/var/tmp/faster-qat-slurm}"
CLUSTER_NAME="faster-qat-test"
CONF="$STATE_DIR/slurm.conf"
MYSQL_DIR="$STATE_DIR/mysql"  # owned by the mysql user: data, socket, pid, log
DB_NAME="slurm_acct_db"
DB_USER="slurm"
DB_PASS="faster-qat-test"

log() { echo "start-test-cluster: $*" >&2; }
die() { echo "start-test-cluster: error: $*" >&2; exit 1; }

running() { pgrep -x "$1" >/dev/null 2>&1; }

# Stops a daemon by its pid file and waits until it is gone (a restart right after finds its
# port and state free).
stop_pid() {
  local pidfile="$1" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

stop_all() {
  for daemon in slurmd slurmctld slurmdbd; do
    stop_pid "$STATE_DIR/$daemon.pid"
  done
  if [[ -f "$MYSQL_DIR/mysqld.pid" ]]; then
    local pid
    pid="$(cat "$MYSQL_DIR/mysqld.pid")"
    mysqladmin --socket="$MYSQL_DIR/mysqld.sock" shutdown 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  # munged only when this script started it (another user of munge may have started it before)
  if [[ -f "$STATE_DIR/munged.ours" ]]; then
    stop_pid /run/munge/munged.pid
    rm -f "$STATE_DIR/munged.ours"
  fi
  log "stopped"
}

[[ "${1:-}" == "--stop" ]] && { stop_all; exit 0; }
[[ $EUID -eq 0 ]] || die "must run as root (it installs packages and starts system daemons)"

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurm-wlm)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v munged >/dev/null || missing+=(munge)
  command -v mysqld >/dev/null || command -v mariadbd >/dev/null || missing+=(mariadb-server)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
  log "installing ${missing[*]} (apt)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
}

start_munge() {
  if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! running munged; then
    log "starting munged"
    runuser -u munge -- munged --force
    touch "$STATE_DIR/munged.ours"  # --stop stops it too
  fi
}

start_mariadb() {
  if ! mysqladmin --socket="$MYSQL_DIR/mysqld.sock" ping >/dev/null 2>&1; then
    log "starting MariaDB"
    mkdir -p "$MYSQL_DIR/data"
    chown -R mysql:mysql "$MYSQL_DIR"
    if [[ ! -d "$MYSQL_DIR/data/mysql" ]]; then
      mysql_install_db --user=mysql --datadir="$MYSQL_DIR/data" >/dev/null 2>&1
    fi
    # Our own socket and port-less server: it never meets a MariaDB the machine already runs.
    mysqld_safe --datadir="$MYSQL_DIR/data" --socket="$MYSQL_DIR/mysqld.sock" \
      --pid-file="$MYSQL_DIR/mysqld.pid" --skip-networking \
      --log-error="$MYSQL_DIR/mysqld.log" >/dev/null 2>&1 &
    for _ in $(seq 100); do
      mysqladmin --socket="$MYSQL_DIR/mysqld.sock" ping >/dev/null 2>&1 && break
      sleep 0.2
    done
    mysqladmin --socket="$MYSQL_DIR/mysqld.sock" ping >/dev/null 2>&1 \
      || die "MariaDB did not start; see $MYSQL_DIR/mysqld.log"
  fi
  mysql --socket="$MYSQL_DIR/mysqld.sock" -uroot <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
SQL
}

write_configs() {
  local host cpus
  host="$(hostname)"
  cpus="$(nproc)"
  mkdir -p "$STATE_DIR"/{state,spool}
  cat >"$STATE_DIR/slurmdbd.conf" <<EOF
# written by slurm/start-test-cluster.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
DebugLevel=info
LogFile=$STATE_DIR/slurmdbd.log
PidFile=$STATE_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
StoragePort=3306
EOF
  # slurmdbd reads StorageHost=localhost through the socket MySQL's client library defaults
  # to; point that default at ours.
  mkdir -p /run/mysqld && ln -sf "$MYSQL_DIR/mysqld.sock" /run/mysqld/mysqld.sock
  chmod 600 "$STATE_DIR/slurmdbd.conf"
  local scheduler="SchedulerParameters=batch_sched_delay=0"
  [[ "${FQ_SLURM_KILL_INVALID_DEPEND:-0}" == 1 ]] && scheduler+=",kill_invalid_depend"
  cat >"$CONF.tmp" <<EOF
# written by slurm/start-test-cluster.sh: one CPU-only node, jobs run as root
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
ReturnToService=2
SchedulerType=sched/backfill
$scheduler
MinJobAge=3600
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  # Clients find the cluster without SLURM_CONF when /etc/slurm has no config of its own.
  mkdir -p /etc/slurm
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
    ln -sf "$CONF" /etc/slurm/slurm.conf
  fi
}

start_slurm() {
  export SLURM_CONF="$CONF"
  if ! running slurmdbd; then
    log "starting slurmdbd"
    slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    for _ in $(seq 100); do sacctmgr -n -P list cluster >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  sacctmgr -n -P list cluster format=cluster | grep -qw "$CLUSTER_NAME" \
    || sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
  sacctmgr -n -P list account format=account | grep -qw studies \
    || sacctmgr -i add account studies cluster="$CLUSTER_NAME" >/dev/null
  sacctmgr -n -P list user format=user | grep -qw root \
    || sacctmgr -i add user root account=root cluster="$CLUSTER_NAME" >/dev/null
  sacctmgr -n -P list assoc user=root format=account | grep -qw studies \
    || sacctmgr -i add user root account=studies cluster="$CLUSTER_NAME" >/dev/null
  if ! running slurmctld; then log "starting slurmctld"; slurmctld; fi
  if ! running slurmd; then log "starting slurmd"; slurmd; fi
  for _ in $(seq 150); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      return 0
    fi
    sleep 0.2
  done
  scontrol update nodename="$(hostname)" state=resume >/dev/null 2>&1 || true
  sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)' \
    || die "node did not become idle; see $STATE_DIR/slurmctld.log and slurmd.log"
}

install_packages
mkdir -p "$STATE_DIR"
start_munge
start_mariadb
write_configs
start_slurm
log "ready: partition debug, account studies; export SLURM_CONF=$CONF"
echo "export SLURM_CONF=$CONF"
