#!/usr/bin/env bash
# Verify the unit and rate its hardening, as `make check-systemd` and the tests do.
# usage: systemd/check-unit.sh UNIT EXECUTABLE [MAX_EXPOSURE]
# EXECUTABLE replaces ExecStart's /opt path: `verify` insists that the binary exists.
set -euo pipefail
unit=$1 exe=$2 max=${3:-2.0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|/opt/upload-proxy/venv/bin/upload-proxy|$exe|" "$unit" >"$work/$(basename "$unit")"
# verify exits 0 on some warnings; any output at all is treated as a failure.
out=$(systemd-analyze verify "$work/$(basename "$unit")" 2>&1) || { echo "$out"; exit 1; }
if [ -n "$out" ]; then echo "$out"; exit 1; fi
echo "verify: ok"
score=$(systemd-analyze security --offline=true --no-pager "$work/$(basename "$unit")" 2>&1 |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || { echo "could not read the exposure level"; exit 1; }
echo "security exposure: $score (max $max)"
awk -v s="$score" -v m="$max" 'BEGIN { exit !(s <= m) }'
