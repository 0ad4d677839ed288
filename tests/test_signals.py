"""policies.signals: the counters and events several policies read, computed one way."""

from __future__ import annotations

from dataclasses import replace

from overcommitd.model import BalloonFeatures
from policies.signals import auto_deflated, oom_killed
from policies.testing import GIB, MIB, guest


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
