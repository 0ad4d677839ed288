#!/usr/bin/env bash
# Build the tiny real-guest image: Debian's cloud kernel (downloaded and unpacked with
# dpkg-deb -x, never installed: real-guest.md pitfall 2) and a busybox initramfs with the
# virtio balloon modules and a static memory workload. Output in $1 (default
# .cache/realguest): vmlinuz, initrd.img. Idempotent; the .deb is cached.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../.cache/realguest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ "$out/initrd.img" -nt "$here/init" ] \
   && [ "$out/initrd.img" -nt "$here/workload.c" ]; then
  exit 0
fi
cd "$out"
if ! ls linux-image-*.deb >/dev/null 2>&1; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "build.sh: cannot resolve linux-image-cloud-amd64; run apt-get update" >&2; exit 1; }
  apt-get download -qq "$pkg"
fi
rm -rf kpkg root && mkdir -p kpkg root/lib/modules root/bin root/dev root/proc root/sys
dpkg-deb -x linux-image-*.deb kpkg
cp kpkg/boot/vmlinuz-* vmlinuz
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon; do
  f=$(find kpkg/lib/modules -name "$m.ko" | head -1)
  [ -n "$f" ] || { echo "build.sh: module $m.ko not found in the kernel package" >&2; exit 1; }
  cp "$f" root/lib/modules/
done
cp /bin/busybox root/bin/busybox
gcc -static -O2 -o root/workload "$here/workload.c"
install -m 0755 "$here/init" root/init
mknod root/dev/console c 5 1   # without it init's output is lost (pitfall 3)
(cd root && find . | cpio -o -H newc --quiet | gzip -1) > initrd.img.tmp
mv initrd.img.tmp initrd.img
rm -rf kpkg root
echo "build.sh: guest kernel and initramfs in $out"
