"""Proxmox baseline: reproduces pve-manager's AutoBalloon.pm on its documented examples."""

from __future__ import annotations

from policies.proxmox import ProxmoxPolicy, PveVm, compute_alg1
from policies.testing import GIB, MIB, guest, host

B_GIB = 1024**3
B_MIB = 1024**2


def _absim(vms: dict[str, PveVm], total_b: int, used_b: int) -> tuple[int, dict[str, int]]:
    """Proxmox's test/balloontest.pl `absim`: apply each round's result and recompute the
    goal from the new host use, until a round changes nothing. Returns (calls, growth)."""
    start = {k: vm.balloon_b for k, vm in vms.items()}
    calls = 0
    while True:
        calls += 1
        goal_b = int(total_b * 80 / 100 - used_b)
        moved = {
            k: b for k, b in compute_alg1(list(vms.values()), goal_b, 100 * B_MIB).items() if b != vms[k].balloon_b
        }
        if not moved:
            return calls, {k: vm.balloon_b - start[k] for k, vm in vms.items()}
        for k, b in moved.items():
            used_b += b - vms[k].balloon_b
            old = vms[k]
            vms[k] = PveVm(k, b, old.balloon_min_b, old.maxmem_b, old.shares, old.freemem_b)


def test_docs_example_3000_and_1000_shares_reach_the_recomputed_fixpoint() -> None:
    # qm.adoc: 32 GiB host, 16 GiB used, 80 % target; a 3000-share VM and three at 1000.
    # prior-art.md §9 recomputed the fixpoint with the real compute_alg1: 51 rounds,
    # +5,153,960,756 B and +1,717,986,918 B each.
    vms = {
        f"vm{i}": PveVm(f"vm{i}", 2 * B_GIB, 2 * B_GIB, 16 * B_GIB, s, B_GIB)
        for i, s in enumerate([3000, 1000, 1000, 1000])
    }
    calls, growth = _absim(vms, 32 * B_GIB, 16 * B_GIB)
    assert calls == 51
    assert growth == {"vm0": 5_153_960_756, "vm1": 1_717_986_918, "vm2": 1_717_986_918, "vm3": 1_717_986_918}


def test_each_vm_moves_at_most_100_mib_per_round() -> None:
    vms = [PveVm(f"vm{i}", 2 * B_GIB, 2 * B_GIB, 16 * B_GIB, 1000, B_GIB) for i in range(3)]
    placed = compute_alg1(vms, 9 * B_GIB, 100 * B_MIB)
    assert placed and all(b - 2 * B_GIB == 100 * B_MIB for b in placed.values())


def test_goal_inside_the_10_mib_dead_band_moves_nothing() -> None:
    vms = [PveVm("a", 4 * B_GIB, B_GIB, 8 * B_GIB, 1000, B_GIB)]
    assert compute_alg1(vms, 9 * B_MIB, 100 * B_MIB) == {}
    assert compute_alg1(vms, -9 * B_MIB, 100 * B_MIB) == {}
    assert compute_alg1(vms, -11 * B_MIB, 100 * B_MIB) != {}


def test_shrink_takes_from_comfortable_vms_first() -> None:
    comfortable = PveVm("c", 4 * B_GIB, B_GIB, 8 * B_GIB, 1000, 2 * B_GIB)
    pressured = PveVm("p", 4 * B_GIB, B_GIB, 8 * B_GIB, 1000, 100 * B_MIB)  # free <= 25 % of minimum
    placed = compute_alg1([comfortable, pressured], -50 * B_MIB, 100 * B_MIB)
    assert set(placed) == {"c"} and placed["c"] < comfortable.balloon_b


def test_policy_shrinks_guests_when_the_host_is_above_80_percent() -> None:
    h = host(total_kib=64 * GIB, available_kib=8 * GIB)  # 87.5 % used
    guests = [guest(f"g{i}", max_kib=16 * GIB, available_kib=4 * GIB) for i in range(3)]
    result = ProxmoxPolicy().decide(h, guests, None)
    assert set(result.targets_kib) == {g.uuid for g in guests}
    assert all(16 * GIB - t == 100 * MIB for t in result.targets_kib.values())


def test_policy_grows_guests_when_the_host_has_room() -> None:
    h = host(total_kib=64 * GIB, available_kib=40 * GIB)
    g = guest("g", max_kib=16 * GIB, actual_kib=8 * GIB, available_kib=GIB)
    result = ProxmoxPolicy().decide(h, [g], None)
    assert result.targets_kib[g.uuid] == 8 * GIB + 100 * MIB
