#!/bin/bash
# The cycle test (tests/test_cycles.py, sync and async) RUNS times in a row, with two busy
# loops beside it: issue 14's soak.  Usage: scripts/soak-cycles.sh [RUNS]  (default 10).
# Each run gets a pytest folder of its own under $SOAK_DIR (default: a fresh one in /tmp),
# kept for a failed run; one line per run is printed and appended to $SOAK_DIR/summary.txt.
set -u
cd "$(dirname "$0")/.."
runs=${1:-10}
dir=${SOAK_DIR:-$(mktemp -d /tmp/repdisk-soak.XXXXXX)}
mkdir -p "$dir"
( while :; do :; done ) & busy1=$!
( while :; do :; done ) & busy2=$!
trap 'kill $busy1 $busy2 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  .venv/bin/python -m pytest tests/test_cycles.py -q -p no:cacheprovider \
    --basetemp="$dir/run$i" > "$dir/run$i.log" 2>&1
  rc=$?
  line="run $i rc=$rc $(( $(date +%s) - start ))s load $(cut -d' ' -f1-3 /proc/loadavg): $(tail -n 1 "$dir/run$i.log")"
  echo "$line" | tee -a "$dir/summary.txt"
  if [ "$rc" -eq 0 ]; then rm -rf "$dir/run$i"; else failed=$((failed + 1)); fi
done
echo "$((runs - failed)) of $runs runs passed; logs in $dir"
[ "$failed" -eq 0 ]
