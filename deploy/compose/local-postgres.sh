#!/bin/bash
# The postgres image's entrypoint, as far as deploy/compose uses it (for
# Dockerfile.local-services): a new cluster trusting every connection, the
# database $POSTGRES_DB owned by $POSTGRES_USER, then PostgreSQL in the foreground.
set -euo pipefail
BIN=/usr/lib/postgresql/15/bin
PGDATA=/tmp/pgdata
user="${POSTGRES_USER:-postgres}"
"$BIN/initdb" -D "$PGDATA" -U "$user" --auth=trust >/dev/null
# The other containers connect over the compose network (as POSTGRES_HOST_AUTH_METHOD=trust).
echo "host all all all trust" >>"$PGDATA/pg_hba.conf"
"$BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
[ -z "${POSTGRES_DB:-}" ] || [ "$POSTGRES_DB" = postgres ] || "$BIN/createdb" -U "$user" "$POSTGRES_DB"
"$BIN/pg_ctl" -D "$PGDATA" -w stop >/dev/null
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*'
