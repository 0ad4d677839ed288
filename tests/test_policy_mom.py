"""MOM baseline: the worked cases of oVirt/mom doc/balloon.rules."""

from __future__ import annotations

import pytest

from policies.mom import MomPolicy, MomState
from policies.testing import GIB, MIB, guest, host


def _decide(policy: MomPolicy, host_free_kib: int, g, state: MomState | None = None):  # type: ignore[no-untyped-def]
    return policy.decide(host(total_kib=100 * GIB, available_kib=host_free_kib), [g], state or policy.initial_state())


def test_moderate_pressure_shrinks_by_5_percent() -> None:
    # host 10 % free (< 20 %): guest may keep 0.20 x 0.10 / 0.20 = 10 % free.
    # cur 8 GiB, MemFree 4 GiB -> used 4 GiB; floor 4 + 0.8 = 4.8 GiB; 0.95 x 8 = 7.6 GiB wins.
    g = guest(max_kib=8 * GIB, available_kib=5 * GIB, free_kib=4 * GIB)
    result = _decide(MomPolicy(), 10 * GIB, g)
    assert result.targets_kib[g.uuid] == int(8 * GIB * 0.95)


def test_shrink_stops_at_used_plus_the_guest_free_share() -> None:
    # host 10 % free; cur 8 GiB, MemFree 0.5 GiB -> used 7.5 GiB; floor 7.5 + 0.1 x 8 = 8.3 GiB
    # is above cur: MOM sets nothing (size > balloon_cur).
    g = guest(max_kib=8 * GIB, available_kib=GIB, free_kib=GIB // 2)
    assert _decide(MomPolicy(), 10 * GIB, g).targets_kib == {}


def test_page_cache_counts_as_used_as_in_mom() -> None:
    # MemFree 1 GiB but 5 GiB of cache: MOM sees 7 GiB used (its known weakness).
    g = guest(max_kib=8 * GIB, available_kib=6 * GIB, free_kib=GIB)
    target = _decide(MomPolicy(), 10 * GIB, g).targets_kib[g.uuid]
    assert target == int(7 * GIB + 0.1 * 8 * GIB)  # floor used + 10 % beats 0.95 x cur


def test_critical_pressure_forces_the_guest_below_its_use() -> None:
    # host 4 % free (<= 5 %): gfp = 0.04 - 0.05 = -0.01; floor = used - 1 % of cur.
    g = guest(max_kib=8 * GIB, actual_kib=4 * GIB, available_kib=GIB // 10, free_kib=GIB // 10)
    target = _decide(MomPolicy(), 4 * GIB, g).targets_kib[g.uuid]
    used = 4 * GIB - GIB // 10
    assert target == int(max(0.95 * 4 * GIB, used - 0.01 * 4 * GIB))


def test_no_pressure_grows_by_5_percent_or_to_the_free_floor() -> None:
    policy = MomPolicy()
    small_need = guest(max_kib=8 * GIB, actual_kib=4 * GIB, available_kib=3 * GIB, free_kib=3 * GIB)
    assert _decide(policy, 50 * GIB, small_need).targets_kib[small_need.uuid] == int(4 * GIB * 1.05)
    short = guest(max_kib=8 * GIB, actual_kib=4 * GIB, available_kib=GIB // 4, free_kib=GIB // 4)
    used = 4 * GIB - GIB // 4
    assert _decide(policy, 50 * GIB, short).targets_kib[short.uuid] == int(used + 0.2 * 4 * GIB)


def test_changes_below_a_quarter_percent_are_not_made() -> None:
    g = guest(max_kib=8 * GIB, actual_kib=8 * GIB - 10 * MIB, available_kib=6 * GIB, free_kib=6 * GIB)
    assert _decide(MomPolicy(), 50 * GIB, g).targets_kib == {}  # grow by 10 MiB < 0.25 % of 8 GiB
    g = guest(max_kib=8 * GIB, actual_kib=8 * GIB - 30 * MIB, available_kib=6 * GIB, free_kib=6 * GIB)
    assert _decide(MomPolicy(), 50 * GIB, g).targets_kib == {g.uuid: 8 * GIB}


def test_the_host_average_lags_a_sudden_drop() -> None:
    # nine samples at 50 % free then one at 10 %: the mean is 46 %, so MOM still grows.
    policy = MomPolicy()
    g = guest(max_kib=8 * GIB, actual_kib=6 * GIB, available_kib=5 * GIB, free_kib=5 * GIB)
    state = policy.initial_state()
    for _ in range(9):
        state = _decide(policy, 50 * GIB, g, state).state
    assert _decide(policy, 10 * GIB, g, state).targets_kib[g.uuid] > g.actual_kib
    assert _decide(policy, 10 * GIB, g).targets_kib[g.uuid] < g.actual_kib  # without history it shrinks


@pytest.mark.parametrize("stats", [False])
def test_guests_without_mem_unused_are_skipped(stats: bool) -> None:
    g = guest(stats=stats)
    assert _decide(MomPolicy(), 10 * GIB, g).targets_kib == {}
