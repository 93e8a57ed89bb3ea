#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for testing profiles/slurm for real (tests/test_slurm.py).
#
#   tests/slurm/cluster.sh install   # apt-get install slurm-wlm munge slurmdbd mariadb-server (root)
#   tests/slurm/cluster.sh up        # munged, MariaDB, slurmdbd, slurmctld, slurmd
#   tests/slurm/cluster.sh down      # stops what `up` started, removes the state directory
#
# Every file (configs, state, logs, sockets, database) lives under $SLURM_LOCAL_DIR (default: a fixed
# directory under $TMPDIR); /etc/munge is not used, and /etc/slurm/slurm.conf is only a link to the
# generated file while the cluster is up (`up` refuses to run where SLURM is configured already).
# One node (this host) with
# SLURM_LOCAL_CPUS CPUs (default 2) and the machine's memory less 1 GiB, partition `cpu`, account
# `robustfl`. Accounting: slurmdbd on a private MariaDB, so `sacct` answers (the executor plugin's
# status query). `up` and `down` are idempotent. Needs root (daemons run as root).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/robustfl-slurm}
CPUS=${SLURM_LOCAL_CPUS:-2}
PORT0=${SLURM_LOCAL_PORT:-16817} # slurmctld; slurmd +1, slurmdbd +2, MariaDB +3
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-slurmdbd} # or none: no slurmdbd, sacct then has nothing to say
CLUSTER=robustfl
ACCOUNT=robustfl
PARTITION=cpu
SYSCONF=/etc/slurm/slurm.conf # where Debian's SLURM clients look when SLURM_CONF is unset
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)

die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  for _ in $(seq "$t"); do timeout 10 "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "$what did not come up within ${t}s (logs: $DIR/log)"
}

installed() { command -v slurmctld && command -v slurmd && command -v slurmdbd && command -v munged \
  && command -v mariadbd && command -v sbatch && command -v sacctmgr; } >/dev/null 2>&1

cmd_install() {
  installed && return 0
  [ "$(id -u)" = 0 ] || die "installing SLURM needs root"
  command -v apt-get >/dev/null || die "no apt-get on this machine"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
    || die "apt-get install ${PACKAGES[*]} failed"
  installed || die "installed ${PACKAGES[*]} but a daemon or client is missing"
}

write_configs() {
  local mem node
  if [ -e "$SYSCONF" ] || [ -L "$SYSCONF" ]; then # never replace a configuration that is not ours
    [ "$(readlink "$SYSCONF")" = "$DIR/slurm.conf" ] || die "$SYSCONF exists: SLURM is already configured here"
  fi
  node=$(hostname -s)
  mem=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$DIR"/{log,state,spool,munge,db,run}
  chmod 711 "$DIR/munge"
  cat >"$DIR/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT0
SlurmdPort=$((PORT0 + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=5
AccountingStorageType=accounting_storage/$ACCOUNTING
$([ "$ACCOUNTING" = none ] || printf '%s\n' "AccountingStorageHost=127.0.0.1" "AccountingStoragePort=$((PORT0 + 2))" \
  "AccountingStoragePass=$DIR/munge/munge.socket")
NodeName=$node NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT0 + 2))
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT0 + 3))
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/slurmdbd.conf"
  # The job-step executor drops SLURM_CONF from the environment of the srun it starts inside a job, so
  # the file must also be where SLURM looks without it.
  [ -L "$SYSCONF" ] || { mkdir -p "$(dirname "$SYSCONF")" && ln -s "$DIR/slurm.conf" "$SYSCONF"; }
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "the cluster's daemons run as root"
  installed || die "SLURM is not installed (run: $0 install)"
  write_configs
  export SLURM_CONF=$DIR/slurm.conf
  # munge: a private key and socket
  [ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
  chmod 400 "$DIR/munge/munge.key"
  if ! alive "$DIR/run/munged.pid"; then
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
  fi
  wait_for 20 munged test -S "$DIR/munge/munge.socket"
  [ "$ACCOUNTING" = none ] || start_accounting
  alive "$DIR/run/slurmctld.pid" || slurmctld -f "$DIR/slurm.conf"
  wait_for 60 slurmctld scontrol ping
  alive "$DIR/run/slurmd.pid" || slurmd -f "$DIR/slurm.conf"
  wait_for 60 "slurmd (node idle)" bash -c "sinfo -h -o %T | grep -qx idle"
  log "up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T'), accounting: $ACCOUNTING (config: $SYSCONF -> $DIR/slurm.conf)"
}

start_accounting() {
  # MariaDB for slurmdbd, TCP on 127.0.0.1 only, root without a password
  if [ ! -d "$DIR/db/data/mysql" ]; then
    mariadb-install-db --user=root --datadir="$DIR/db/data" --auth-root-authentication-method=normal \
      >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (log: $DIR/log/mariadb-install.log)"
  fi
  if ! alive "$DIR/run/mariadb.pid"; then
    (setsid mariadbd --no-defaults --user=root --datadir="$DIR/db/data" --socket="$DIR/db/mysqld.sock" \
      --bind-address=127.0.0.1 --port=$((PORT0 + 3)) --pid-file="$DIR/run/mariadb.pid" \
      --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=64M --skip-name-resolve \
      </dev/null >/dev/null 2>&1 &)
  fi
  wait_for 60 MariaDB mariadb --no-defaults -S "$DIR/db/mysqld.sock" -uroot -e "select 1"
  if ! alive "$DIR/run/slurmdbd.pid"; then
    slurmdbd # reads slurmdbd.conf beside $SLURM_CONF
  fi
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=tests organization=robustfl >/dev/null 2>&1 || true
  sacctmgr -i add user "$(id -un)" account="$ACCOUNT" cluster="$CLUSTER" >/dev/null 2>&1 || true
}

stop() { # stop NAME PIDFILE
  local pid
  alive "$2" || { rm -f "$2"; return 0; }
  pid=$(cat "$2")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || { rm -f "$2"; return 0; }; sleep 1; done
  log "$1 ($pid) did not stop in 30 s; killing it"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$2"
}

cmd_down() {
  [ -d "$DIR" ] || return 0
  if [ -f "$DIR/slurm.conf" ] && alive "$DIR/run/slurmctld.pid"; then
    SLURM_CONF=$DIR/slurm.conf scancel --full --user="$(id -un)" 2>/dev/null || true
  fi
  stop slurmd "$DIR/run/slurmd.pid"
  stop slurmctld "$DIR/run/slurmctld.pid"
  stop slurmdbd "$DIR/run/slurmdbd.pid"
  stop mariadbd "$DIR/run/mariadb.pid"
  stop munged "$DIR/run/munged.pid"
  [ "$(readlink "$SYSCONF" 2>/dev/null)" = "$DIR/slurm.conf" ] && rm -f "$SYSCONF"
  rm -rf "${DIR:?}"/{log,state,spool,munge,db,run} "$DIR/slurm.conf" "$DIR/slurmdbd.conf"
  rmdir "$DIR" 2>/dev/null || true
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  *) echo "usage: $0 install|up|down" >&2; exit 2 ;;
esac
