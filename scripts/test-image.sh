#!/usr/bin/env bash
# Builds the tiny test appliance, offline, from Debian packages only, and
# prints the path of its qcow2 on stdout (everything else goes to stderr).
#
# The guest: Debian's cloud kernel and an initramfs with busybox-static. Its
# /init prints "VIRT8RA-GUEST-BOOTED hostname=... uptime=..." on the serial
# console, then "VIRT8RA-TICK n uptime=..." every second, powers off cleanly
# on an ACPI power-button press (printing "VIRT8RA-GUEST-POWEROFF"), and
# leaves a shell on the console. It brings up its virtio NIC with QEMU's
# user-mode addresses and serves a page naming itself and its site on port
# 80. It honours a cloud-init NoCloud seed on its second disk: the hostname
# and site from meta-data, and user-data run at every boot if it is a script
# (the appliance keeps no state between boots).
#
# The disk is a whole-disk FAT volume (mkfs.fat, or mformat without
# dosfstools) with syslinux in its boot sector, filled with mtools (no
# mounting, no root needed), converted to qcow2. SeaBIOS boots such a
# "superfloppy" directly from a virtio or IDE disk, so no partition table or
# MBR is needed. The result is cached under
# ${VIRT8RA_CACHE:-REPO/.cache}/test-image/ and rebuilt only when the kernel,
# busybox or this script changes.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${VIRT8RA_CACHE:-$ROOT/.cache}/test-image"
log() { echo "test-image: $*" >&2; }

KERNEL="$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1 || true)"
[ -n "$KERNEL" ] || { log "no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64 (scripts/deps.sh)"; exit 1; }
KVER="${KERNEL#/boot/vmlinuz-}"
MODDIR="/lib/modules/$KVER"
for tool in busybox mformat mcopy syslinux qemu-img cpio gzip; do
  command -v "$tool" >/dev/null || { log "missing $tool: run scripts/deps.sh"; exit 1; }
done
[ -x /bin/busybox ] || { log "missing /bin/busybox: install busybox-static"; exit 1; }

KEY="$(printf '%s\n%s\n%s\n' "$KVER" "$(sha256sum "$0" | cut -d' ' -f1)" \
  "$(sha256sum /bin/busybox | cut -d' ' -f1)" | sha256sum | cut -c1-16)"
OUT="$CACHE/test-appliance-$KEY.qcow2"
if [ -s "$OUT" ]; then
  echo "$OUT"
  exit 0
fi

mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
log "building the test appliance with kernel $KVER"

# --- initramfs
IR="$WORK/initramfs"
mkdir -p "$IR"/{bin,sbin,etc/acpi/PWRF,proc,sys,dev,tmp,run,modules,root}
cp /bin/busybox "$IR/bin/busybox"
for m in kernel/drivers/acpi/button.ko kernel/drivers/input/evdev.ko \
         kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko \
         kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
         kernel/drivers/virtio/virtio_pci.ko kernel/drivers/block/virtio_blk.ko \
         kernel/net/core/failover.ko kernel/drivers/net/net_failover.ko kernel/drivers/net/virtio_net.ko \
         kernel/fs/fat/fat.ko kernel/fs/fat/vfat.ko kernel/fs/nls/nls_cp437.ko kernel/fs/nls/nls_ascii.ko; do
  for f in "$MODDIR/$m" "$MODDIR/$m.xz"; do
    [ -f "$f" ] && cp "$f" "$IR/modules/"
  done
done

cat >"$IR/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# Modules, in dependency order; a missing one is not fatal.
for m in button evdev virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         failover net_failover virtio_net fat vfat nls_cp437 nls_ascii; do
  [ -f /modules/$m.ko ] && insmod /modules/$m.ko 2>/dev/null
done
HOST=virt8ra-guest
SITE=unknown
# cloud-init NoCloud: a FAT volume labelled cidata on the second disk, with
# meta-data (hostname, site) and user-data (run if it is a script).
mkdir -p /seed
for _ in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vdb ] && break; sleep 0.2; done
if [ -b /dev/vdb ] && mount -t vfat -o ro /dev/vdb /seed 2>/dev/null; then
  v() { sed -n "s/^$1: *\"\{0,1\}\([^\"]*\)\"\{0,1\} *$/\1/p" /seed/meta-data; }
  [ -n "$(v local-hostname)" ] && HOST=$(v local-hostname)
  [ -n "$(v virt8ra-site)" ] && SITE=$(v virt8ra-site)
  if [ "$(head -c 2 /seed/user-data 2>/dev/null)" = "#!" ]; then
    cp /seed/user-data /tmp/user-data && chmod +x /tmp/user-data
  fi
fi
hostname "$HOST"
up() { cut -d' ' -f1 /proc/uptime; }
# QEMU user-mode networking: fixed addresses; a web page on port 80 that
# names the guest, so tests can reach it through the agent's port forward.
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
mkdir -p /www
echo "virt8ra test appliance: hostname=$(hostname) site=$SITE" >/www/index.html
httpd -p 80 -h /www
# ACPI power button -> clean power-off (busybox acpid runs /etc/acpi/PWRF/00000080).
# Started before the boot line, so a guest that says it booted also honours
# a power-down request.
acpid -c /etc/acpi -a /etc/acpid.conf -l /tmp/acpid.log 2>/dev/null
sleep 0.2
echo "VIRT8RA-GUEST-BOOTED hostname=$(hostname) uptime=$(up)" >/dev/console
[ -x /tmp/user-data ] && (/tmp/user-data >/dev/console 2>&1 &)
(
  n=0
  while true; do
    n=$((n + 1))
    echo "VIRT8RA-TICK $n uptime=$(up)" >/dev/console
    sleep 1
  done
) &
while true; do
  setsid cttyhack sh </dev/console >/dev/console 2>&1 || sh </dev/console >/dev/console 2>&1
  sleep 1
done
INIT
chmod +x "$IR/init"

cat >"$IR/etc/acpi/PWRF/00000080" <<'PWR'
#!/bin/sh
echo "VIRT8RA-GUEST-POWEROFF uptime=$(cut -d' ' -f1 /proc/uptime)" >/dev/console
sync
poweroff -f
PWR
chmod +x "$IR/etc/acpi/PWRF/00000080"
echo "PWRF PWRF/00000080" >"$IR/etc/acpid.conf"

(cd "$IR" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) >"$WORK/initrd.img"

# --- boot disk: a FAT volume with syslinux
cat >"$WORK/syslinux.cfg" <<'CFG'
DEFAULT linux
PROMPT 0
TIMEOUT 1
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.img console=ttyS0,115200 quiet loglevel=3 panic=-1
CFG
size_kib=$(( ( $(stat -c %s "$KERNEL") + $(stat -c %s "$WORK/initrd.img") ) / 1024 + 4096 ))
DISK="$WORK/disk.raw"
truncate -s "${size_kib}K" "$DISK"
if command -v mkfs.fat >/dev/null; then
  mkfs.fat -n VIRT8RA "$DISK" >&2
else
  mformat -i "$DISK" -v VIRT8RA ::
fi
syslinux --install "$DISK"
mcopy -i "$DISK" "$KERNEL" ::vmlinuz
mcopy -i "$DISK" "$WORK/initrd.img" ::initrd.img
mcopy -i "$DISK" "$WORK/syslinux.cfg" ::syslinux.cfg
qemu-img convert -q -f raw -O qcow2 "$DISK" "$WORK/out.qcow2"
mv "$WORK/out.qcow2" "$OUT"
# Drop images built from older inputs.
find "$CACHE" -maxdepth 1 -name 'test-appliance-*.qcow2' ! -name "$(basename "$OUT")" -delete
log "built $OUT ($(stat -c %s "$OUT") bytes)"
echo "$OUT"
