"""The vectorized built-ins decide as their per-guest versions did (kept as oracles in
``*_reference.py``), step after step, for arbitrary fleets; and a plugin with only
``decide`` runs through the adapter with the same result as called directly."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd.model import GuestSnapshot, GuestStats, HostSnapshot
from overcommitd.table import GuestTable
from policies.api import decide_batch
from policies.headroom import HeadroomPolicy
from policies.mom import MomPolicy
from tests import headroom_reference, mom_reference

GIB, MIB = 1024 * 1024, 1024


@st.composite
def fleets(draw: st.DrawFn) -> tuple[HostSnapshot, list[GuestSnapshot]]:
    n = draw(st.integers(min_value=0, max_value=8))
    guests = []
    for i in range(n):
        max_kib = draw(st.integers(min_value=256 * MIB, max_value=16 * GIB))
        actual = draw(st.integers(min_value=1, max_value=max_kib))
        size = st.none() | st.integers(min_value=0, max_value=max_kib)
        stats = draw(
            st.none()
            | st.builds(GuestStats, st.just(0.0), mem_free_kib=size, mem_available_kib=size, disk_caches_kib=size)
        )
        guests.append(
            GuestSnapshot(
                uuid=f"u{draw(st.integers(min_value=0, max_value=9))}-{i}",
                name=f"g{i}",
                max_kib=max_kib,
                actual_kib=actual,
                current_kib=actual,
                stats=stats,
                floor_kib=draw(st.integers(min_value=0, max_value=max_kib)),
                weight=draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
            )
        )
    total = draw(st.integers(min_value=GIB, max_value=256 * GIB))
    host = HostSnapshot(
        0.0, total, draw(st.integers(min_value=0, max_value=total)), arc_reclaimable_kib=draw(st.integers(0, GIB))
    )
    return host, guests


def _targets(result: Any) -> dict[str, int]:
    return {u: int(t) for u, t in result.targets_kib.items()}


@given(steps=st.lists(fleets(), min_size=1, max_size=6), count_arc=st.booleans())
@settings(max_examples=300, deadline=None)
def test_headroom_over_columns_decides_as_per_guest(
    steps: list[tuple[HostSnapshot, list[GuestSnapshot]]], count_arc: bool
) -> None:
    new = HeadroomPolicy(HeadroomPolicy.Params(count_arc=count_arc))
    old = headroom_reference.HeadroomPolicy(headroom_reference.HeadroomParams(count_arc=count_arc))
    for host, guests in steps:
        assert _targets(new.decide(host, guests, None)) == _targets(old.decide(host, guests, None))


@given(steps=st.lists(fleets(), min_size=1, max_size=8), history_len=st.sampled_from([1, 3, 10]))
@settings(max_examples=300, deadline=None)
def test_mom_over_columns_decides_as_per_guest_step_after_step(
    steps: list[tuple[HostSnapshot, list[GuestSnapshot]]], history_len: int
) -> None:
    """Guests come, go, miss a sample: the histories follow as upstream MOM's do."""
    new = MomPolicy(MomPolicy.Params(history_len=history_len))
    old = mom_reference.MomPolicy(mom_reference.MomParams(history_len=history_len))
    new_state, old_state = new.initial_state(), old.initial_state()
    for host, guests in steps:
        guests = list({g.uuid: g for g in guests}.values())
        a, b = new.decide(host, guests, new_state), old.decide(host, guests, old_state)
        assert _targets(a) == _targets(b)
        histories = {u: (h.balloon_cur_kib, h.mem_unused_kib) for u, h in a.state.guests.items()}
        assert histories == {u: (h.balloon_cur_kib, h.mem_unused_kib) for u, h in b.state.guests.items()}
        new_state, old_state = a.state, b.state


@given(fleet=fleets())
@settings(max_examples=100, deadline=None)
def test_a_plugin_with_only_decide_is_adapted_to_columns(fleet: tuple[HostSnapshot, list[GuestSnapshot]]) -> None:
    host, guests = fleet
    guests = list({g.uuid: g for g in guests}.values())
    plugin = headroom_reference.HeadroomPolicy()  # has decide only
    assert not hasattr(plugin, "decide_batch")
    table = GuestTable.of(guests)
    batch = decide_batch(plugin, host, table, None)
    direct = plugin.decide(host, guests, None).targets_kib
    adapted = {table.uuid[i]: int(t) for i, t in enumerate(batch.targets_kib.tolist()) if not math.isnan(t)}
    assert adapted == direct
