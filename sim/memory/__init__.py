"""The guest and host memory model: guests (the bulk Fleet), workloads from traces, trace
formats, the guest kernel's rules, the host (and its ZFS ARC), the protocol fleet that
joins guests to ``sim.virtio``, and SimHypervisor, which puts a simulated host behind the
daemon's Hypervisor protocol. Imports ``sim.virtio``, never ``sim.evaluation``."""
