#!/usr/bin/env bash
# A real SLURM cluster on this machine, for tests, CI and trying the toolkit without a cluster:
#
#   launch/local_slurm.sh start [--hosts N] [--tracking]   (N = 1: one node on localhost)
#   launch/local_slurm.sh stop | status
#   launch/local_slurm.sh host-down I | host-up I          (a multi-host cluster's host I)
#
# With --hosts N (N >= 2) each compute host lives in its own network namespace (caco-h<I>,
# own hostname and address 10.77.0.<10+I>) joined to the machine (the "login host", 10.77.0.1
# on the bridge cacobr0) by a veth pair; slurmctld, slurmdbd and MariaDB stay on the login
# host; the filesystem is shared, as a cluster's shared filesystem is. --tracking also starts
# the team's MLflow tracking server (basic authentication, MariaDB backend, artifacts under
# $STATE/mlflow) on the login host's cluster address; `status` prints its URI.
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
NET=10.77.0                 # the multi-host cluster's private subnet (nothing else may use it)
BRIDGE=cacobr0
TRACK_PORT=${CACO_TRACKING_PORT:-5077}
PYTHON=${PYTHON:-python}
HOSTS=$(cat "$STATE/hosts" 2>/dev/null || echo 1)

nodes() {  # the compute nodes' names
  if [ "$HOSTS" -le 1 ]; then echo localhost; return; fi
  local i
  for ((i = 1; i <= HOSTS; i++)); do echo "caco-h$i"; done
}
node_addr() { if [ "$HOSTS" -le 1 ]; then echo 127.0.0.1; else echo "$NET.$((10 + ${1#caco-h}))"; fi; }
ctld_addr() { if [ "$HOSTS" -le 1 ]; then echo 127.0.0.1; else echo "$NET.1"; fi; }
slurmd_name() { if [ "$HOSTS" -le 1 ]; then echo slurmd; else echo "slurmd-$1"; fi; }
daemons() {  # start order; stop is the reverse
  local n
  echo munged mariadbd slurmdbd slurmctld
  for n in $(nodes); do slurmd_name "$n"; done
  echo mlflow
}

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
  local pid=$1 name=${2%%-*} cmd
  alive "$pid" || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)
  if [ "$name" = mlflow ]; then
    case "$cmd" in *"mlflow server"*) return 0 ;; *) return 1 ;; esac
  fi
  [ "$(basename "$(echo "$cmd" | awk '{print $1}')")" = "$name" ]
}

secret() {  # name -> a password generated once per machine, readable by root only
  mkdir -p "$SECRETS"
  chmod 700 "$SECRETS"
  if [ ! -s "$SECRETS/$1" ]; then
    (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$SECRETS/$1")
  fi
  chmod 600 "$SECRETS/$1"
  cat "$SECRETS/$1"
}
db_password() { secret db_password; }

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
  # The hosts share the machine's cores (each may use all of them) and split its memory.
  mem_mb=$(awk -v n="$HOSTS" '/MemTotal/ {printf "%d", ($2 / 1024 * 0.95 - 512) / n}' \
    /proc/meminfo)
  local node_lines="" n all
  for n in $(nodes); do
    node_lines+="NodeName=$n NodeAddr=$(node_addr "$n") NodeHostname=$n CPUs=$cpus"
    node_lines+=" RealMemory=$mem_mb State=UNKNOWN"$'\n'
  done
  all=$(nodes | paste -sd, -)
  cat >"$ETC/slurm.conf" <<EOF
# caco local_slurm: a $HOSTS-host cluster on this machine (generated; edits are overwritten)
ClusterName=$CLUSTER
SlurmctldHost=$(dbd_host)($(ctld_addr))
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
SlurmdTimeout=10
MinJobAge=300
KillWait=10
InactiveLimit=0
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d/%n
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.%n.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$(ctld_addr)
AccountingStoragePort=6819
${node_lines}PartitionName=local Nodes=$all Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmdbd binds to the address of its own hostname with NoInAddrAny (else to all
  # interfaces): it runs in UTS (and mount) namespaces whose hostname names the controller's
  # address: localhost, or caco-login on a multi-host cluster (see start_slurm).
  local pass
  pass=$(db_password)
  (umask 077; cat >"$ETC/slurmdbd.conf" <<EOF
# caco local_slurm (generated)
AuthType=auth/munge
DbdHost=$(dbd_host)
DbdAddr=$(ctld_addr)
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

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
dbd_host() { if [ "$HOSTS" -le 1 ]; then echo localhost; else echo caco-login; fi; }  # login

# ------------------------------------------------------------------ the hosts' network
net_in_use() {  # something other than our bridge uses the subnet
  ip -4 -o addr show 2>/dev/null | grep -v " $BRIDGE " | grep -q " $NET\." && return 0
  ip -4 route show 2>/dev/null | grep -v " dev $BRIDGE " | grep -q "^$NET\." && return 0
  return 1
}

net_down() {  # every namespace, link and hosts file a start made (also after a crash):
  local kind name pid  # exactly those its state directory recorded (see net_up)
  [ -e "$STATE/net" ] || return 0
  while read -r kind name; do
    case "$kind" in
      netns)
        for pid in $(ip netns pids "$name" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$name" 2>/dev/null || true
        rm -rf "/etc/netns/$name" ;;
      link) ip link del "$name" 2>/dev/null || true ;;
    esac
  done < <(tac "$STATE/net")  # links before the bridge they hang on
  rm -f "$STATE/net"
}

net_record() { echo "$1 $2" >>"$STATE/net"; }  # before it is made: a crash leaves no orphan

net_up() {
  local i n hosts
  command -v ip >/dev/null || die "a multi-host cluster needs iproute2 (apt-get install iproute2)"
  net_in_use && die "the subnet $NET.0/24 is used on this machine; a multi-host cluster needs it"
  ip link show "$BRIDGE" >/dev/null 2>&1 && die "the bridge $BRIDGE exists but was not made \
by this state directory ($STATE); stop the cluster that made it (CACO_SLURM_STATE=... $0 stop)"
  : >"$STATE/net"
  net_record link "$BRIDGE"
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  hosts="127.0.0.1 localhost"$'\n'"$NET.1 caco-login"$'\n'
  for n in $(nodes); do hosts+="$(node_addr "$n") $n"$'\n'; done
  printf '%s' "$hosts" >"$ETC/login-hosts"
  for n in $(nodes); do
    i=${n#caco-h}
    net_record netns "$n"
    ip netns add "$n"
    net_record link "cv-h$i"
    ip link add "cv-h$i" type veth peer name "cvp-h$i"
    ip link set "cvp-h$i" netns "$n"
    ip -n "$n" link set "cvp-h$i" name eth0
    ip -n "$n" addr add "$(node_addr "$n")/24" dev eth0
    ip -n "$n" link set eth0 up
    ip -n "$n" link set lo up
    ip link set "cv-h$i" master "$BRIDGE" up
    mkdir -p "/etc/netns/$n"          # mounted over /etc/hosts for the host's processes
    printf '%s' "$hosts" >"/etc/netns/$n/hosts"
  done
}

start_slurmd() {  # node
  local n=$1 name
  name=$(slurmd_name "$n")
  if [ "$HOSTS" -le 1 ]; then
    slurmd -D -N localhost >"$LOG/slurmd.out" 2>&1 &
  else  # inside the host's network namespace, with its own hostname and /etc/hosts
    # (nsenter, not `ip netns exec`: that remounts /sys, which hides the cgroup slurmd reads)
    nsenter --net="/run/netns/$n" unshare --uts --mount sh -c \
      "mount --bind /etc/netns/$n/hosts /etc/hosts && hostname $n && exec slurmd -D -N $n" \
      >"$LOG/$name.out" 2>&1 &
  fi
  echo $! >"$RUN/$name.pid"
  wait_for 60 "slurmd of $n on port 6818" port_open "$(node_addr "$n")" 6818
}

start_slurm() {
  local n
  rm -rf "$SPOOL/ctld" "$SPOOL/d"
  mkdir -p "$SPOOL/ctld"
  for n in $(nodes); do mkdir -p "$SPOOL/d/$n"; done
  rm -f "$RUN"/*.daemon.pid
  if [ "$HOSTS" -le 1 ]; then
    # Own UTS namespace, hostname localhost: with NoInAddrAny it listens on 127.0.0.1 only.
    unshare --uts sh -c 'hostname localhost && exec slurmdbd -D' >"$LOG/slurmdbd.out" 2>&1 &
  else  # hostname caco-login, which its own /etc/hosts maps to the bridge address
    unshare --uts --mount sh -c "mount --bind $ETC/login-hosts /etc/hosts && \
      hostname caco-login && exec slurmdbd -D" >"$LOG/slurmdbd.out" 2>&1 &
  fi
  echo $! >"$RUN/slurmdbd.pid"
  wait_for 60 "slurmdbd on port 6819" port_open "$(ctld_addr)" 6819
  if [ "$HOSTS" -le 1 ]; then
    slurmctld -D -i >"$LOG/slurmctld.out" 2>&1 &
  else  # like slurmdbd: bound to the bridge address, which the compute hosts reach
    unshare --uts --mount sh -c "mount --bind $ETC/login-hosts /etc/hosts && \
      hostname caco-login && exec slurmctld -D -i" >"$LOG/slurmctld.out" 2>&1 &
  fi
  echo $! >"$RUN/slurmctld.pid"
  wait_for 60 "slurmctld" scontrol ping
  for n in $(nodes); do start_slurmd "$n"; done
  for n in $(nodes); do wait_for 90 "$n to be idle" node_idle "$n"; done
  wait_for 60 "the cluster in the accounting database" cluster_registered
  close_runaway_jobs
}

node_idle() {  # node
  local s
  s=$(sinfo -h -n "$1" -o %T 2>/dev/null | head -n1)
  case "$s" in
    idle*|mixed*|allocated*) return 0 ;;
    down*|drain*|fail*) scontrol update nodename="$1" state=resume >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}

host_down() {  # I: the host dies: its slurmd and every process in its namespace, at once
  local n=caco-h$1 pid
  [ "$HOSTS" -ge 2 ] && ip netns list | grep -q "^$n\b" || die "no host $1 on this cluster"
  for pid in $(ip netns pids "$n"); do kill -9 "$pid" 2>/dev/null || true; done
  say "host $n is down"
}

host_up() {  # I: the host boots again (its slurmd registers; SLURM returns it to service)
  local n=caco-h$1
  [ "$HOSTS" -ge 2 ] && ip netns list | grep -q "^$n\b" || die "no host $1 on this cluster"
  ours "$(pid_of "$(slurmd_name "$n")")" slurmd && { say "host $n is up already"; return; }
  start_slurmd "$n"
  wait_for 90 "$n to be idle" node_idle "$n"
  say "host $n is up"
}

# ------------------------------------------------------------------ the tracking server
tracking_addr() { ctld_addr; }
tracking_uri() { echo "http://$(tracking_addr):$TRACK_PORT"; }
tracking_ready() {
  "$PYTHON" -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('$(tracking_uri)/health', timeout=3).status != 200)"
}

start_tracking() {
  local dbpass admin
  dbpass=$(secret mlflow_db_password)
  admin=$(secret mlflow_admin_password)
  mysql_cli <<EOF
CREATE DATABASE IF NOT EXISTS mlflow;
CREATE USER IF NOT EXISTS 'mlflow'@'127.0.0.1' IDENTIFIED BY '$dbpass';
ALTER USER 'mlflow'@'127.0.0.1' IDENTIFIED BY '$dbpass';
GRANT ALL ON mlflow.* TO 'mlflow'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
  mkdir -p "$STATE/mlflow/artifacts"
  (umask 077
   cat >"$ETC/mlflow_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$STATE/mlflow/basic_auth.db
admin_username = caco
admin_password = $admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
   printf 'username=caco\npassword=%s\n' "$admin" >"$SECRETS/mlflow_credentials")
  chmod 600 "$SECRETS/mlflow_credentials" "$ETC/mlflow_auth.ini"
  # Secrets through the environment and 0600 files, never on a command line (ps shows those).
  # (No MLflow job execution: its huey consumers are for GenAI jobs and idle at ~20% CPU.)
  (cd "$STATE/mlflow" && MLFLOW_AUTH_CONFIG_PATH="$ETC/mlflow_auth.ini" \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(secret mlflow_flask_key)" \
    MLFLOW_BACKEND_STORE_URI="mysql+pymysql://mlflow:$dbpass@127.0.0.1:$DB_PORT/mlflow" \
    exec "$PYTHON" -m mlflow server --app-name basic-auth --host "$(tracking_addr)" \
      --port "$TRACK_PORT" --workers 1 --artifacts-destination "$STATE/mlflow/artifacts" \
      >"$LOG/mlflow.out" 2>&1) &
  echo $! >"$RUN/mlflow.pid"
  local end=$((SECONDS + 240))
  until tracking_ready >/dev/null 2>&1; do
    alive "$(pid_of mlflow)" || die "the MLflow tracking server exited; see $LOG/mlflow.out"
    [ $SECONDS -lt $end ] || die "the MLflow tracking server did not answer in 240 s; see $LOG/mlflow.out"
    sleep 0.5
  done
  printf '{"uri": "%s", "credentials_file": "%s"}\n' "$(tracking_uri)" \
    "$SECRETS/mlflow_credentials" >"$STATE/tracking.json"
}

cluster_registered() { sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; }

controller_last_job_id() {  # jobs the controller still knows (accounting may lag)
  scontrol -o show job 2>/dev/null | grep -o 'JobId=[0-9]*' | cut -d= -f2 | sort -n | tail -n1
}

stop_all() {
  local i name pid all
  read -r -a all <<<"$(daemons | paste -sd' ' -)"
  for ((i = ${#all[@]} - 1; i >= 0; i--)); do
    name=${all[$i]}
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
  local rc=0 name pid n
  for name in $(daemons); do
    pid=$(pid_of "$name")
    if [ "$name" = mlflow ] && [ ! -e "$STATE/tracking.json" ]; then continue; fi
    if ours "$pid" "$name"; then say "$name running ($pid)"; else say "$name not running"; rc=1; fi
  done
  say "hosts: $HOSTS"
  for n in $(nodes); do
    say "host $n ($(node_addr "$n")): $(sinfo -h -n "$n" -o %T 2>/dev/null || echo unknown)"
  done
  if [ -e "$STATE/tracking.json" ]; then
    if tracking_ready >/dev/null 2>&1; then
      say "tracking: $(tracking_uri) ready (tracking=server tracking.uri=$(tracking_uri) tracking.credentials_file=$SECRETS/mlflow_credentials)"
    else
      say "tracking: $(tracking_uri) not ready"; rc=1
    fi
  fi
  return $rc
}

stop_cluster() {
  if ours "$(pid_of slurmctld)" slurmctld && ours "$(pid_of mariadbd)" mariadbd; then
    remember_last_job_id "$(controller_last_job_id)"
  fi
  stop_all
  net_down
  rm -f "$STATE/tracking.json"
  touch "$STATE/stopped_cleanly"
}

usage() { echo "usage: $0 start [--hosts N] [--tracking] | stop | status | host-down I | host-up I" >&2; exit 2; }

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  start)
    need_root start
    hosts=1 tracking=0
    while [ $# -gt 0 ]; do
      case "$1" in
        --hosts) [ $# -ge 2 ] || usage; hosts=$2; shift 2 ;;
        --hosts=*) hosts=${1#--hosts=}; shift ;;
        --tracking) tracking=1; shift ;;
        *) usage ;;
      esac
    done
    case "$hosts" in ''|*[!0-9]*) die "--hosts $hosts: give a number of hosts (1 to 8)" ;; esac
    [ "$hosts" -ge 1 ] && [ "$hosts" -le 8 ] || die "--hosts $hosts: use 1 to 8 hosts"
    mkdir -p "$ETC" "$RUN" "$LOG" "$SPOOL"
    stop_cluster >/dev/null  # what an earlier start left, even after a crash
    HOSTS=$hosts
    echo "$HOSTS" >"$STATE/hosts"
    install_packages
    [ "$HOSTS" -ge 2 ] && net_up
    start_munge
    start_mariadb         # (also remembers the highest job id handed out so far)
    write_configs
    start_slurm
    [ "$tracking" = 1 ] && start_tracking
    say "cluster '$CLUSTER' up: $(sinfo -h -o '%D node(s), %c CPUs, %m MB' | head -n1); logs in $LOG"
    [ "$tracking" = 1 ] && say "tracking server: $(tracking_uri) (credentials: $SECRETS/mlflow_credentials)"
    true
    ;;
  stop)
    need_root stop
    stop_cluster
    ;;
  status)
    status
    ;;
  host-down) need_root host-down; [ $# -eq 1 ] || usage; host_down "$1" ;;
  host-up) need_root host-up; [ $# -eq 1 ] || usage; host_up "$1" ;;
  *) usage ;;
esac
