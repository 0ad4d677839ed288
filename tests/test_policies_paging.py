"""pid, sla-floor and free-page keep a guest's room for what it has shown: a spike the guest
had before is held without an OOM kill on the simulator, and a guest that pages (swap-in
or page-cache refaults) gets room back, more while it pages over its SLO."""

from __future__ import annotations

from pathlib import Path

import pytest

from overcommitd.config import DaemonConfig
from policies import registry
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
