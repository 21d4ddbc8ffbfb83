#!/usr/bin/env bash
# The feedback store's tests against a real PostgreSQL server: Debian's packages (installed if missing),
# a throwaway cluster on a free local port, removed on exit. Run as root on CI (initdb then runs as the
# postgres user) or as any user who can run initdb. `make test-postgres` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

PG_BIN="${PG_BIN:-$(pg_bin)}"
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    echo "postgres.sh: installing PostgreSQL from Debian's packages"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends postgresql
    PG_BIN="$(pg_bin)"
fi

# initdb refuses to run as root: the cluster belongs to the postgres user then.
as_owner() { "$@"; }
if [ "$(id -u)" -eq 0 ]; then
    as_owner() { runuser -u postgres -- "$@"; }
fi

PGDATA="$(mktemp -d "${TMPDIR:-/tmp}/smolcord-pg.XXXXXX")"
[ "$(id -u)" -eq 0 ] && chown postgres: "$PGDATA"
PORT="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
USER_NAME=smolcord_test
DB_NAME=smolcord_test

stop_cluster() {
    as_owner "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PGDATA"
}
trap stop_cluster EXIT

as_owner "$PG_BIN/initdb" -D "$PGDATA" -U "$USER_NAME" --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
as_owner "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w \
    -o "-p $PORT -k $PGDATA -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
as_owner "$PG_BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" "$DB_NAME"
echo "postgres.sh: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT ($PGDATA)"

export SMOLCORD_TEST_DATABASE_URL="postgresql+asyncpg://$USER_NAME@127.0.0.1:$PORT/$DB_NAME"
.venv/bin/pytest tests/test_feedback -q -m "not slow" "$@"
