"""overcommitd: automatic memory-overcommit policy engine for KVM/QEMU hosts."""
