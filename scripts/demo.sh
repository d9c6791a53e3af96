#!/usr/bin/env bash
# The continuum on one machine: a control plane on SQLite and three host
# agents modelled as three providers in three EU countries (Spain, Germany,
# Poland), a real VM placed on one of them, and its guest console.
#
#   scripts/demo.sh         start (or restart) the demo
#   scripts/demo.sh stop    stop everything it started, VMs included
#
# Everything lives in .demo/ in the repository.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEMO="$ROOT/.demo"
PORT="${VIRT8RA_DEMO_PORT:-8480}"
URL="http://127.0.0.1:$PORT"
BIN="$ROOT/target/release/virt8ra"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

stop() {
  if [ -d "$DEMO" ]; then
    # Delete VMs through the API first so agents shut their guests down.
    if [ -f "$DEMO/server/admin.token" ] && [ -x "$BIN" ] && curl -fs "$URL/healthz" >/dev/null 2>&1; then
      export VIRT8RA_URL="$URL" VIRT8RA_TOKEN="$(cat "$DEMO/server/admin.token")"
      for vm in $("$BIN" vm list -o json 2>/dev/null | sed -n 's/^    "name": "\(.*\)",$/\1/p'); do
        "$BIN" vm delete "$vm" --wait --wait-timeout 60 >/dev/null 2>&1 || true
      done
    fi
    for f in "$DEMO"/*.pid; do
      [ -f "$f" ] || continue
      kill "$(cat "$f")" 2>/dev/null || true
      rm -f "$f"
    done
    # Any guest left behind by an earlier run.
    pkill -f "qemu-system-x86_64.*$DEMO" 2>/dev/null || true
    pkill -f "qemu-nbd.*$DEMO" 2>/dev/null || true
  fi
}

case "${1:-}" in
  stop)
    stop
    echo "demo stopped"
    exit 0 ;;
  -h|--help)
    sed -n '2,9s/^# \{0,1\}//p' "$0"
    exit 0 ;;
  "") ;;
  *)
    echo "unknown argument '$1': scripts/demo.sh [stop|--help]" >&2
    exit 2 ;;
esac

say "Installing missing system packages"
bash "$ROOT/scripts/deps.sh"

say "Building virt8ra (release)"
(cd "$ROOT" && cargo build --release --locked)

say "Building the test appliance (a busybox guest with Debian's cloud kernel)"
IMAGE="$(bash "$ROOT/scripts/test-image.sh")"
echo "$IMAGE"

stop
rm -rf "$DEMO"
mkdir -p "$DEMO"

say "Starting the control plane on $URL (SQLite in .demo/server)"
"$BIN" server --listen "127.0.0.1:$PORT" --data-dir "$DEMO/server" >"$DEMO/server.log" 2>&1 &
echo $! >"$DEMO/server.pid"
for _ in $(seq 1 100); do
  curl -fs "$URL/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "$URL/healthz" >/dev/null || { echo "the control plane did not start; see $DEMO/server.log" >&2; exit 1; }
export VIRT8RA_URL="$URL"
export VIRT8RA_TOKEN="$(cat "$DEMO/server/admin.token")"

say "Three providers in three countries, one site each"
# name        provider      country city       lat      lon      gCO2/kWh
while read -r site provider country city lat lon carbon; do
  "$BIN" provider create "$provider" --country "$country" >/dev/null
  "$BIN" site create "$site" --provider "$provider" --country "$country" --city "$city" \
    --lat "$lat" --lon "$lon" --carbon "$carbon" >/dev/null
done <<'TOPO'
es-logrono   provider-a  ES  Logroño    42.4627  -2.4449  130
de-frankfurt provider-c  DE  Frankfurt  50.1109   8.6821  380
pl-gdansk    provider-e  PL  Gdańsk     54.3520  18.6466  650
TOPO
"$BIN" site list

say "Starting three host agents; each joins its site with a one-time join token"
for site in es-logrono de-frankfurt pl-gdansk; do
  host="host-${site%%-*}"
  # From a file: a token on the command line is visible to every local user (ps).
  (umask 077 && "$BIN" host join-token create --site "$site" >"$DEMO/$host.join-token")
  "$BIN" agent --server "$URL" --join-token-file "$DEMO/$host.join-token" --name "$host" \
    --data-dir "$DEMO/$host" --vcpus 2 --memory-mib 2048 --disk-gib 20 \
    --migration-address 127.0.0.1 \
    >"$DEMO/$host.log" 2>&1 &
  echo $! >"$DEMO/$host.pid"
done
for _ in $(seq 1 120); do
  n=$("$BIN" host list -o json | grep -c '"state": "ready"' || true)
  [ "$n" = 3 ] && break
  sleep 0.5
done
"$BIN" host list

say "Importing the appliance image"
"$BIN" image import "$IMAGE" --name busybox

say "Creating a VM that must stay in Poland"
"$BIN" vm create demo-vm --image busybox --memory-mib 128 --country PL --port 80 --wait

say "The guest's serial console"
for _ in $(seq 1 120); do
  "$BIN" vm console demo-vm 2>/dev/null | grep -q VIRT8RA-GUEST-BOOTED && break
  sleep 0.5
done
"$BIN" vm console demo-vm | grep -a VIRT8RA | tail -n 5

say "The guest's web page, through the agent's port forward"
addr=$("$BIN" vm show demo-vm -o json | sed -n 's/.*"host_addr": "\(.*\)".*/\1/p' | head -n 1)
curl -s --max-time 10 "http://$addr/" || echo "(the page is not up yet; try: curl http://$addr/)"

say "The marketplace: publishing the test and web appliances"
VIRT8RA_BIN="$BIN" bash "$ROOT/scripts/publish-appliances.sh" >/dev/null
"$BIN" appliance list

say "One command: the web appliance in Spain, Germany and Poland"
"$BIN" app deploy web --name shop --locations es,de,pl --param "greeting=Hello from the demo" --wait
"$BIN" app show shop

say "Each replica's page names its own VM and site"
for addr in $("$BIN" app show shop -o json | sed -n 's/.*"host_addr": "\(.*\)".*/\1/p'); do
  for _ in $(seq 1 90); do
    curl -s --max-time 2 "http://$addr/" | grep -q "vm=" && break
    sleep 1
  done
  curl -s --max-time 5 "http://$addr/" | grep -a "vm=" || echo "(not up yet: curl http://$addr/)"
done

say "Portability: a VM moves live to another provider, and its data's rules hold"
"$BIN" vm create roamer --image busybox --memory-mib 128 --wait
"$BIN" vm migrate roamer --mode live --wait
"$BIN" vm migrations roamer
"$BIN" vm migrate demo-vm --to-country DE || echo "(refused: demo-vm's data must stay in Poland)"

say "Tenants: two projects that cannot see each other"
for p in team-a team-b; do "$BIN" project create "$p" >/dev/null; done
"$BIN" user create ana >/dev/null
"$BIN" user create ben >/dev/null
TOKEN_A=$("$BIN" token create --user ana --project team-a --role member 2>/dev/null)
TOKEN_B=$("$BIN" token create --user ben --project team-b --role member 2>/dev/null)
VIRT8RA_TOKEN=$TOKEN_A "$BIN" vm create a-web --image busybox --memory-mib 128 --no-start >/dev/null
VIRT8RA_TOKEN=$TOKEN_B "$BIN" vm create b-web --image busybox --memory-mib 128 --no-start >/dev/null
echo "ana (team-a) sees:"; VIRT8RA_TOKEN=$TOKEN_A "$BIN" vm list
echo "ben (team-b) sees:"; VIRT8RA_TOKEN=$TOKEN_B "$BIN" vm list
echo "ana asks for team-b's b-web (answered as if it did not exist):"
VIRT8RA_TOKEN=$TOKEN_A "$BIN" vm show b-web 2>&1 || true
echo "the admin picks a project with --project:"; "$BIN" --project team-b vm list

say "The continuum is running"
cat <<EOT
Try it yourself:
  export VIRT8RA_URL=$URL
  export VIRT8RA_TOKEN=\$(cat $DEMO/server/admin.token)
  $BIN vm list
  $BIN vm create another --image busybox --country ES --wait
  $BIN vm events demo-vm
  $BIN vm migrate roamer --to-site es-logrono --wait
  $BIN host evacuate host-de --wait
  $BIN app list
  $BIN app delete shop --wait
  $BIN vm stop demo-vm --wait
Logs are in $DEMO/. Stop everything with: scripts/demo.sh stop
EOT
