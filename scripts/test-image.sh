#!/usr/bin/env bash
# Builds the tiny test appliance, offline, from Debian packages only, and
# prints the path of its qcow2 on stdout (everything else goes to stderr).
#
# The guest: Debian's cloud kernel and an initramfs with busybox-static and
# Dropbear (dropbear-bin, with the shared libraries ldd names). Its /init
# prints "VIRT8RA-GUEST-BOOTED hostname=... uptime=..." on the serial console,
# then "VIRT8RA-TICK n uptime=..." every second, powers off cleanly on an
# ACPI power-button press (printing "VIRT8RA-GUEST-POWEROFF"), and leaves a
# shell on the console. It serves a page naming itself and its site on port
# 80. It honours a cloud-init NoCloud seed on its second disk (the volume
# labelled cidata), as virt8ra's agent writes it:
#   - meta-data: local-hostname and virt8ra-site; public-keys become
#     /root/.ssh/authorized_keys, and Dropbear runs on port 22 with password
#     logins disabled and an ed25519 host key generated at this boot
#     (console: "VIRT8RA-SSH port=22 keys=N hostkey=SHA256:...");
#   - network-config (cloud-init network-config version 2, the subset and
#     layout virt8ra writes: ethernets matched by name and/or MAC, dhcp4 via
#     busybox udhcpc, static addresses, gateway4, nameservers into
#     /etc/resolv.conf, mtu); console: "VIRT8RA-NET IFACE addr=... gw=...
#     dns=... search=... mtu=... dhcp4=..." per interface. Without one, eth0
#     gets QEMU user-mode networking's fixed 10.0.2.15/24 via 10.0.2.2 (the
#     address QEMU forwards ports to) when it has the user-mode NIC's MAC
#     (52:54:00:12:34:56); otherwise (NICs on virtual networks) every
#     interface asks DHCP (udhcpc);
#   - user-data, run at every boot if it is a script (the appliance keeps no
#     state between boots).
# Before the boot line, each data disk (a virtio disk with a serial) gets a
# line "VIRT8RA-DISK vdX serial=... size=BYTES head=FIRST-PRINTABLE-BYTES".
# The seed's documents are YAML written in a fixed layout with every value a
# double-quoted string; /init reads them with busybox awk, not a general YAML
# parser.
#
# The disk is a whole-disk FAT volume (mkfs.fat, or mformat without
# dosfstools) with syslinux in its boot sector, filled with mtools (no
# mounting, no root needed), converted to qcow2. SeaBIOS boots such a
# "superfloppy" directly from a virtio or IDE disk, so no partition table or
# MBR is needed. The result is cached under
# ${VIRT8RA_CACHE:-REPO/.cache}/test-image/ and rebuilt only when the kernel,
# busybox, dropbear or this script changes.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${VIRT8RA_CACHE:-$ROOT/.cache}/test-image"
log() { echo "test-image: $*" >&2; }

KERNEL="$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1 || true)"
[ -n "$KERNEL" ] || { log "no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64 (scripts/deps.sh)"; exit 1; }
KVER="${KERNEL#/boot/vmlinuz-}"
MODDIR="/lib/modules/$KVER"
for tool in busybox mformat mcopy syslinux qemu-img cpio gzip ldd; do
  command -v "$tool" >/dev/null || { log "missing $tool: run scripts/deps.sh"; exit 1; }
done
[ -x /bin/busybox ] || { log "missing /bin/busybox: install busybox-static"; exit 1; }
DROPBEAR=/usr/sbin/dropbear
DROPBEARKEY=/usr/bin/dropbearkey
[ -x "$DROPBEAR" ] && [ -x "$DROPBEARKEY" ] || { log "missing dropbear: install dropbear-bin (scripts/deps.sh)"; exit 1; }

KEY="$(printf '%s\n%s\n%s\n%s\n' "$KVER" "$(sha256sum "$0" | cut -d' ' -f1)" \
  "$(sha256sum /bin/busybox | cut -d' ' -f1)" \
  "$(cat "$DROPBEAR" "$DROPBEARKEY" | sha256sum | cut -d' ' -f1)" | sha256sum | cut -c1-16)"
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
mkdir -p "$IR"/{bin,sbin,etc/acpi/PWRF,etc/dropbear,proc,sys,dev,tmp,run,modules,root,var/log}
cp /bin/busybox "$IR/bin/busybox"
# Dropbear and the shared libraries it loads (the dynamic loader included),
# at the paths ldd names.
for b in "$DROPBEAR" "$DROPBEARKEY"; do
  cp "$b" "$IR/bin/"
  for lib in $(ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    mkdir -p "$IR$(dirname "$lib")"
    cp -L "$lib" "$IR$lib"
  done
done
# Root logs in with a key only: "*" is no password (and not a locked account).
echo 'root:*:0:0:root:/root:/bin/sh' >"$IR/etc/passwd"
echo 'root:x:0:' >"$IR/etc/group"
echo '/bin/sh' >"$IR/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\n' >"$IR/etc/nsswitch.conf"
chmod 700 "$IR/root"

# The seed's values are YAML double-quoted strings: unq() takes the quotes
# off and undoes \" and \\ (validated values hold no other escapes that
# matter: a key comment's \uXXXX stays as text).
UNQ_AWK=$(cat <<'AWK'
function unq(s,   out, i, c) {
  if (substr(s, 1, 1) != "\"") return s
  s = substr(s, 2, length(s) - 2); out = ""
  for (i = 1; i <= length(s); i++) {
    c = substr(s, i, 1)
    if (c == "\\") { i++; c = substr(s, i, 1) }
    out = out c
  }
  return out
}
AWK
)
# Reads the seed's network-config (version 2, in the layout virt8ra writes)
# and prints one record per interface: "iface ID", then "name", "mac",
# "dhcp4", "addr", "gw", "dns", "search", "mtu" lines, then "end".
{ echo "$UNQ_AWK"; cat <<'AWK'
{ sub(/\r$/, "") }
/^[^ ]/ { top = $1; next }
top != "ethernets:" { next }
/^  [^ ]/ { if (id != "") print "end"; id = $1; sub(/:$/, "", id); print "iface " unq(id); sec = ""; next }
/^    [^ ]/ {
  key = $1; sub(/:$/, "", key); sec = key; sub2 = ""
  if (key == "dhcp4") print "dhcp4 " $2
  else if (key == "gateway4") print "gw " unq($2)
  else if (key == "mtu") print "mtu " $2
  next
}
/^      - / { if (sec == "addresses") print "addr " unq($2); next }
/^      [^ ]/ {
  k = $1; sub(/:$/, "", k)
  if (sec == "match" && k == "name") print "name " unq($2)
  else if (sec == "match" && k == "macaddress") print "mac " unq($2)
  else if (sec == "nameservers") sub2 = k
  next
}
/^        - / {
  if (sec == "nameservers" && sub2 == "addresses") print "dns " unq($2)
  else if (sec == "nameservers" && sub2 == "search") print "search " unq($2)
  next
}
END { if (id != "") print "end" }
AWK
} >"$IR/etc/netcfg.awk"

# The seed's public-keys (meta-data), one key line each.
{ echo "$UNQ_AWK"; cat <<'AWK'
{ sub(/\r$/, "") }
/^[^ ]/ { keys = ($1 == "public-keys:"); next }
keys && /^  - / { v = $0; sub(/^  - /, "", v); print unq(v) }
AWK
} >"$IR/etc/pubkeys.awk"

# udhcpc's hook: configure the lease, remember what it gave for /init.
cat >"$IR/etc/udhcpc.script" <<'DHCP'
#!/bin/sh
case "$1" in
  deconfig) ip link set "$interface" up ;;
  bound|renew)
    ip addr add "$ip/${mask:-24}" dev "$interface" 2>/dev/null
    for r in $router; do ip route add default via "$r" dev "$interface" 2>/dev/null; break; done
    { echo "addr=$ip/${mask:-24}"; echo "gw=$router"; echo "dns=$dns"; echo "search=$domain"; } >"/run/dhcp.$interface"
    ;;
esac
exit 0
DHCP
chmod +x "$IR/etc/udhcpc.script"
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
ip link set lo up
# The network: the seed's network-config, else QEMU user-mode networking's
# fixed addresses. A "VIRT8RA-NET" console line per interface says what was
# applied.
DNS=""; SEARCH=""
net_apply() {
  dev=""
  for d in /sys/class/net/*; do
    n=${d##*/}
    [ "$n" = lo ] && continue
    [ -n "$NAME" ] && [ "$n" != "$NAME" ] && continue
    [ -n "$MAC" ] && [ "$(cat "$d/address")" != "$MAC" ] && continue
    dev=$n; break
  done
  if [ -z "$dev" ]; then
    echo "VIRT8RA-NET $ID no interface matches name=${NAME:--} mac=${MAC:--}" >/dev/console
    return
  fi
  [ -n "$MTU" ] && ip link set "$dev" mtu "$MTU"
  ip link set "$dev" up
  for a in $ADDRS; do ip addr add "$a" dev "$dev"; done
  [ -n "$GW" ] && ip route add default via "$GW" dev "$dev"
  shown_addrs=$ADDRS; shown_gw=$GW
  if [ "$DHCP" = true ]; then
    rm -f "/run/dhcp.$dev"
    udhcpc -i "$dev" -n -t 10 -T 1 -s /etc/udhcpc.script -p "/run/udhcpc.$dev.pid" >/dev/null 2>&1
    if [ -f "/run/dhcp.$dev" ]; then
      l() { sed -n "s/^$1=//p" "/run/dhcp.$dev"; }
      shown_addrs="$shown_addrs $(l addr)"; [ -z "$shown_gw" ] && shown_gw=$(l gw)
      NS="$NS $(l dns)"; SRCH="$SRCH $(l search)"
    else
      shown_addrs="$shown_addrs dhcp-failed"
    fi
  fi
  DNS="$DNS $NS"; SEARCH="$SEARCH $SRCH"
  j() { set -- $*; [ $# -eq 0 ] && echo - || echo "$*" | tr ' ' ','; }
  echo "VIRT8RA-NET $dev addr=$(j $shown_addrs) gw=${shown_gw:--} dns=$(j $NS) search=$(j $SRCH) mtu=${MTU:--} dhcp4=$DHCP" >/dev/console
}
if [ -f /seed/network-config ]; then
  awk -f /etc/netcfg.awk /seed/network-config >/tmp/net.records
  while read -r k v; do
    case "$k" in
      iface) ID=$v; NAME=""; MAC=""; DHCP=false; ADDRS=""; GW=""; NS=""; SRCH=""; MTU="" ;;
      name) NAME=$v ;;
      mac) MAC=$(echo "$v" | tr 'A-F' 'a-f') ;;
      dhcp4) DHCP=$v ;;
      addr) ADDRS="$ADDRS $v" ;;
      gw) GW=$v ;;
      dns) NS="$NS $v" ;;
      search) SRCH="$SRCH $v" ;;
      mtu) MTU=$v ;;
      end) net_apply ;;
    esac
  done </tmp/net.records
  if [ -n "$(echo $DNS $SEARCH)" ]; then
    {
      [ -n "$(echo $SEARCH)" ] && echo "search $(echo $SEARCH)"
      for n in $DNS; do echo "nameserver $n"; done
    } >/etc/resolv.conf
  fi
elif [ "$(cat /sys/class/net/eth0/address 2>/dev/null)" = 52:54:00:12:34:56 ] && ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
  echo "VIRT8RA-NET eth0 addr=10.0.2.15/24 gw=10.0.2.2 dns=- search=- mtu=- dhcp4=false (default: no network-config)" >/dev/console
else
  # NICs on virtual networks (not the user-mode NIC's MAC): DHCP on each.
  for d in /sys/class/net/*; do
    n=${d##*/}
    [ "$n" = lo ] && continue
    ID=$n; NAME=$n; MAC=""; DHCP=true; ADDRS=""; GW=""; NS=""; SRCH=""; MTU=""
    net_apply
  done
fi
# SSH: the seed's public-keys for root, Dropbear on port 22, keys only.
if [ -f /seed/meta-data ] && awk -f /etc/pubkeys.awk /seed/meta-data >/tmp/keys && [ -s /tmp/keys ]; then
  mkdir -p /root/.ssh
  chmod 700 /root /root/.ssh
  cp /tmp/keys /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
  HK=/etc/dropbear/dropbear_ed25519_host_key
  dropbearkey -t ed25519 -f $HK >/dev/null 2>&1
  FP=$(dropbearkey -y -f $HK 2>/dev/null | sed -n 's/^Fingerprint: *//p' | sed 's/.* //')
  dropbear -s -E -r $HK -p 22 -P /run/dropbear.pid 2>>/var/log/dropbear.log
  echo "VIRT8RA-SSH port=22 keys=$(wc -l </root/.ssh/authorized_keys) hostkey=${FP:-none}" >/dev/console
fi
# A web page on port 80 that names the guest, so tests can reach it through
# the agent's port forward.
mkdir -p /www
echo "virt8ra test appliance: hostname=$(hostname) site=$SITE" >/www/index.html
httpd -p 80 -h /www
# ACPI power button -> clean power-off (busybox acpid runs /etc/acpi/PWRF/00000080).
# Started before the boot line, so a guest that says it booted also honours
# a power-down request.
acpid -c /etc/acpi -a /etc/acpid.conf -l /tmp/acpid.log 2>/dev/null
sleep 0.2
# Data disks (the ones with a serial, as virt8ra's agent attaches them): one
# line each with its size and its first bytes (printable ones only).
for b in /sys/block/vd*; do
  [ -n "$(cat "$b/serial" 2>/dev/null)" ] || continue
  d=${b##*/}
  head=$(dd if=/dev/$d bs=64 count=1 2>/dev/null | tr -cd 'A-Za-z0-9=._-' | cut -c1-48)
  echo "VIRT8RA-DISK $d serial=$(cat $b/serial) size=$(( $(cat $b/size) * 512 )) head=${head:--}" >/dev/console
done
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
