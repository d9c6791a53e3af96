#!/usr/bin/env bash
# The test command: formatting, lints, and every test (unit, property and
# end-to-end with real QEMU guests). Installs missing system packages first.
#
#   scripts/test.sh          everything (what CI runs)
#   scripts/test.sh --fast   format, lints, the quick-start check, unit,
#                            property and in-process tests and the end-to-end
#                            tests that boot no guest: the loop while developing
set -euo pipefail
cd "$(dirname "$0")/.."
# The end-to-end tests inject failures: they need a binary with fail points
# (never in a release build; see crates/failpoint).
features=(--features virt8ra/failpoints)
mode=full
case "${1:-}" in
  --fast) mode=fast ;;
  -h|--help) sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0 ;;
  "") ;;
  *) echo "unknown argument '$1': scripts/test.sh [--fast|--help]" >&2; exit 2 ;;
esac
bash scripts/deps.sh
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings
echo "== fail points are no-ops without the feature" >&2
cargo test --locked -p virt8ra-failpoint
# Only tests turn them on (the binary's feature, the testkit's
# dev-dependency): no normal dependency of any crate may.
if cargo tree --locked --workspace -e normal,build,features -i virt8ra-failpoint \
  | grep -q 'feature "enabled"'; then
  echo "a normal dependency turns on virt8ra-failpoint/enabled: release builds would carry fail points" >&2
  exit 1
fi
echo "== the README's quick start runs as written" >&2
bash scripts/check-quickstart.sh
echo "== build the test appliance" >&2
bash scripts/test-image.sh >/dev/null
if [ "$mode" = fast ]; then
  echo "== cargo test (fast tier)" >&2
  # Unit tests of every crate, the placement engine's property and scenario
  # tests, the end-to-end files that start processes but boot no guest, and
  # the import-graph check (no circles between the agent's modules).
  cargo test --workspace --locked --lib --bins "${features[@]}"
  cargo test --locked -p virt8ra-placement --tests
  # In process (crates/testkit): the migration workflow failed and crashed
  # at every step and undo step, against simulated hosts.
  cargo test --locked -p virt8ra-testkit --tests
  cargo test --locked -p virt8ra --test api --test sim --test imports --test auth_table --test networks \
    --test http_limits --test ingest --test cli_progress "${features[@]}" -- --test-threads=2
  # Prometheus metrics against simulated agents (its QEMU test is skipped).
  cargo test --locked -p virt8ra --test metrics "${features[@]}" -- workload
  # The Ansible collection (ansible/) with ansible-playbook, simulated agents.
  cargo test --locked -p virt8ra --test ansible "${features[@]}"
  exit 0
fi
echo "== cargo test" >&2
cargo test --workspace --locked "${features[@]}" -- --test-threads=1
