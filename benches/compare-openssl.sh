#!/usr/bin/env bash
# The hand-run flow rotator replaces, timed beside rotator on the same machine in
# the same run: openssl makes a P-256 key and CSR, then signs it with a CA key
# (what an admin scripts with `openssl req` + `openssl x509 -req`), versus
# `rotator add-user` doing key, CSR, policy, signing, verification, SQLite and a
# 0600 kubeconfig. Prints a table of medians and the ratio.
#   usage: benches/compare-openssl.sh [N]   (default 50 users each)
set -euo pipefail
N=${1:-50}
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin rotator
BIN=$PWD/target/release/rotator
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

now_ns() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# The same CA for both flows: rotator's local CA, which openssl then uses too.
"$BIN" --data-dir rot init >/dev/null
CA=rot/ca/ca.crt CAKEY=rot/ca/ca.key

: > openssl.ns; : > rotator.ns
for i in $(seq 1 "$N"); do
  t0=$(now_ns)
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "u$i.key" \
    -subj "/O=dev/O=rotator:u$i:1/CN=u$i" -out "u$i.csr" 2>/dev/null
  openssl x509 -req -in "u$i.csr" -CA "$CA" -CAkey "$CAKEY" -CAcreateserial -days 1 -out "u$i.crt" 2>/dev/null
  t1=$(now_ns)
  "$BIN" --data-dir rot add-user "r$i" --group dev -n team-a --role view --ttl 1h --out "r$i.kubeconfig" >/dev/null
  t2=$(now_ns)
  echo $((t1 - t0)) >> openssl.ns
  echo $((t2 - t1)) >> rotator.ns
done
o=$(median < openssl.ns); r=$(median < rotator.ns)
printf '\n%-70s %10s\n' "flow (median of $N, one process run each)" "ms/user"
awk -v o="$o" -v r="$r" 'BEGIN {
  printf "%-70s %10.2f\n", "openssl req -newkey ec P-256 + openssl x509 -req", o / 1e6
  printf "%-70s %10.2f\n", "rotator add-user (key, CSR, sign, verify, SQLite, audit, 0600 file)", r / 1e6
  printf "%-70s %10.2f\n", "ratio rotator / openssl", r / o
}'
