#!/usr/bin/env bash
# Run COMMAND with NMAP_MCP_TEST_POSTGRES set to the admin URL of a PostgreSQL the tests can use.
# First choice is the machine's server, used as it is: user postgres must get in over its unix
# socket (the only way in for processes in a test's network namespace) with no password and be
# a superuser. Otherwise a private cluster is started for this run (initdb in a temp dir,
# trust auth, unix socket only) and stopped and deleted when COMMAND ends. The machine's server
# is never stopped, restarted or reconfigured.
# PGHOST (a socket directory) and PGPORT name the machine's server: /var/run/postgresql, 5432.
# Usage: scripts/with-postgres.sh COMMAND [ARGS...]
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"

machine_socket_dir=${PGHOST:-/var/run/postgresql}
machine_port=${PGPORT:-5432}
cluster=""
bindir=""

# Why the server at socket directory $1, port $2 cannot be used as it is; nothing if it can.
unusable_reason() {
  local answer
  if [[ $1 != /* ]]; then
    echo "$1 is not a socket directory"
  elif ! answer=$(psql -w -X -At -h "$1" -p "$2" -U postgres -d postgres \
    -c "SELECT current_setting('is_superuser')" 2>&1); then
    echo "${answer%%$'\n'*}"
  elif [ "$answer" != on ]; then
    echo "user postgres is not a superuser there"
  fi
}

# Run a server program as the cluster's owner (PostgreSQL refuses to run as root), from the
# cluster's directory: user postgres may not be allowed into the caller's.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd "$cluster" && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

stop_private_cluster() {
  if ! as_owner "$bindir/pg_ctl" -D "$cluster/data" -m fast -w stop >/dev/null; then
    echo "could not stop the private PostgreSQL cluster in $cluster" >&2
  fi
  rm -rf "$cluster"
}

# Start the private cluster and point socket_dir and port at it. A directory directly under
# /tmp keeps the socket path short (the limit is 107 bytes) and reachable by user postgres.
start_private_cluster() {
  if ! bindir=$(postgres_bindir); then
    echo "$0: no usable PostgreSQL ($reason) and no initdb to start one: install postgresql" >&2
    exit 1
  fi
  cluster=$(mktemp -d /tmp/nmap-mcp-pg.XXXXXX)
  trap stop_private_cluster EXIT
  socket_dir=$cluster
  port=$((10000 + RANDOM % 22000))
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$cluster"
  fi
  if ! as_owner "$bindir/initdb" -D "$cluster/data" -U postgres --auth=trust --no-sync \
    --no-locale -E UTF8 >"$cluster/initdb.log" 2>&1; then
    cat "$cluster/initdb.log" >&2
    exit 1
  fi
  # No TCP listener: only the socket in the private directory reaches it, so no port can clash.
  # Durability is pointless for a cluster deleted at the end.
  cat >>"$cluster/data/postgresql.conf" <<CONF
listen_addresses = ''
port = $port
unix_socket_directories = '$cluster'
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  if ! as_owner "$bindir/pg_ctl" -D "$cluster/data" -l "$cluster/server.log" -w start >/dev/null; then
    cat "$cluster/server.log" >&2
    exit 1
  fi
}

if [ $# -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi
trap 'exit 130' INT
trap 'exit 143' TERM
reason=$(unusable_reason "$machine_socket_dir" "$machine_port")
if [ -z "$reason" ]; then
  socket_dir=$machine_socket_dir
  port=$machine_port
  echo "using PostgreSQL at $socket_dir (port $port) as user postgres" >&2
else
  start_private_cluster
  echo "started a private PostgreSQL cluster at $socket_dir (port $port), deleted at the end;" \
    "the machine's server at $machine_socket_dir (port $machine_port) is not usable as it is: $reason" >&2
fi
export NMAP_MCP_TEST_POSTGRES="postgresql://postgres@/postgres?host=$socket_dir&port=$port"
"$@"
