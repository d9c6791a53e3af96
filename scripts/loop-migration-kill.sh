#!/usr/bin/env bash
# Issue 35's acceptance loop: the kill-at-every-step migration test N times
# in a row (default 50) with the CPU and fsync hogs of
# scripts/repro-migration-stall.py beside it. Stops at the first failure and
# keeps its output. Each run takes about 3 minutes on a 2-core machine.
#
#   scripts/loop-migration-kill.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-50}"
test_args=(test --locked -p virt8ra --features virt8ra/failpoints --test migration)
cargo "${test_args[@]}" --no-run
python3 scripts/repro-migration-stall.py --load-only 100000 >/dev/null 2>&1 &
load=$!
trap 'kill $load 2>/dev/null || true' EXIT
out=$(mktemp)
for i in $(seq 1 "$n"); do
  s=$(date +%s)
  if cargo "${test_args[@]}" -- a_migration_killed_at_any_step_recovers_to_exactly_one_copy \
      --exact --test-threads=1 >"$out" 2>&1; then
    echo "run $i pass $(( $(date +%s) - s )) s, $(uptime | sed 's/.*load/load/')"
  else
    echo "run $i FAILED after $(( $(date +%s) - s )) s; its output: $out" >&2
    exit 1
  fi
done
rm -f "$out"
echo "$n runs in a row passed"
