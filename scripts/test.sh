#!/usr/bin/env bash
# The test command: formatting, lints, and every test (unit, property and
# end-to-end with real QEMU guests). Installs missing system packages first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build the test appliance" >&2
bash scripts/test-image.sh >/dev/null
echo "== cargo test" >&2
cargo test --workspace --locked -- --test-threads=1
