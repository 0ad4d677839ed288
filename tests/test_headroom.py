"""The headroom policy on hand-built snapshots."""

from __future__ import annotations

import dataclasses

from policies.headroom import HeadroomParams, HeadroomPolicy
from tests.helpers import GIB, MIB, guest, host, stats

POLICY = HeadroomPolicy(HeadroomParams(host_target_used_pct=50, buffer_pct=20, min_free_kib=256 * MIB))


def test_a_short_guest_is_given_its_need_even_on_a_full_host() -> None:
    short = guest("a", actual_kib=2 * GIB, stats_=stats(available_kib=100 * MIB))
    full = host(total_kib=64 * GIB, available_kib=1 * GIB)
    targets = POLICY.decide(full, [short], None).targets_kib
    used = 2 * GIB - 100 * MIB
    assert targets == {"uuid-a": used + max(int(used * 0.2), 256 * MIB)}


def test_excess_is_taken_by_slack_over_weight() -> None:
    a = guest("a", actual_kib=4 * GIB, stats_=stats(available_kib=3 * GIB))
    b = guest("b", actual_kib=4 * GIB, stats_=stats(available_kib=3 * GIB), weight=3.0)
    over = host(total_kib=64 * GIB, available_kib=31 * GIB)  # 1 GiB above the 50 % target
    targets = POLICY.decide(over, [a, b], None).targets_kib
    take_a, take_b = 4 * GIB - targets["uuid-a"], 4 * GIB - targets["uuid-b"]
    assert abs(take_a + take_b - GIB) <= 2
    assert abs(take_a - 3 * take_b) <= 3  # weight 3 gives up a third as much


def test_never_below_need_and_hold_without_stats_or_excess() -> None:
    a = guest("a", actual_kib=4 * GIB, stats_=stats(available_kib=3 * GIB))
    huge_excess = host(total_kib=64 * GIB, available_kib=0)
    target = POLICY.decide(huge_excess, [a], None).targets_kib["uuid-a"]
    assert target == GIB + 256 * MIB  # used 1 GiB + max(20 %, 256 MiB)
    calm = host(total_kib=64 * GIB, available_kib=40 * GIB)
    assert POLICY.decide(calm, [a], None).targets_kib == {}


def test_a_guest_without_stats_is_left_out() -> None:
    blind = dataclasses.replace(guest("a", actual_kib=4 * GIB), stats=None)
    assert POLICY.decide(host(available_kib=0), [blind], None).targets_kib == {}
