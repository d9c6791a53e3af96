#!/usr/bin/env bash
# Fuzzes the HTTP API with schemathesis against its own OpenAPI document:
# every operation is called with generated valid and invalid input, and the
# run fails on any 5xx, on an answer whose status, content type, headers or
# body the document does not describe, and on an operation that documents a
# token but answers without one. It finds what hand-written tests do not
# think of, and keeps the document honest for clients generated from it.
#
#   scripts/fuzz-api.sh [--examples N] [--seed N] [--release] [--keep]
#
#   --examples N   test cases per operation and phase (default 50, or
#                  $FUZZ_EXAMPLES; the default run takes a few minutes)
#   --seed N       schemathesis's random seed (default: a fresh one, printed)
#   --release      build and fuzz the release binary (default: debug)
#   --keep         keep the temporary data directory and logs
#
# schemathesis is installed from PyPI into a venv under
# ${XDG_CACHE_HOME:-~/.cache}/virt8ra on first use. The control plane runs on
# loopback with a fresh data directory and a little topology (three
# providers and sites, a simulated host, an image, a VM, an appliance) so
# that operations on existing things are reached too. Exits non-zero on any
# failure. The temporary directory (data, the server's log, schemathesis's
# logs and JUnit reports) is removed, or kept and its path printed on a
# failure or with --keep.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SCHEMATHESIS_VERSION="4.32.5"
EXAMPLES="${FUZZ_EXAMPLES:-50}"
SEED=""
PROFILE=debug
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --examples) EXAMPLES="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --release) PROFILE=release; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$EXAMPLES" in ''|*[!0-9]*|0) echo "--examples needs a positive number" >&2; exit 2 ;; esac
SEED="${SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"

say() { printf '\n== %s\n' "$*" >&2; }

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/virt8ra"
VENV="$CACHE/schemathesis-$SCHEMATHESIS_VERSION"
if [ ! -x "$VENV/bin/st" ]; then
  say "Installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

say "Building virt8ra ($PROFILE)"
if [ "$PROFILE" = release ]; then
  (cd "$ROOT" && cargo build --release --locked -p virt8ra --bin virt8ra)
else
  (cd "$ROOT" && cargo build --locked -p virt8ra --bin virt8ra)
fi
BIN="$ROOT/target/$PROFILE/virt8ra"

WORK="$(mktemp -d -t virt8ra-fuzz.XXXXXX)"
SERVER_PID=""
AGENT_PID=""
cleanup() {
  local rc=$?
  for pid in "$AGENT_PID" "$SERVER_PID"; do
    if [ -n "$pid" ]; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
    echo "data, logs and report kept in $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"

say "Starting the control plane on $URL (data in $WORK/server)"
"$BIN" server --listen "127.0.0.1:$PORT" --data-dir "$WORK/server" \
  --heartbeat-interval 1 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
  curl -fs "$URL/healthz" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
  sleep 0.2
done
curl -fs "$URL/healthz" >/dev/null
TOKEN="$(cat "$WORK/server/admin.token")"

# One API call with the admin token; fails the script on an error answer.
api() {
  local method="$1" path="$2" body="${3:-}"
  if [ -n "$body" ]; then
    curl -fsS -X "$method" -H "Authorization: Bearer $TOKEN" \
      -H 'content-type: application/json' --data "$body" "$URL$path"
  else
    curl -fsS -X "$method" -H "Authorization: Bearer $TOKEN" "$URL$path"
  fi
}

say "Creating a topology to fuzz against"
for row in "provider-es ES es-logrono Logroño 42.46 -2.44" \
           "provider-de DE de-frankfurt Frankfurt 50.11 8.68" \
           "provider-pl PL pl-gdansk Gdańsk 54.35 18.65"; do
  read -r provider country site city lat lon <<<"$row"
  api POST /api/v1/providers "{\"name\":\"$provider\",\"country\":\"$country\"}" >/dev/null
  api POST /api/v1/sites "{\"name\":\"$site\",\"provider\":\"$provider\",\"country\":\"$country\",\"city\":\"$city\",\"latitude\":$lat,\"longitude\":$lon}" >/dev/null
done
JOIN="$(api POST /api/v1/join-tokens '{"site":"de-frankfurt"}' | jq -r .token)"
"$BIN" agent --server "$URL" --name sim-de --driver sim --join-token "$JOIN" \
  --data-dir "$WORK/agent" --vcpus 16 --memory-mib 65536 --disk-gib 500 \
  >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 100); do
  [ "$(api GET '/api/v1/hosts?state=ready' | jq '.items | length')" = 1 ] && break
  sleep 0.2
done
[ "$(api GET '/api/v1/hosts?state=ready' | jq '.items | length')" = 1 ] \
  || { echo "the simulated host did not become ready" >&2; cat "$WORK/agent.log" >&2; exit 1; }
qemu-img create -q -f qcow2 "$WORK/tiny.qcow2" 64M
SHA="$(curl -fsS -X POST -H "Authorization: Bearer $TOKEN" -H 'content-type: application/octet-stream' \
  --data-binary "@$WORK/tiny.qcow2" "$URL/api/v1/images?name=tiny&version=1.0.0" | jq -r .sha256)"
api POST /api/v1/vms '{"name":"vm-1","image":"tiny","vcpus":1,"memory_mib":256,"disk_gib":1}' >/dev/null
api POST /api/v1/appliances '{"name":"tiny-app","version":"1.0.0","description":"fuzz fixture","images":[{"name":"tiny"}],"template":{"vcpus":1,"memory_mib":256,"disk_gib":1}}' >/dev/null
HOST_TOKEN="$(jq -r .host_token "$WORK/agent/credentials.json")"
JOIN_TOKEN="$(api POST /api/v1/join-tokens '{"site":"es-logrono","max_uses":100}' | jq -r .token)"

# Half of the generated path keys, image hashes, filters and references in
# bodies name something that exists, so that operations on existing
# resources are reached too.
cat >"$WORK/schemathesis.toml" <<EOF
[dictionaries.keys]
values = ["vm-1", "tiny", "provider-de", "de-frankfurt", "sim-de", "tiny-app", "tiny-app@1.0.0"]
[dictionaries.shas]
values = ["$SHA"]
[dictionaries.sites]
values = ["de-frankfurt", "es-logrono", "pl-gdansk"]
[dictionaries.vms]
values = ["vm-1"]
[dictionaries.images]
values = ["tiny"]
[dictionaries.providers]
values = ["provider-es", "provider-de", "provider-pl"]
[parameters]
"path.key" = { dictionary = "keys", probability = 0.5 }
"path.sha256" = { dictionary = "shas", probability = 0.5 }
"query.site" = { dictionary = "sites", probability = 0.5 }
"query.vm" = { dictionary = "vms", probability = 0.5 }
"query.name" = { dictionary = "vms", probability = 0.5 }
"body.image" = { dictionary = "images", probability = 0.5 }
"body.provider" = { dictionary = "providers", probability = 0.5 }
"body.site" = { dictionary = "sites", probability = 0.5 }
EOF

CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,ignored_auth
FAILED=0
# fuzz NAME TOKEN [ARGS...]: one schemathesis run with TOKEN on the
# operations ARGS select; its log and JUnit report are in $WORK (and its
# cache: schemathesis keeps one in the working directory).
fuzz() {
  local name="$1" token="$2"
  shift 2
  say "Fuzzing as $name: $EXAMPLES examples per operation, seed $SEED"
  local start rc
  start=$(date +%s)
  set +e
  (cd "$WORK" && "$VENV/bin/st" --config-file "$WORK/schemathesis.toml" run \
    "$URL/api/v1/openapi.json" \
    --header "Authorization: Bearer $token" --checks "$CHECKS" \
    --max-examples "$EXAMPLES" --seed "$SEED" \
    --workers 1 --request-timeout 30 --no-color \
    --report junit --report-dir "$WORK/report-$name" \
    --generation-database none "$@") 2>&1 | tee "$WORK/schemathesis-$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "$name: schemathesis exit $rc after $(( $(date +%s) - start )) s" >&2
  [ "$rc" = 0 ] || FAILED=1
}

START=$(date +%s)
# The agents' operations with a host token and the join with a join token
# first (the admin run may delete the host), then everything with the admin
# token. GET /watch is an endless event stream, which a fuzzer would wait on
# until its request timeout; tests/api.rs covers it.
fuzz host "$HOST_TOKEN" \
  --include-path-regex '^/api/v1/(agent/(connect|mux)|relay/|staging/|images/\{key\}/data)'
fuzz join "$JOIN_TOKEN" --include-path /api/v1/agent/join
fuzz admin "$TOKEN" --exclude-path /api/v1/watch

say "Summary"
for f in "$WORK"/schemathesis-*.log; do
  echo "$(basename "$f" .log): $(grep -h -E '[0-9]+ generated' "$f" | tail -1 | sed 's/^ *//')" >&2
done
echo "all runs: $(( $(date +%s) - START )) s, seed $SEED, $EXAMPLES examples per operation" >&2
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "the control plane died during the run" >&2
  FAILED=1
fi
if grep -q 'panicked' "$WORK/server.log"; then
  echo "the control plane panicked:" >&2
  grep -m5 'panicked' "$WORK/server.log" >&2
  FAILED=1
fi
if [ "$FAILED" = 0 ]; then echo "no failures" >&2; else echo "FAILURES: see the logs above" >&2; fi
exit "$FAILED"
