#!/usr/bin/env bash
# Builds the web appliance, offline, from the test appliance (itself built
# from Debian packages by scripts/test-image.sh), and prints the path of its
# qcow2 on stdout (everything else goes to stderr).
#
# The guest is the test appliance with another page: its busybox httpd on
# port 80 serves an HTML page titled "virt8ra web appliance" that shows the
# VM's name and site, both taken from its cloud-init NoCloud context
# (meta-data local-hostname and virt8ra-site). The appliance's user-data
# script (see appliances/web.json) can add to the page. Everything else of
# the test appliance's context handling stays: SSH keys (Dropbear) and
# network-config.
#
# How: the test appliance's FAT disk is unpacked with mtools, its initramfs
# /init gets the new page, and the disk is packed again and converted to
# qcow2. Cached under ${VIRT8RA_CACHE:-REPO/.cache}/web-image/, keyed by the
# test appliance and this script.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${VIRT8RA_CACHE:-$ROOT/.cache}/web-image"
log() { echo "web-image: $*" >&2; }

BASE="$(bash "$ROOT/scripts/test-image.sh")"
for tool in mcopy qemu-img cpio gzip; do
  command -v "$tool" >/dev/null || { log "missing $tool: run scripts/deps.sh"; exit 1; }
done
KEY="$(printf '%s\n%s\n' "$(basename "$BASE")" "$(sha256sum "$0" | cut -d' ' -f1)" | sha256sum | cut -c1-16)"
OUT="$CACHE/web-appliance-$KEY.qcow2"
if [ -s "$OUT" ]; then
  echo "$OUT"
  exit 0
fi
mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
log "building the web appliance from $BASE"

qemu-img convert -q -f qcow2 -O raw "$BASE" "$WORK/disk.raw"
mcopy -i "$WORK/disk.raw" ::initrd.img "$WORK/initrd.img"
mkdir "$WORK/ir"
(cd "$WORK/ir" && gzip -dc "$WORK/initrd.img" | cpio -id --quiet)
grep -q 'virt8ra test appliance: hostname=' "$WORK/ir/init" || { log "the test appliance's /init has no page line to replace"; exit 1; }
# The page: a title, the VM's name and its site.
sed -i 's|^echo "virt8ra test appliance: hostname=$(hostname) site=$SITE" >/www/index.html$|printf "<!doctype html>\\n<title>virt8ra web appliance</title>\\n<h1>virt8ra web appliance</h1>\\n<p>vm=%s site=%s</p>\\n" "$(hostname)" "$SITE" >/www/index.html|' "$WORK/ir/init"
grep -q 'virt8ra web appliance' "$WORK/ir/init" || { log "could not patch /init"; exit 1; }
(cd "$WORK/ir" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) >"$WORK/initrd.new"
mcopy -o -i "$WORK/disk.raw" "$WORK/initrd.new" ::initrd.img
qemu-img convert -q -f raw -O qcow2 "$WORK/disk.raw" "$WORK/out.qcow2"
mv "$WORK/out.qcow2" "$OUT"
find "$CACHE" -maxdepth 1 -name 'web-appliance-*.qcow2' ! -name "$(basename "$OUT")" -delete
log "built $OUT ($(stat -c %s "$OUT") bytes)"
echo "$OUT"
