#!/usr/bin/env bash
# The PostgreSQL change stamp (migration 0013's trigger) before and after
# migration 0016, in one run: N user rows inserted in ONE transaction, as
# `rotator database copy` writes them. Before, each row bumped the one counter
# row; after, the first row of a transaction bumps it and the others reuse the
# stamp. Starts a throwaway server (initdb as nobody, Unix socket in a temp
# directory, default durability) and prints a table; asserts nothing.
#
#   benches/pg-change-stamp.sh [N ...]      (default: 5000 10000 20000 40000)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
sizes=("${@:-5000}")
[ $# -eq 0 ] && sizes=(5000 10000 20000 40000)
# The directory holding initdb, pg_ctl, psql and postgres together: Debian's
# newest /usr/lib/postgresql/N/bin, else the one on PATH.
bin=
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")"; do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/psql" ] && [ -x "$d/postgres" ]; then bin=$d; break; fi
done
if [ -z "$bin" ]; then
    echo "!!! PostgreSQL was NOT measured: no initdb (install Debian's postgresql)" >&2
    exit 1
fi
dir=$(mktemp -d /tmp/rotator-pgstamp.XXXXXX)
chown 65534:65534 "$dir"
as_nobody() { setpriv --reuid 65534 --regid 65534 --clear-groups -- "$@"; }
as_nobody "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
as_nobody "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-k $dir -c listen_addresses= -c max_connections=10" start >/dev/null
trap 'as_nobody "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null; rm -rf "$dir"' EXIT
sql() { "$bin/psql" -h "$dir" -U postgres -X -q -v ON_ERROR_STOP=1 "$@"; }

# Just the columns migration 0013's triggers name, then 0013 (and 0016) as shipped.
schema() {
    sql -d "$1" -c "CREATE TABLE users (name TEXT PRIMARY KEY, state TEXT NOT NULL);
        CREATE TABLE credentials (id TEXT PRIMARY KEY, user_name TEXT, state TEXT, state_at BIGINT,
            state_reason TEXT, not_after BIGINT, fingerprint TEXT, serial TEXT, generation_group TEXT);"
    sql -d "$1" -f "$here/migrations/postgres/0013_change_seq.sql"
    [ "$2" = after ] && sql -d "$1" -f "$here/migrations/postgres/0016_change_seq_per_transaction.sql"
    return 0
}

# Milliseconds for one transaction inserting N users, on a fresh database.
measure() {
    local db="m_$1_$2"
    sql -d postgres -c "CREATE DATABASE $db"
    schema "$db" "$1"
    local t0 t1
    t0=$(date +%s%N)
    sql -d "$db" -c "INSERT INTO users (name, state) SELECT 'u' || g, 'active' FROM generate_series(1, $2) g"
    t1=$(date +%s%N)
    local rows stamps
    rows=$(sql -d "$db" -At -c "SELECT COUNT(*) FROM users WHERE change_seq > 0")
    stamps=$(sql -d "$db" -At -c "SELECT seq FROM change_counter")
    [ "$rows" = "$2" ] || { echo "only $rows of $2 rows stamped" >&2; exit 1; }
    echo "$(( (t1 - t0) / 1000000 )) $stamps"
}

echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}'); load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '| %s | %s | %s | %s | %s |\n' "rows in one transaction" "before (0013) ms" "after (0016) ms" "before / after" "counter bumps before / after"
printf '|---|---|---|---|---|\n'
for n in "${sizes[@]}"; do
    read -r b bs < <(measure before "$n")
    read -r a as < <(measure after "$n")
    ratio=$(awk -v b="$b" -v a="$a" 'BEGIN { printf "%.1f", b / (a > 0 ? a : 1) }')
    printf '| %s | %s | %s | %s | %s / %s |\n' "$n" "$b" "$a" "$ratio" "$bs" "$as"
done
