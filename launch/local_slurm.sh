#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (localhost), for tests, CI and trying the
# toolkit without a cluster:  launch/local_slurm.sh start | stop | status
#
# Starts munged, MariaDB, slurmdbd (so sacct works: submitit reads job states from it),
# slurmctld and slurmd directly (no systemd), records exactly their PIDs under $STATE/run and
# stops exactly those. Installs the Debian packages when missing (root). Each start is a clean
# cluster: stale PID files, saved controller state and the old accounting database of an
# earlier run are cleared; an existing MariaDB data directory is reused.
# State lives in ${CACO_SLURM_STATE:-/var/tmp/caco-slurm}; /etc/slurm/slurm.conf and
# slurmdbd.conf are symlinks to its etc/ so every client (sbatch, sacct, submitit) finds them.
set -euo pipefail

STATE=${CACO_SLURM_STATE:-/var/tmp/caco-slurm}
ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
SPOOL=$STATE/spool
DBDIR=$STATE/mysql
DB_PORT=${CACO_SLURM_DB_PORT:-33061}
DB_SOCK=$RUN/mysqld.sock
DB_PASS=caco-local-slurm
CLUSTER=caco-local
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop is the reverse

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (it starts system daemons); try: sudo $0 $*"
}

alive() {  # pid -> 0 if running (a zombie counts as stopped)
  local pid=$1 st
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  st=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo Z)
  [ "$st" != Z ]
}

pid_of() { cat "$RUN/$1.pid" 2>/dev/null || true; }

wait_for() {  # seconds description command...
  local t=$1 what=$2; shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "timed out after ${t}s waiting for $what (logs in $LOG)"
    sleep 0.2
  done
}

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v sacct >/dev/null || missing+=(slurm-client)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  # Keep the packages' maintainer scripts from starting services of their own.
  local policy=/usr/sbin/policy-rc.d had_policy=0
  [ -e $policy ] && had_policy=1
  [ $had_policy = 1 ] || { printf '#!/bin/sh\nexit 101\n' >$policy; chmod +x $policy; }
  local apt=(apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends)
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >"$STATE/apt.log" 2>&1; then
    apt-get -o DPkg::Lock::Timeout=600 update >>"$STATE/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" "${missing[@]}" >>"$STATE/apt.log" 2>&1 \
      || { [ $had_policy = 1 ] || rm -f $policy; die "apt-get failed, see $STATE/apt.log"; }
  fi
  [ $had_policy = 1 ] || rm -f $policy
}

link_config() {  # our file -> /etc/slurm/<name>, refusing to replace a real cluster's config
  local src=$1 dst=/etc/slurm/$2
  mkdir -p /etc/slurm
  if [ -e "$dst" ] && [ ! -L "$dst" ]; then
    grep -q "caco local_slurm" "$dst" 2>/dev/null \
      || die "$dst exists and is not ours; move it away to use the local cluster"
  fi
  ln -sfn "$src" "$dst"
}

write_configs() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.95 - 512}' /proc/meminfo)
  cat >"$ETC/slurm.conf" <<EOF
# caco local_slurm: a one-node cluster on localhost (generated; edits are overwritten)
ClusterName=$CLUSTER
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobContainerType=job_container/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
JobRequeue=1
ReturnToService=2
MinJobAge=300
KillWait=10
InactiveLimit=0
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  local dbd_comm=""
  getent hosts "$(hostname)" | grep -q '^127\.' && dbd_comm="CommunicationParameters=NoInAddrAny"
  cat >"$ETC/slurmdbd.conf" <<EOF
# caco local_slurm (generated)
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.daemon.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
$dbd_comm
EOF
  chmod 600 "$ETC/slurmdbd.conf"
  link_config "$ETC/slurm.conf" slurm.conf
  link_config "$ETC/slurmdbd.conf" slurmdbd.conf
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  rm -f /run/munge/munged.pid
  setpriv --reuid=munge --regid=munge --init-groups \
    munged --foreground --force >"$LOG/munged.out" 2>&1 &
  echo $! >"$RUN/munged.pid"
  wait_for 20 "munged" bash -c 'munge -n | unmunge'
}

mysql_cli() { mariadb --no-defaults -uroot --socket="$DB_SOCK" "$@"; }

start_mariadb() {
  if [ ! -d "$DBDIR/mysql" ]; then
    rm -rf "$DBDIR"
    mariadb-install-db --no-defaults --user=root --datadir="$DBDIR" \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed, see $LOG/mariadb-install.log"
  fi
  rm -f "$DB_SOCK" "$RUN/mariadbd.daemon.pid"
  mariadbd --no-defaults --user=root --datadir="$DBDIR" --socket="$DB_SOCK" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$RUN/mariadbd.daemon.pid" \
    --log-error="$LOG/mariadbd.log" --skip-name-resolve \
    --innodb-buffer-pool-size=64M >"$LOG/mariadbd.out" 2>&1 &
  echo $! >"$RUN/mariadbd.pid"
  wait_for 60 "MariaDB" mysql_cli -e "select 1"
  # A clean accounting database each start: job ids restart at 1 with the cleared
  # controller state, so old records must not answer sacct for new jobs.
  mysql_cli <<EOF
DROP DATABASE IF EXISTS slurm_acct_db;
CREATE DATABASE slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_slurm() {
  rm -rf "$SPOOL/ctld" "$SPOOL/d"
  mkdir -p "$SPOOL/ctld" "$SPOOL/d"
  rm -f "$RUN"/*.daemon.pid
  slurmdbd -D >"$LOG/slurmdbd.out" 2>&1 &
  echo $! >"$RUN/slurmdbd.pid"
  wait_for 60 "slurmdbd on port 6819" port_open 6819
  slurmctld -D -i >"$LOG/slurmctld.out" 2>&1 &
  echo $! >"$RUN/slurmctld.pid"
  wait_for 60 "slurmctld" scontrol ping
  slurmd -D -N localhost >"$LOG/slurmd.out" 2>&1 &
  echo $! >"$RUN/slurmd.pid"
  wait_for 60 "slurmd on port 6818" port_open 6818
  wait_for 90 "the node to be idle" node_idle
  wait_for 60 "the cluster in the accounting database" cluster_registered
}

node_idle() {
  local s
  s=$(sinfo -h -n localhost -o %T 2>/dev/null | head -n1)
  case "$s" in
    idle*|mixed*|allocated*) return 0 ;;
    down*|drain*|fail*) scontrol update nodename=localhost state=resume >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}

cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }

stop_all() {
  local i name pid
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    name=${DAEMONS[$i]}
    pid=$(pid_of "$name")
    if alive "$pid"; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
      alive "$pid" && kill -9 "$pid" 2>/dev/null || true
      say "stopped $name ($pid)"
    fi
    rm -f "$RUN/$name.pid"
  done
}

status() {
  local rc=0 name pid
  for name in "${DAEMONS[@]}"; do
    pid=$(pid_of "$name")
    if alive "$pid"; then say "$name running ($pid)"; else say "$name not running"; rc=1; fi
  done
  [ $rc = 0 ] && sinfo -N -o "%N %T %c %m" 2>/dev/null | sed 's/^/local_slurm: /'
  return $rc
}

cmd=${1:-}
case "$cmd" in
  start)
    need_root start
    mkdir -p "$ETC" "$RUN" "$LOG" "$SPOOL"
    stop_all >/dev/null   # stale daemons of an earlier start (recorded PIDs only)
    install_packages
    write_configs
    start_munge
    start_mariadb
    start_slurm
    say "cluster '$CLUSTER' up: $(sinfo -h -o '%D node, %c CPUs, %m MB' | head -n1); logs in $LOG"
    ;;
  stop)
    need_root stop
    stop_all
    ;;
  status)
    status
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
