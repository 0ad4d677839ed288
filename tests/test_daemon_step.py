"""Issue 16: the simulated hypervisor stamps a target when the daemon's call would have
returned, a step after the tick read the snapshots (``DAEMON_STEP_S``), so the next tick
finds it a little younger than the interval, as the real daemon does. With the guard's
``settle_s`` equal to the interval (5 s each in the real-guest fidelity test), a
DEFLATE_ON_OOM guest that deflated itself right after a target was set is a balloon
still moving to the real daemon; a replay that stamped targets at the tick's instant
took it for one stopped short and backed off inflating it for ``auto_deflate_cooldown_s``
(600 s): 184 MiB apart from the real guest at the end of the fidelity run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from overcommitd.config import GuardConfig
from overcommitd.guard import guard
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import DAEMON_STEP_S, SimHypervisor

MIB = 1024
GIB = 1024 * MIB
INTERVAL_S = 5.0
RULES = GuardConfig(settle_s=INTERVAL_S)


def doo_guest(step_s: float = DAEMON_STEP_S) -> SimHypervisor:
    spec = GuestSpec(uuid="u", name="g", ram_kib=GIB, swap_kib=0, deflate_on_oom=True)
    return SimHypervisor([spec], host_mem_kib=8 * GIB, initial_demand_kib=np.array([100.0 * MIB]), daemon_step_s=step_s)


def tick(hv: SimHypervisor, demand_mib: float) -> None:
    hv.advance(hv.now_s + INTERVAL_S, np.array([demand_mib * MIB]), np.zeros(1))


def test_a_target_is_read_back_one_daemon_step_younger_than_the_interval() -> None:
    hv = doo_guest()
    assert math.isnan(hv.table().last_target_age_s[0])  # never set
    hv.set_target("u", 700 * MIB)
    assert hv.table().last_target_age_s[0] == 0.0  # read back at once: never negative
    tick(hv, 100)
    assert hv.table().last_target_age_s[0] == pytest.approx(INTERVAL_S - DAEMON_STEP_S)
    tick(hv, 100)
    assert hv.table().last_target_age_s[0] == pytest.approx(2 * INTERVAL_S - DAEMON_STEP_S)


@pytest.mark.parametrize(("step_s", "backs_off"), [(DAEMON_STEP_S, False), (0.0, True)])
def test_an_auto_deflate_right_after_a_target_is_a_balloon_in_flight_as_for_the_real_daemon(
    step_s: float, backs_off: bool
) -> None:
    """The guest takes 300 MiB back from the balloon within the tick after its target
    was set. The guard (settle_s = interval) sees a balloon still moving, as the real
    daemon does (its targets are set ~20 ms into a tick), and does not back off; only
    a target stamped at the tick's very instant (step 0, the old replay) looks stopped
    short and starts the 600 s back-off."""
    hv = doo_guest(step_s)
    tick(hv, 100)
    hv.set_target("u", 600 * MIB)
    tick(hv, 700)  # the spike: more than the balloon leaves it
    g = hv.snapshot()[0]
    assert g.actual_kib > 600 * MIB + RULES.auto_deflate_tolerance_kib  # it deflated itself
    decision, memory = guard(hv.now_s, g, g.actual_kib - 64 * MIB, rules=RULES)
    assert (memory.backoff_until_s > hv.now_s) is backs_off
    assert (decision.target_kib == g.actual_kib - 64 * MIB) is not backs_off


def test_a_target_left_alone_for_two_intervals_has_stopped_and_backs_off() -> None:
    """The stamp does not hide a balloon that really stopped short: set two ticks ago,
    the same auto-deflate starts the back-off."""
    hv = doo_guest()
    hv.set_target("u", 600 * MIB)
    tick(hv, 100)
    tick(hv, 700)
    g = hv.snapshot()[0]
    assert g.actual_kib > 600 * MIB + RULES.auto_deflate_tolerance_kib
    _, memory = guard(hv.now_s, g, g.actual_kib - 64 * MIB, rules=RULES)
    assert memory.backoff_until_s == hv.now_s + RULES.auto_deflate_cooldown_s
