"""pid, sla-floor and free-page keep a guest's room for what it has shown: a spike the guest
had before is held without an OOM kill on the simulator, and a guest that pages (swap-in
or page-cache refaults) gets room back, more while it pages over its SLO."""

from __future__ import annotations

from pathlib import Path

import pytest

from overcommitd.config import DaemonConfig
from policies import registry
from policies.signals import Paging
from policies.testing import GIB, MIB, guest, host
from sim.evaluation.compare import compare
from sim.evaluation.replay import ReplaySpec
from tests.helpers import bitbrains

NAMES = ("pid", "sla-floor", "free-page")
RAM_KB = 8 * 1024 * 1024
SAMPLE_S = 300


@pytest.fixture(scope="module")
def spikes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8 GiB guest at 2 % use that leaps to 80 % for 30 min in its first hour, idles
    4 h, then leaps the same way again: 5-minute samples."""
    levels = [0.02] * 4 + [0.80] * 6 + [0.02] * 48 + [0.80] * 6 + [0.02] * 12
    rows = [(1_370_000_000.0 + SAMPLE_S * i, float(RAM_KB), RAM_KB * level) for i, level in enumerate(levels)]
    return bitbrains(tmp_path_factory.mktemp("spikes"), rows)


def test_a_spike_the_guest_has_shown_before_is_held_without_a_kill(spikes: Path) -> None:
    # The first leap falls in the policies' watch (warm-up): each learns it; the second
    # leap, four idle hours later, must find room kept for it. The same policies told to
    # keep no room for bursts they saw are killed by it: the trace is real danger.
    spec = ReplaySpec(
        traces=(spikes,), guests=1, hours=6.0, warmup_h=0.0, deflate_on_oom_share=0.0, reporting_share=0.0
    )
    keeping = compare(spec, [registry.create(n) for n in NAMES], DaemonConfig())
    forgetting = compare(spec, [registry.create(n, {"burst_factor": 0.0}) for n in NAMES], DaemonConfig())
    for name in NAMES:
        assert keeping.results[name].scorecard.oom_kills == 0, name
        assert forgetting.results[name].scorecard.oom_kills >= 1, name


def _target(name: str, swap_in_steps_kib: list[int]) -> int:
    """The target a policy sets for a 16 GiB guest using 4 GiB with 256 MiB to spare
    (short of any reserve, so the target is the policy's need, not a reclaim step), after a sample every 10 s whose cumulative swap-in grows by the given KiB."""
    policy = registry.create(name, {"warmup_s": 0.0, "burst_factor": 0.0})
    state = policy.initial_state()
    swap_kib, target = 0, 0
    for i, step_kib in enumerate([0, *swap_in_steps_kib]):
        swap_kib += step_kib
        g = guest(
            "g0",
            at_s=10.0 * i,
            max_kib=16 * GIB,
            actual_kib=4 * GIB + 256 * MIB,
            available_kib=256 * MIB,
            swap_in_kib=swap_kib,
        )
        result = policy.decide(host(at_s=10.0 * i, available_kib=40 * GIB), [g], state)
        state = result.state
        target = result.targets_kib[g.uuid]
    return target


@pytest.mark.parametrize("name", NAMES)
def test_a_guest_that_pages_gets_room_back(name: str) -> None:
    calm = _target(name, [0, 0, 0])
    paged = _target(name, [0, 0, 64 * MIB])
    paging_on = _target(name, [64 * MIB, 64 * MIB, 64 * MIB])
    assert paged > calm  # what it swapped in is room it needed
    assert paging_on > paged  # over its SLO at every sample: the room doubles each time


def _room_after_bursts(budget_on: bool) -> list[float]:
    """The paging room of a guest ballooned to 1 GiB, using 512 MiB, that swaps in 400 MiB in one
    5-minute sample every 2 h (over its SLO on average: 3.3 MiB/min against 0.2 % of
    512 MiB, 1 MiB/min), sampled just before each next burst."""
    window_s = 86400.0 if budget_on else 0.0  # 0: no error budget kept
    paging, swap_kib, rooms = Paging(0.0), 0, []
    for i in range(1, 4 * 24 + 1):  # 8 h of 5-minute samples
        t_s = 300.0 * i
        swap_kib += 400 * MIB if i % 24 == 2 else 0
        g = guest("g0", at_s=t_s, max_kib=2 * GIB, actual_kib=GIB, available_kib=512 * MIB, swap_in_kib=swap_kib)
        paging = paging.observe(t_s, g, 512 * MIB, 0.2, 3600.0, 64 * MIB, window_s)
        if i % 24 == 0:
            rooms.append(paging.room_kib)
    return rooms


def test_a_guest_over_its_slo_on_average_keeps_its_room_between_bursts() -> None:
    # Each burst is over the per-sample rate, so the room doubles; between bursts it
    # would halve every hour and be gone by the next one. Over the SLO's error budget,
    # it is kept instead, so the next burst finds its cache still there.
    kept, forgotten = _room_after_bursts(True), _room_after_bursts(False)
    assert all(room >= 400 * MIB for room in kept)
    assert all(room < 400 * MIB / 2 for room in forgotten)


def test_a_guest_within_its_slo_lets_its_room_decay() -> None:
    # 40 MiB every 2 h from a guest using 4 GiB is well within 0.2 %/min: no budget held.
    paging, swap_kib = Paging(0.0), 0
    for i in range(1, 25):
        swap_kib += 40 * MIB if i == 2 else 0
        g = guest(
            "g0", at_s=300.0 * i, max_kib=8 * GIB, actual_kib=6 * GIB, available_kib=2 * GIB, swap_in_kib=swap_kib
        )
        paging = paging.observe(300.0 * i, g, 4 * GIB, 0.2, 3600.0, 64 * MIB)
    assert paging.room_kib < 64 * MIB / 2


def test_paging_with_the_balloon_empty_earns_no_room() -> None:
    # At its maximum the guest pages as on a host of its own: no room can help it.
    def room(actual_kib: int) -> float:
        paging = Paging(0.0)
        for i, swap_kib in enumerate([0, 256 * MIB]):
            g = guest(
                "g0", at_s=10.0 * i, max_kib=8 * GIB, actual_kib=actual_kib, available_kib=GIB, swap_in_kib=swap_kib
            )
            paging = paging.observe(10.0 * i, g, actual_kib - GIB, 0.2, 3600.0, 64 * MIB)
        return paging.room_kib

    assert room(8 * GIB) == 0
    assert room(6 * GIB) >= 256 * MIB
