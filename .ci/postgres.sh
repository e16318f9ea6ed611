# shellcheck shell=bash
# A private PostgreSQL for the test run, sourced by .ci/run:
#   pg_ensure_installed   install the distribution's server packages when no initdb/pg_ctl is found
#   pg_start              initdb + start a throwaway cluster on 127.0.0.1:<free port> in a private
#                         folder; exports MLOPS_TEST_POSTGRES_URL (a superuser URL with a random password)
#   pg_stop               stop that cluster (by its data folder, never by name) and remove the folder
# Postgres refuses to run as root, so as root the server runs as the `postgres` user.

PG_TMP=""

_pg_log() { echo "ci/postgres: $*" >&2; }

_pg_as_root() {  # command...: run as root (directly, or through sudo without a password)
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"; else
    _pg_log "need root or sudo to install PostgreSQL"; return 1; fi
}

pg_bindir() {  # the folder with initdb and pg_ctl, newest major first; nothing when there is none
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dir="$(dirname "$(readlink -f "$(command -v initdb)")")"
    if [ -x "$dir/pg_ctl" ]; then echo "$dir"; return 0; fi
  fi
  return 1
}

pg_ensure_installed() {
  if pg_bindir >/dev/null; then
    _pg_log "server binaries found in $(pg_bindir)"
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    _pg_log "no PostgreSQL server and no apt-get to install one; set MLOPS_TEST_POSTGRES_URL instead"
    return 1
  fi
  local started=$SECONDS
  _pg_log "installing the distribution's postgresql packages (non-interactive)"
  # The package would create and start a system cluster on 5432; the tests need none of that.
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    _pg_as_root mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | _pg_as_root tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  _pg_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  _pg_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confold postgresql >/dev/null
  pg_bindir >/dev/null || { _pg_log "postgresql installed but no initdb/pg_ctl found"; return 1; }
  _pg_log "installed in $((SECONDS - started)) s: $(pg_bindir)"
}

_pg_free_port() {  # a port in 55000-59999 nobody listens on
  local port i
  for i in $(seq 1 50); do
    port=$((55000 + RANDOM % 5000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return 0; fi
  done
  return 1
}

pg_start() {
  local bindir port password as_pg=() started=$SECONDS
  bindir="$(pg_bindir)" || { _pg_log "no PostgreSQL server binaries"; return 1; }
  PG_TMP="$(mktemp -d "${TMPDIR:-/tmp}/mlops-ci-pg.XXXXXX")"
  password="$(od -An -tx1 -N18 /dev/urandom | tr -d ' \n')"
  printf '%s\n' "$password" >"$PG_TMP/pwfile"
  mkdir -p "$PG_TMP/socket"
  if [ "$(id -u)" -eq 0 ]; then
    chown -R postgres: "$PG_TMP"
    as_pg=(runuser -u postgres --)
  fi
  "${as_pg[@]}" "$bindir/initdb" -D "$PG_TMP/data" -U mlops --pwfile="$PG_TMP/pwfile" \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 --encoding=UTF8 --no-locale >"$PG_TMP/initdb.log" 2>&1 \
    || { cat "$PG_TMP/initdb.log" >&2; return 1; }
  rm -f "$PG_TMP/pwfile"
  port="$(_pg_free_port)"
  # Loopback only, a private socket folder, a non-default port; durability off (a throwaway cluster).
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_TMP/socket -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null || { cat "$PG_TMP/server.log" >&2; return 1; }
  export MLOPS_TEST_POSTGRES_URL="postgresql://mlops:${password}@127.0.0.1:${port}/postgres"
  _pg_log "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($PG_TMP) in $((SECONDS - started)) s"
}

pg_stop() {
  [ -n "$PG_TMP" ] && [ -d "$PG_TMP/data" ] || return 0
  local bindir as_pg=()
  bindir="$(pg_bindir)" || return 0
  [ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$PG_TMP/data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
  rm -rf "$PG_TMP"
  _pg_log "stopped and removed the private cluster"
  PG_TMP=""
}
