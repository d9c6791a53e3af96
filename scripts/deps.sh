#!/usr/bin/env bash
# Installs the system packages virt8ra needs on Debian/Ubuntu, only if missing.
# QEMU (system emulator and qemu-img), and what scripts/test-image.sh builds
# the test appliance from: a cloud kernel, busybox, Dropbear (dropbear-bin),
# syslinux, mtools; the OpenSSH client (ssh, ssh-keygen) the end-to-end
# tests log in to guests with; what the agent's network data plane runs:
# iproute2 (ip, bridge), nftables (nft) and dnsmasq-base (DHCP); and for the
# tunnel's tests and benchmark (crates/tunnel): ping, tcpdump, iperf3,
# python3, and boringtun-cli (the baseline and the interop peer; cached in
# ~/.cargo/bin); PostgreSQL's server programs (postgresql: initdb,
# pg_ctl), which the store's tests and the PostgreSQL end-to-end test run
# a throwaway cluster of their own with (no system service is used); and
# promtool (package prometheus), which the metrics test checks the control
# plane's `GET /metrics` with; and Ansible (ansible-core 2.14 in Debian 12),
# which the collection's end-to-end test (ansible/, tests/ansible.rs) runs.
set -euo pipefail

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in qemu-system-x86 qemu-utils syslinux syslinux-common mtools dosfstools busybox-static cpio gzip \
         dropbear-bin openssh-client iproute2 nftables dnsmasq-base iputils-ping tcpdump iperf3 python3 \
         postgresql prometheus ansible; do
  have "$p" || need+=("$p")
done
# Installing qemu-system-x86 alone can remove a newer qemu-utils (from
# backports): the two are always installed in the same command.
if [[ " ${need[*]-} " == *" qemu-system-x86 "* || " ${need[*]-} " == *" qemu-utils "* ]]; then
  rest=()
  for p in "${need[@]}"; do [ "$p" = qemu-utils ] || [ "$p" = qemu-system-x86 ] || rest+=("$p"); done
  need=("${rest[@]}" qemu-system-x86 qemu-utils)
fi
ls /boot/vmlinuz-*cloud-amd64 >/dev/null 2>&1 || need+=(linux-image-cloud-amd64)
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v curl >/dev/null || need+=(curl ca-certificates)

if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >&2
  if ! $SUDO apt-get install -y -q --no-install-recommends "${need[@]}" >&2 \
     || ! command -v qemu-img >/dev/null || ! command -v qemu-system-x86_64 >/dev/null; then
    # A newer qemu-utils (e.g. from backports) can conflict with the release's
    # qemu-system-x86: install both at the release's version, in one command.
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    echo "retrying with qemu-utils=$v beside qemu-system-x86=$v" >&2
    rest=()
    for p in "${need[@]}"; do [ "$p" = qemu-utils ] || [ "$p" = qemu-system-x86 ] || rest+=("$p"); done
    $SUDO apt-get install -y -q --no-install-recommends --allow-downgrades \
      "qemu-system-x86=$v" "qemu-utils=$v" "${rest[@]}" >&2
  fi
fi

# The prometheus package is here only for its promtool: where systemd runs,
# do not leave the Prometheus server it starts running (only when this
# script installed it now, so an operator's own Prometheus is left alone).
if [[ " ${need[*]-} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
fi

if ! command -v cargo >/dev/null; then
  echo "error: cargo (Rust 1.85 or newer) is needed: install it with rustup or your distribution's package" >&2
  exit 1
fi

# boringtun-cli as it comes: the end-to-end interop test and the benchmark's
# baseline. Built once, kept in ~/.cargo/bin (CI caches that directory).
if ! command -v boringtun-cli >/dev/null && [ ! -x "$HOME/.cargo/bin/boringtun-cli" ]; then
  echo "installing boringtun-cli 0.7.1 (cargo install, once)" >&2
  cargo install boringtun-cli --version 0.7.1 --locked >&2
fi

# cargo-deb builds the Debian package (scripts/build-deb.sh; the package
# test). Built once, kept in ~/.cargo/bin like boringtun-cli.
if ! command -v cargo-deb >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo-deb" ]; then
  echo "installing cargo-deb 3.8.0 (cargo install, once)" >&2
  cargo install cargo-deb --version 3.8.0 --locked >&2
fi
