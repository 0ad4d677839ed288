"""Which stat tags a guest kernel sends (sim.memory.stat_tags), the simulator sending only
those, and every built-in policy working without the tags a 6.1 guest lacks."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overcommitd.model import GuestSnapshot, GuestStats
from policies import registry
from policies.signals import Bursts
from policies.testing import GIB, guest, host
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.memory.kernel import GuestKernel
from sim.memory.stat_tags import mask_stats, parse_version, tags_sent, unsent_fields

BUILT_IN = sorted(registry.known())


@pytest.mark.parametrize(
    ("version", "highest_tag"),
    [
        ("2.6", 5),
        ("4.5", 5),
        ("4.6", 6),
        ("4.15", 6),
        ("4.16", 7),
        ("4.18", 9),
        ("6.1", 9),
        ("6.1.192", 9),
        ("6.11", 9),
        ("6.12", 15),
        ("7.0", 15),
    ],
)
def test_tags_by_kernel_version(version: str, highest_tag: int) -> None:
    assert tags_sent(version) == frozenset(range(highest_tag + 1))


def test_a_6_1_guest_never_sends_the_reclaim_counters() -> None:
    assert unsent_fields("6.1") == (
        "oom_kills",
        "alloc_stalls",
        "async_scan_kib",
        "direct_scan_kib",
        "async_reclaim_kib",
        "direct_reclaim_kib",
    )


@pytest.mark.parametrize("bad", ["6", "six.one", "", "6.x"])
def test_a_bad_version_is_named(bad: str) -> None:
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        parse_version(bad)


full = st.builds(GuestStats, st.floats(0, 1e6), *(st.integers(0, 2**62) for _ in fields(GuestStats)[1:]))


@given(full, st.sampled_from(["4.5", "4.16", "6.1", "6.12"]))
def test_mask_only_removes_and_is_idempotent(stats: GuestStats, version: str) -> None:
    masked = mask_stats(stats, version)
    assert mask_stats(masked, version) == masked
    for f in fields(GuestStats):
        got = getattr(masked, f.name)
        assert got is None if f.name in unsent_fields(version) else got == getattr(stats, f.name)


def _hv(kernel: GuestKernel | None) -> SimHypervisor:
    spec = GuestSpec(uuid="u", name="vm", ram_kib=4 * GIB)
    hv = SimHypervisor([spec], host_mem_kib=16 * GIB, initial_demand_kib=np.array([GIB]), guest_kernel=kernel)
    hv.advance(30.0, np.array([GIB]), np.zeros(1))
    return hv


def test_the_simulated_guest_sends_its_kernels_tags() -> None:
    default = _hv(None).snapshot()[0].stats
    assert default is not None and default.mem_available_kib is not None and default.disk_caches_kib is not None
    assert default.oom_kills is None and default.alloc_stalls is None  # the test image's 6.1
    newer = _hv(GuestKernel(version="6.12")).snapshot()[0].stats
    assert newer is not None and newer.oom_kills == 0
    older = _hv(GuestKernel(version="4.5")).snapshot()[0].stats
    assert older is not None and older.mem_available_kib is None and older.mem_free_kib is not None


def _masked(g: GuestSnapshot, version: str = "6.1") -> GuestSnapshot:
    assert g.stats is not None
    return replace(g, stats=mask_stats(g.stats, version))


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("version", ["4.5", "6.1"])
def test_every_built_in_policy_decides_on_an_older_guests_stats(name: str, version: str) -> None:
    policy = registry.create(name)
    state = policy.initial_state()
    for i, avail in enumerate([4 * GIB, 3 * GIB, 5 * GIB, 4 * GIB] * 30):
        g = _masked(guest(at_s=10.0 * i, max_kib=8 * GIB, available_kib=avail, free_kib=avail // 2), version)
        result = policy.decide(host(at_s=10.0 * i), [g], state)
        state = result.state
        for target in result.targets_kib.values():
            assert 0 < target <= 8 * GIB


def _using(used_kib: int, at_s: float, actual_kib: int = 16 * GIB) -> GuestSnapshot:
    g = guest(at_s=at_s, max_kib=16 * GIB, actual_kib=actual_kib, available_kib=actual_kib - used_kib)
    return _masked(g)


def test_without_the_counter_a_kill_is_exhaustion_then_a_collapse_of_use() -> None:
    b, _ = Bursts(0.0).observe(_using(GIB, 0), GIB)
    full_up = _using(4 * GIB - 16 * 1024, 10, actual_kib=4 * GIB)  # MemAvailable 16 MiB
    b, killed = b.observe(full_up, 4 * GIB - 16 * 1024)
    assert not killed and b.exhausted
    b, killed = b.observe(_using(GIB, 20, actual_kib=4 * GIB), GIB)
    assert killed and b.largest_rise_kib == 16 * GIB


def test_a_workload_ending_with_room_left_is_no_kill() -> None:
    b, _ = Bursts(0.0).observe(_using(12 * GIB, 0), 12 * GIB)  # 4 GiB available: not exhausted
    b, killed = b.observe(_using(GIB, 10), GIB)
    assert not killed and b.largest_rise_kib == 0


@pytest.mark.parametrize("name", ["sla-floor", "free-page", "pid"])
def test_a_holding_policy_gives_a_6_1_guest_everything_after_an_inferred_kill(name: str) -> None:
    policy = registry.create(name)
    warmup_s = policy.params.warmup_s  # type: ignore[attr-defined]
    state = policy.initial_state()

    def target(g: GuestSnapshot, at_s: float) -> int | None:
        nonlocal state
        result = policy.decide(host(at_s=at_s), [g], state)
        state = result.state
        return result.targets_kib.get(g.uuid)

    target(_using(GIB, 0), 0)
    target(_using(GIB, warmup_s), warmup_s)
    target(_using(3 * GIB - 8 * 1024, warmup_s + 10, actual_kib=3 * GIB), warmup_s + 10)  # out of memory
    assert target(_using(GIB, warmup_s + 20, actual_kib=3 * GIB), warmup_s + 20) == 16 * GIB
