#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (localhost), for tests, CI and trying the
# toolkit without a cluster:  launch/local_slurm.sh start | stop | status
#
# Starts munged, MariaDB, slurmdbd (so sacct works: submitit reads job states from it),
# slurmctld and slurmd directly (no systemd), records exactly their PIDs under $STATE/run and
# stops exactly those (a recorded PID is killed only when it still runs the daemon it was
# recorded for). Installs the Debian packages when missing (root). Every daemon listens on
# 127.0.0.1 only. Each start is a clean controller (stale PID files and saved controller state
# are cleared) over the kept accounting database: job ids continue above every id handed out
# before (FirstJobId), so an old run's job id never names a new job, and jobs an earlier
# cluster left unfinished are closed in accounting. MariaDB's password is generated once per
# machine and kept in $STATE/secrets (mode 600); the munge key is mode 400.
# State lives in ${CACO_SLURM_STATE:-/var/tmp/caco-slurm}; /etc/slurm/slurm.conf and
# slurmdbd.conf are symlinks to its etc/ so every client (sbatch, sacct, submitit) finds them.
set -euo pipefail

STATE=${CACO_SLURM_STATE:-/var/tmp/caco-slurm}
ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
SPOOL=$STATE/spool
DBDIR=$STATE/mysql
SECRETS=$STATE/secrets
DB_PORT=${CACO_SLURM_DB_PORT:-33061}
DB_SOCK=$RUN/mysqld.sock
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

ours() {  # pid name -> 0 if that pid is alive AND runs the daemon we recorded it for
  local pid=$1 name=$2 exe
  alive "$pid" || return 1
  exe=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | awk '{print $1}')
  [ "$(basename "${exe:-none}")" = "$name" ]
}

db_password() {  # generated once per machine, readable by root only
  mkdir -p "$SECRETS"
  chmod 700 "$SECRETS"
  if [ ! -s "$SECRETS/db_password" ]; then
    (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$SECRETS/db_password")
  fi
  chmod 600 "$SECRETS/db_password"
  cat "$SECRETS/db_password"
}

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
  local cpus mem_mb first_id gap=1
  cpus=$(nproc)
  # After a crash (no clean stop) the last jobs may be in neither accounting nor the saved
  # ids: leave a margin above everything known.
  [ -e "$STATE/stopped_cleanly" ] || gap=1001
  first_id=$(( $(cat "$STATE/last_job_id" 2>/dev/null || echo 0) + gap ))
  rm -f "$STATE/stopped_cleanly"
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
FirstJobId=$first_id
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
  # slurmdbd binds to the address of its own hostname with NoInAddrAny (else to all
  # interfaces): it runs in a UTS namespace whose hostname is localhost (see start_slurm).
  local pass
  pass=$(db_password)
  (umask 077; cat >"$ETC/slurmdbd.conf" <<EOF
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
StoragePass=$pass
StorageLoc=slurm_acct_db
CommunicationParameters=NoInAddrAny
EOF
  )
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
  local pass
  pass=$(db_password)
  mysql_cli <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
  remember_last_job_id
}

remember_last_job_id() {  # the highest job id ever handed out: the controller's state is
  local max saved          # cleared each start, and ids must still never repeat
  max=$(mysql_cli -N -e "SELECT COALESCE(MAX(id_job), 0) FROM \`${CLUSTER}_job_table\`" \
    slurm_acct_db 2>/dev/null || echo 0)
  [ -n "${1:-}" ] && [ "$1" -gt "${max:-0}" ] 2>/dev/null && max=$1
  saved=$(cat "$STATE/last_job_id" 2>/dev/null || echo 0)
  if [ "${max:-0}" -gt "${saved:-0}" ] 2>/dev/null; then echo "$max" >"$STATE/last_job_id"; fi
  [ -s "$STATE/last_job_id" ] || echo 0 >"$STATE/last_job_id"
}

close_runaway_jobs() {  # jobs an earlier cluster left PENDING/RUNNING in accounting are over
  sacctmgr -i list runawayjobs >/dev/null 2>&1 || true
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_slurm() {
  rm -rf "$SPOOL/ctld" "$SPOOL/d"
  mkdir -p "$SPOOL/ctld" "$SPOOL/d"
  rm -f "$RUN"/*.daemon.pid
  # Own UTS namespace, hostname localhost: with NoInAddrAny it listens on 127.0.0.1 only.
  unshare --uts sh -c 'hostname localhost && exec slurmdbd -D' >"$LOG/slurmdbd.out" 2>&1 &
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
  close_runaway_jobs
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

controller_last_job_id() {  # jobs the controller still knows (accounting may lag)
  scontrol -o show job 2>/dev/null | grep -o 'JobId=[0-9]*' | cut -d= -f2 | sort -n | tail -n1
}

stop_all() {
  local i name pid
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    name=${DAEMONS[$i]}
    pid=$(pid_of "$name")
    if ours "$pid" "$name"; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
      if ours "$pid" "$name"; then kill -9 "$pid" 2>/dev/null || true; fi
      say "stopped $name ($pid)"
    elif alive "$pid"; then
      say "not stopping pid $pid: it is not $name (a stale PID file)"
    fi
    rm -f "$RUN/$name.pid"
  done
}

status() {
  local rc=0 name pid
  for name in "${DAEMONS[@]}"; do
    pid=$(pid_of "$name")
    if ours "$pid" "$name"; then say "$name running ($pid)"; else say "$name not running"; rc=1; fi
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
    start_munge
    start_mariadb         # (also remembers the highest job id handed out so far)
    write_configs
    start_slurm
    say "cluster '$CLUSTER' up: $(sinfo -h -o '%D node, %c CPUs, %m MB' | head -n1); logs in $LOG"
    ;;
  stop)
    need_root stop
    if ours "$(pid_of slurmctld)" slurmctld && ours "$(pid_of mariadbd)" mariadbd; then
      remember_last_job_id "$(controller_last_job_id)"
    fi
    stop_all
    touch "$STATE/stopped_cleanly"
    ;;
  status)
    status
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
