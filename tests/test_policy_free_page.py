"""free-page: no inflation over memory that free page reporting already returned."""

from __future__ import annotations

import dataclasses

from overcommitd.model import BalloonFeatures
from policies.free_page import FreePageParams, FreePagePolicy, FreePageState
from policies.testing import GIB, MIB, guest, host

REPORTING = BalloonFeatures(reporting=True)


def _policy(**params: object) -> FreePagePolicy:
    """The policy with its warm-up off: these tests are about one step."""
    return FreePagePolicy(FreePageParams(**({"warmup_s": 0.0} | params)))


def _target(g) -> tuple[int | None, FreePageState]:  # type: ignore[no-untyped-def]
    return _policy().decide_guest(host(), g, FreePageState())


def test_does_not_inflate_over_reported_free_memory() -> None:
    # 8 GiB guest using 2 GiB, 5.9 GiB free (reported), 100 MiB of cache
    g = guest(max_kib=8 * GIB, available_kib=6 * GIB, free_kib=6 * GIB - 100 * MIB, features=REPORTING)
    target, state = _target(g)
    assert target is not None and target >= g.actual_kib
    assert state.reported_kib == 6 * GIB - 100 * MIB - FreePagePolicy().params.unreported_free_kib


def test_the_same_guest_without_reporting_is_inflated() -> None:
    g = guest(max_kib=8 * GIB, available_kib=6 * GIB, free_kib=6 * GIB - 100 * MIB)
    target, state = _target(g)
    assert target == g.actual_kib - FreePagePolicy().params.max_reclaim_step_kib
    assert state.reported_kib == 0


def test_a_reporting_guest_full_of_page_cache_is_squeezed() -> None:
    g = guest(max_kib=8 * GIB, available_kib=6 * GIB, free_kib=200 * MIB, features=REPORTING)
    target, _ = _target(g)
    assert target is not None and target < g.actual_kib


def test_squeezing_stops_at_use_plus_reserve() -> None:
    policy = _policy()
    g = guest(max_kib=8 * GIB, actual_kib=2 * GIB + 300 * MIB, available_kib=300 * MIB, free_kib=50 * MIB)
    target, _ = _target(g)
    assert target == 2 * GIB + max(int(2 * GIB * policy.params.reserve_pct / 100), policy.params.min_reserve_kib)


def test_a_short_guest_gets_memory_back_at_once() -> None:
    g = guest(max_kib=8 * GIB, actual_kib=3 * GIB, available_kib=10 * MIB, features=REPORTING)
    target, _ = _target(g)
    assert target is not None and target - g.actual_kib > 200 * MIB


def test_idle_anonymous_memory_is_taken_only_while_the_guest_does_not_swap_in() -> None:
    policy = _policy(idle_anon_pct=50, max_reclaim_step_kib=8 * GIB)
    g0 = guest(at_s=0, max_kib=8 * GIB, actual_kib=5 * GIB, available_kib=GIB, swap_in_kib=0)
    idle_target, state = policy.decide_guest(host(at_s=0), g0, FreePageState())
    g1 = guest(at_s=10, max_kib=8 * GIB, actual_kib=5 * GIB, available_kib=GIB, swap_in_kib=32 * MIB)
    swapping_target, _ = policy.decide_guest(host(at_s=10), g1, state)
    assert idle_target is not None and swapping_target is not None
    assert idle_target < 4 * GIB < swapping_target


def test_before_a_migration_free_memory_is_left_to_the_hint_pass() -> None:
    """Announced migration, FREE_PAGE_HINT: QEMU's hint pass will skip the 5.9 GiB free,
    so the balloon is not inflated over it; without the feature, or without the
    announcement, the same guest is squeezed."""
    hinting = BalloonFeatures(free_page_hint=True)
    g = guest(max_kib=8 * GIB, available_kib=6 * GIB, free_kib=6 * GIB - 100 * MIB, features=hinting)
    leaving = dataclasses.replace(g, migration_pending=True)
    target, state = _target(leaving)
    assert target == g.actual_kib
    assert state.hinted_kib == 6 * GIB - 100 * MIB - FreePagePolicy().params.unreported_free_kib
    for other in (g, dataclasses.replace(leaving, features=BalloonFeatures())):
        target, state = _target(other)
        assert target is not None and target < g.actual_kib and state.hinted_kib == 0


def test_before_a_migration_page_cache_is_still_squeezed() -> None:
    """Hinting skips free pages only: page cache would be copied, so it is taken."""
    g = guest(max_kib=8 * GIB, available_kib=6 * GIB, free_kib=200 * MIB, features=BalloonFeatures(free_page_hint=True))
    target, state = _target(dataclasses.replace(g, migration_pending=True))
    assert state.hinted_kib > 0 and target is not None and target < g.actual_kib
