#!/usr/bin/env bash
# Builds the two appliances (offline, from Debian packages) and publishes
# them in the catalog of the control plane at $VIRT8RA_URL (token in
# $VIRT8RA_TOKEN): imports each image, then the appliance definition from
# appliances/*.json.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
V8="${VIRT8RA_BIN:-virt8ra}"
TEST="$(bash "$ROOT/scripts/test-image.sh")"
WEB="$(bash "$ROOT/scripts/web-image.sh")"
"$V8" image import "$TEST" --name test-appliance-1-0-0 --version 1.0.0
"$V8" image import "$WEB" --name web-appliance-1-0-0 --version 1.0.0
"$V8" appliance publish "$ROOT/appliances/test.json"
"$V8" appliance publish "$ROOT/appliances/web.json"
