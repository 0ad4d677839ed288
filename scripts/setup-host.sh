#!/usr/bin/env bash
# Make this (throwaway, Debian 12, root) machine able to run the real-guest tests:
# QEMU, a libvirtd the tests start privately, mosquitto, and the tiny guest image.
# Follows ../shared/reference/real-guest.md; idempotent. Called by scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  pkg-config gcc libc6-dev mosquitto busybox-static cpio openssl
  systemd)  # systemd: systemd-analyze checks the unit (tests/test_systemd.py)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 && [ ! -s .cache/realguest/vmlinuz ]; then
  need_update=1
fi
if [ ${#missing[@]} -gt 0 ] || [ -n "${need_update:-}" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  [ ${#missing[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's mosquitto package may start a system broker; the tests start their own on a
# free port, so the system one is left as it is.

# libvirtd reads the user libvirt-qemu before qemu.conf (pitfall 6); normally made by
# libvirt-daemon-system, which pulls in polkit, dnsmasq and init scripts we do not want.
id libvirt-qemu >/dev/null 2>&1 || useradd -r -M -s /usr/sbin/nologin libvirt-qemu
# qemu.conf for a libvirtd without systemd, cgroups, apparmor or virtlogd (pitfall 7).
marker="# overcommitd real-guest harness"
if ! grep -qF "$marker" /etc/libvirt/qemu.conf 2>/dev/null; then
  mkdir -p /etc/libvirt
  [ ! -e /etc/libvirt/qemu.conf ] || cp /etc/libvirt/qemu.conf /etc/libvirt/qemu.conf.before-overcommitd
  cat > /etc/libvirt/qemu.conf <<CONF
$marker
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
CONF
fi

bash tests/realguest/build.sh
