"""policies.signals: the counters and events several policies read, computed one way."""

from __future__ import annotations

from dataclasses import replace

import pytest

from overcommitd.model import BalloonFeatures
from policies import registry
from policies.signals import Bursts, auto_deflated, oom_killed
from policies.testing import GIB, MIB, guest, host


def _with_kills(kills: int | None):  # type: ignore[no-untyped-def]
    g = guest()
    assert g.stats is not None
    return replace(g, stats=replace(g.stats, oom_kills=kills))


def test_an_oom_kill_is_a_rise_of_the_counter_and_a_missing_counter_keeps_the_last_total() -> None:
    assert oom_killed(None, _with_kills(3)) == (False, 3)  # first sample: nothing to compare
    assert oom_killed(3, _with_kills(3)) == (False, 3)
    assert oom_killed(3, _with_kills(4)) == (True, 4)
    assert oom_killed(3, _with_kills(None)) == (False, 3)  # an older guest: no tag 10
    assert oom_killed(3, guest(stats=False)) == (False, 3)


def test_only_a_deflate_on_oom_guest_above_its_target_deflated_itself() -> None:
    doo = BalloonFeatures(deflate_on_oom=True)
    above = guest(max_kib=8 * GIB, actual_kib=4 * GIB + 8 * MIB, last_target_kib=4 * GIB, features=doo)
    assert auto_deflated(above, 2 * MIB)
    assert not auto_deflated(above, 16 * MIB)  # within the tolerance
    assert not auto_deflated(replace(above, features=BalloonFeatures()), 2 * MIB)  # stopped short instead
    assert not auto_deflated(replace(above, last_target_kib=None), 2 * MIB)  # we never set one


def _using(used_kib: int, *, actual_kib: int = 16 * GIB, at_s: float = 0.0, kills: int = 0):  # type: ignore[no-untyped-def]
    """A 16 GiB guest using ``used_kib``, with the OOM-kill counter at ``kills``."""
    g = guest(at_s=at_s, max_kib=16 * GIB, actual_kib=actual_kib, available_kib=actual_kib - used_kib)
    assert g.stats is not None
    return replace(g, stats=replace(g.stats, oom_kills=kills))


def test_bursts_keep_the_largest_rise_and_a_kill_makes_it_the_maximum() -> None:
    b, killed = Bursts(0.0).observe(_using(GIB), GIB)
    assert (b.largest_rise_kib, killed) == (0, False)
    b, _ = b.observe(_using(5 * GIB), 5 * GIB)
    b, _ = b.observe(_using(GIB), GIB)  # a fall does not lower it
    assert b.largest_rise_kib == 4 * GIB and b.margin_kib(1.25) == 5 * GIB
    b, killed = b.observe(_using(GIB, kills=1), GIB)
    assert killed and b.largest_rise_kib == 16 * GIB
    assert b.warming_up(10.0, 60.0) and not b.warming_up(60.0, 60.0)


@pytest.mark.parametrize("name", ["sla-floor", "free-page", "pid"])
def test_a_holding_policy_watches_first_keeps_room_for_bursts_and_never_squeezes_after_a_kill(name: str) -> None:
    """The policies that hold a balloon in: what a guest showed bounds what they take."""
    policy = registry.create(name)
    warmup_s = policy.params.warmup_s  # type: ignore[attr-defined]
    burst_factor = policy.params.burst_factor  # type: ignore[attr-defined]
    state = policy.initial_state()

    def target(g, at_s: float) -> int | None:  # type: ignore[no-untyped-def]
        nonlocal state
        result = policy.decide(host(at_s=at_s), [g], state)
        state = result.state
        return result.targets_kib.get(g.uuid)

    roomy = _using(GIB)
    watched = target(roomy, 0.0)
    assert watched is not None and watched >= roomy.actual_kib
    assert (target(roomy, warmup_s) or 0) < roomy.actual_kib
    target(_using(4 * GIB), warmup_s + 10)  # a 3 GiB leap within one sample
    squeezed = _using(GIB, actual_kib=3 * GIB)
    assert (target(squeezed, warmup_s + 20) or 0) >= GIB + 3 * GIB * burst_factor
    assert target(_using(GIB, actual_kib=3 * GIB, kills=1), warmup_s + 30) == 16 * GIB
    assert target(roomy, warmup_s + 10 * 86400) == 16 * GIB
