#!/usr/bin/env bash
# `rotator add-user --from FILE --dry-run` on CSV files of growing size: the
# whole command (process start, database open, parse and validate every row,
# the plan printed). Each file mixes comments, blank lines and CRLF endings, as
# exported spreadsheets do. Prints a table (rows, seconds, rows/s); asserts
# nothing. A parser that recounted lines from the file's start for every row
# (before 2026-12) took 13 s for 32k rows and minutes for 100k.
#
#   benches/bulk-dry-run.sh [ROTATOR] [ROWS ...]   (default: target/release/rotator; 8000 32000 100000)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/release/rotator}
shift || true
sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(8000 32000 100000)
if [ ! -x "$bin" ]; then
    (cd "$here" && cargo build --release --locked --bin rotator)
fi
dir=$(mktemp -d /tmp/rotator-bulk.XXXXXX)
trap 'rm -rf "$dir"' EXIT
printf '%-8s %-9s %s\n' rows seconds rows/s
for n in "${sizes[@]}"; do
    awk -v n="$n" 'BEGIN {
        print "name,namespaces,role,groups,ttl"
        for (i = 0; i < n; i++) {
            if (i % 100 == 0) print "# batch " i / 100
            if (i % 250 == 0) print ""
            printf "user%06d,team-a;team-b,view,dev,8h%s\n", i, (i % 2 ? "\r" : "")
        }
    }' >"$dir/users-$n.csv"
    start=$(date +%s.%N)
    "$bin" --data-dir "$dir/data-$n" add-user --from "$dir/users-$n.csv" --dry-run >/dev/null
    end=$(date +%s.%N)
    awk -v n="$n" -v s="$start" -v e="$end" 'BEGIN { t = e - s; printf "%-8d %-9.2f %.0f\n", n, t, n / t }'
done
