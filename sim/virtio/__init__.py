"""The protocol-level balloon: split virtqueues in guest memory, QEMU's virtio-balloon
device, Linux's balloon driver, the host's backing of guest RAM, the event clock and the
timings calibrated on real guests. Imports nothing else from ``sim``."""
