#!/bin/bash
# Boot the real-guest image (built with tests/realguest/build.sh IMG) once with `rgdump=1` and print
# the kernel's own memory constants (issue 16; tests/data/realguest/k16-dump-*.txt).
# usage: IMG=dir flock /tmp/overcommitd-realguest.lock dump_kernel_constants.sh MEM_MIB
set -u
m=$1; name=k16-$m; con=${TMPDIR:-/tmp}/$name.console; rm -f $con
qemu-system-x86_64 -name $name -machine pc,accel=tcg -m $m -smp 1 -nographic -nodefaults \
  -kernel ${IMG:-/tmp/k16/img}/vmlinuz -initrd ${IMG:-/tmp/k16/img}/initrd.img \
  -append "console=ttyS0 loglevel=4 panic=-1 rgwork=0@0 rgdump=1" \
  -device virtio-balloon-pci,id=balloon0 -serial file:$con -monitor none -display none &
pid=$!
for i in $(seq 1 300); do grep -q RG-DUMP-END $con 2>/dev/null && break; sleep 1; done
kill $pid; wait $pid 2>/dev/null
sed -n '/RG-DUMP-BEGIN/,/RG-DUMP-END/p' $con
