"""Oracle: the per-VM policy before it ran over columns (overcommitd 97b9055), kept
verbatim for ``tests/test_batch_policies.py``; not used by the daemon.

The policy's own docstring (``policies/proxmox.py``) says what it does and where
its algorithm comes from.
"""

from __future__ import annotations

from collections.abc import Sequence

from overcommitd.model import GuestSnapshot, HostSnapshot
from policies.api import PolicyResult
from policies.proxmox import ProxmoxParams, PveVm

MIB_B = 1024 * 1024
DEFAULT_SHARES = 1000  # qemu-server: `shares` default 1000, range 0..50000


def _place(vms: Sequence[PveVm], placed: dict[str, int], bytes_b: int, maxchange_b: int) -> int:
    """Water-fill ``bytes_b`` (negative: take) over ``vms``; updates ``placed`` (vmid ->
    new size) and returns what could not be placed."""
    rest, done, repeat, progress = bytes_b, set(), True, True
    while rest and repeat and progress:
        repeat, progress = False, False
        live = [vm for vm in vms if vm.vmid not in done]
        alloc_old = sum(placed.get(vm.vmid, vm.balloon_b) - vm.balloon_min_b for vm in live)
        shares_total = sum(vm.shares for vm in live)
        alloc_new = alloc_old + rest
        changes = 0
        for vm in live:
            desired = vm.balloon_min_b + int(alloc_new / shares_total * vm.shares)
            if not vm.balloon_min_b <= desired <= vm.maxmem_b:
                desired, repeat = min(vm.maxmem_b, max(vm.balloon_min_b, desired)), True
            if bytes_b > 0 and desired > vm.balloon_b:
                new_b = min(vm.balloon_b + maxchange_b, desired)
            elif desired < vm.balloon_b:  # shrinks even in a grow round, as AutoBalloon.pm does
                new_b = max(vm.balloon_b - maxchange_b, desired)
            else:
                done.add(vm.vmid)
                continue
            change = new_b - placed.get(vm.vmid, vm.balloon_b)
            placed[vm.vmid] = new_b
            if change:
                changes += change
                progress = repeat = True
        rest -= changes
    return rest


def compute_alg1(
    vms: Sequence[PveVm], goal_b: int, maxchange_b: int, dead_band_b: int = 10 * MIB_B, pressured_fraction: float = 0.25
) -> dict[str, int]:
    """New sizes in bytes for the VMs that move this round (Proxmox's ``compute_alg1``)."""
    comfortable = [
        vm
        for vm in vms
        if vm.freemem_b and vm.freemem_b > vm.balloon_min_b * pressured_fraction and vm.balloon_b >= vm.balloon_min_b
    ]
    pressured = [vm for vm in vms if vm not in comfortable]
    placed: dict[str, int] = {}
    if goal_b > dead_band_b:
        rest = _place(pressured, placed, goal_b, maxchange_b)
        if rest >= goal_b:
            _place(vms, placed, rest, maxchange_b)
    elif goal_b < -dead_band_b:
        rest = _place(comfortable, placed, goal_b, maxchange_b)
        if rest <= goal_b:
            _place(vms, placed, rest, maxchange_b)
    return placed


class ProxmoxPolicy:
    """Proxmox VE auto-ballooning (pve-manager PVE/AutoBalloon.pm); stateless."""

    name = "proxmox"
    Params = ProxmoxParams

    def __init__(self, params: ProxmoxParams | None = None) -> None:
        self.params = params or ProxmoxParams()

    def initial_state(self) -> None:
        return None

    def candidate(self, guest: GuestSnapshot) -> PveVm | None:
        shares = round(DEFAULT_SHARES * guest.weight)
        if guest.actual_kib <= 0 or shares == 0:
            return None
        free = guest.stats.mem_free_kib if guest.stats is not None else None
        minimum = guest.floor_kib if guest.floor_kib > 0 else min(self.params.default_min_kib, guest.max_kib)
        return PveVm(
            vmid=guest.uuid,
            balloon_b=guest.actual_kib * 1024,
            balloon_min_b=minimum * 1024,
            maxmem_b=guest.max_kib * 1024,
            shares=shares,
            freemem_b=None if free is None else free * 1024,
        )

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        p = self.params
        used_kib = host.used_kib_counting_arc(p.count_arc)
        goal_b = int(host.mem_total_kib * 1024 * p.target_pct / 100 - used_kib * 1024)
        vms = [vm for vm in map(self.candidate, guests) if vm is not None]
        placed = compute_alg1(vms, goal_b, p.max_change_kib * 1024, p.dead_band_kib * 1024, p.pressured_free_fraction)
        current = {vm.vmid: vm.balloon_b for vm in vms}
        targets = {vmid: size_b // 1024 for vmid, size_b in placed.items() if size_b != current[vmid]}
        return PolicyResult(targets, None)
