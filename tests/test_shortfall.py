"""The host shortfall estimate (``overcommitd.shortfall``): its terms on hand-made
snapshots, its invariants as properties, and when the daemon's log says it."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd.config import GuardConfig
from overcommitd.model import GuestSnapshot, HostSnapshot, RunState
from overcommitd.shortfall import NEWS_MIN_KIB, Shortfall, ShortfallLog, estimate, needs_kib, short_text
from overcommitd.table import GuestTable
from policies import testing
from policies.testing import GIB, MIB

RULES = GuardConfig()
NOW_S = 100.0


def vm(
    name: str, *, max_gib: float = 8, actual_gib: float | None = None, available_gib: float = 2, **kw: object
) -> GuestSnapshot:
    return testing.guest(
        name,
        at_s=NOW_S - 5,
        max_kib=int(max_gib * GIB),
        actual_kib=None if actual_gib is None else int(actual_gib * GIB),
        available_kib=int(available_gib * GIB),
        **kw,  # type: ignore[arg-type]
    )


def host(total_gib: float, available_gib: float, *, arc_gib: float = 0) -> HostSnapshot:
    return HostSnapshot(
        taken_at_s=NOW_S,
        mem_total_kib=int(total_gib * GIB),
        mem_available_kib=int(available_gib * GIB),
        arc_reclaimable_kib=int(arc_gib * GIB),
    )


# -- the terms ------------------------------------------------------------------------------


def test_three_guests_using_6_gib_each_on_a_16_gib_host_are_short_by_what_they_use_beyond_it() -> None:
    guests = [vm(f"g{i}", available_gib=2) for i in range(3)]  # 8 GiB each, 6 GiB in use
    s = estimate(host(16, 0), guests, RULES, host_own_min_kib=1 * GIB)
    assert s.need_kib == 18 * GIB
    assert s.host_own_kib == 1 * GIB  # used 16 - guests 24 is below 0: the given minimum
    assert s.short_kib == (18 + 1 - 16) * GIB
    assert s.text() == "host short by 3.0 GiB"


def test_the_host_own_use_is_what_it_uses_beyond_the_guests() -> None:
    guests = [vm("a", max_gib=4, available_gib=1), vm("b", max_gib=4, available_gib=1)]
    s = estimate(host(10, 0.5), guests, RULES)  # 9.5 used, 8 of it guests: 1.5 its own
    assert s.host_own_kib == int(1.5 * GIB)
    assert s.short_kib == 0  # 1.5 + 6 needed fits in 10
    tight = estimate(host(7, 0.5), guests, RULES)  # 6.5 used, guests 8: own use 0 at least
    assert tight.host_own_kib == 0 and tight.short_kib == 0  # 6 needed in 7


def test_the_zfs_arc_the_host_can_drop_counts_as_room() -> None:
    # a 3 GiB guest the guard must raise to its 4 GiB floor, on a full 6 GiB host
    guests = [vm("a", max_gib=8, actual_gib=3, available_gib=0, floor_kib=4 * GIB)]
    without = estimate(host(6, 0), guests, RULES)  # own use 6 - 3 = 3 GiB, 4 needed
    assert without.host_own_kib == 3 * GIB and without.short_kib == 1 * GIB
    with_arc = estimate(host(6, 0, arc_gib=1), guests, RULES)  # the host drops 1 GiB of ARC
    assert with_arc.host_own_kib == 2 * GIB and with_arc.short_kib == 0


def need_kib(guest: GuestSnapshot) -> int:
    """``needs_kib`` of one guest, free to move."""
    need, _ = needs_kib(NOW_S, GuestTable.of([guest]), RULES, np.array([False]))
    return int(need[0])


def test_a_floor_above_the_use_is_the_need() -> None:
    g = vm("a", available_gib=6, floor_kib=5 * GIB)  # uses 2 GiB, floor 5 GiB
    assert need_kib(g) == 5 * GIB
    tiny = vm("b", max_gib=1, available_gib=1)  # uses nothing: the guard's minimum
    assert need_kib(tiny) == RULES.min_guest_kib


@pytest.mark.parametrize(
    "case",
    ["no stats", "stale stats", "impossible stats", "paused", "excluded"],
)
def test_when_in_doubt_a_guest_needs_what_it_has(case: str) -> None:
    g = vm("a", max_gib=8, actual_gib=6, available_gib=4)  # would need 2 GiB
    held: tuple[str, ...] = ()
    stats = g.stats
    assert stats is not None
    if case == "no stats":
        g = dataclasses.replace(g, stats=None)
    elif case == "stale stats":
        g = dataclasses.replace(g, stats=dataclasses.replace(stats, last_update_s=NOW_S - 3600))
    elif case == "impossible stats":
        g = dataclasses.replace(g, stats=dataclasses.replace(stats, mem_total_kib=9 * GIB))
    elif case == "paused":
        g = dataclasses.replace(g, run_state=RunState.PAUSED)
    else:
        held = (g.uuid,)
    s = estimate(host(16, 10), [g], RULES, held=held)
    assert s.need_kib == 6 * GIB and s.guests_at_size == 1
    fresh = estimate(host(16, 10), [vm("a", max_gib=8, actual_gib=6, available_gib=4)], RULES)
    assert fresh.need_kib == 2 * GIB and fresh.guests_at_size == 0


def test_a_deflate_on_oom_guest_needs_its_use_not_its_balloon() -> None:
    from overcommitd.model import BalloonFeatures

    # MemTotal stays 8 GiB with DEFLATE_ON_OOM; 3 GiB ballooned are allocated, so not available
    g = vm("a", max_gib=8, actual_gib=5, available_gib=2, features=BalloonFeatures(deflate_on_oom=True))
    assert g.stats is not None and g.stats.mem_total_kib == 8 * GIB
    assert need_kib(g) == 3 * GIB


# -- invariants -------------------------------------------------------------------------------

KIB = st.integers(min_value=0, max_value=64 * GIB)


@st.composite
def guests_st(draw: st.DrawFn, *, floor_at_most_actual: bool = False) -> list[GuestSnapshot]:
    """Up to 8 guests, some without stats; with ``floor_at_most_actual`` none is below its
    floor as the guard sees it (the guard's minimum included)."""
    out = []
    for i in range(draw(st.integers(0, 8))):
        max_kib = draw(st.integers(min_value=1, max_value=64 * GIB))
        lowest = min(RULES.min_guest_kib, max_kib) if floor_at_most_actual else 0
        actual = draw(st.integers(lowest, max_kib))
        available = draw(st.integers(0, actual))
        floor = draw(st.integers(0, actual if floor_at_most_actual else max_kib))
        g = testing.guest(
            f"g{i}", at_s=NOW_S, max_kib=max_kib, actual_kib=actual, available_kib=available, floor_kib=floor
        )
        out.append(g if draw(st.booleans()) else dataclasses.replace(g, stats=None))
    return out


@st.composite
def host_st(draw: st.DrawFn) -> HostSnapshot:
    total = draw(st.integers(min_value=1, max_value=512 * GIB))
    return HostSnapshot(
        taken_at_s=NOW_S,
        mem_total_kib=total,
        mem_available_kib=draw(st.integers(0, total)),
        arc_reclaimable_kib=draw(KIB),
    )


@settings(max_examples=300, deadline=None)
@given(host_st(), guests_st(), KIB)
def test_never_negative_and_each_term_adds_up(h: HostSnapshot, guests: list[GuestSnapshot], own_min: int) -> None:
    s = estimate(h, guests, RULES, host_own_min_kib=own_min)
    assert s.short_kib >= 0 and s.host_own_kib >= own_min
    assert s.short_kib == max(s.host_own_kib + s.need_kib - h.mem_total_kib, 0)
    assert all(0 <= need_kib(g) <= g.max_kib for g in guests)


@settings(max_examples=300, deadline=None)
@given(host_st(), guests_st(), st.data())
def test_monotone_in_each_guests_need(h: HostSnapshot, guests: list[GuestSnapshot], data: st.DataObject) -> None:
    """A guest that uses more (less of it available) or has a higher floor never makes
    the host less short; nothing else changes."""
    with_stats = [i for i, g in enumerate(guests) if g.stats is not None]
    if not with_stats:
        return
    i = data.draw(st.sampled_from(with_stats))
    g = guests[i]
    assert g.stats is not None
    if data.draw(st.booleans()):
        less = data.draw(st.integers(0, g.stats.mem_available_kib or 0))
        needier = dataclasses.replace(g, stats=dataclasses.replace(g.stats, mem_available_kib=less))
    else:
        needier = dataclasses.replace(g, floor_kib=data.draw(st.integers(g.floor_kib, g.max_kib)))
    more = [*guests[:i], needier, *guests[i + 1 :]]
    assert need_kib(needier) >= need_kib(g)
    assert estimate(h, more, RULES).short_kib >= estimate(h, guests, RULES).short_kib


@settings(max_examples=300, deadline=None)
@given(guests_st(floor_at_most_actual=True), KIB, st.data())
def test_zero_when_the_host_could_back_every_guest_at_its_size(
    guests: list[GuestSnapshot], own_kib: int, data: st.DataObject
) -> None:
    """A host with RAM for its own use and every guest as it is now is never short,
    whatever the guests' stats say."""
    total = sum(g.actual_kib for g in guests) + own_kib + data.draw(KIB) + 1
    used = min(own_kib + sum(g.actual_kib for g in guests), total)
    h = HostSnapshot(taken_at_s=NOW_S, mem_total_kib=total, mem_available_kib=total - used)
    assert estimate(h, guests, RULES, host_own_min_kib=own_kib).short_kib == 0


# -- the daemon's log -------------------------------------------------------------------------


def short(kib: int) -> Shortfall:
    return Shortfall(kib, 20 * GIB, GIB, 16 * GIB, 0)


def test_the_log_says_short_on_meaningful_steps_and_recovery_only(caplog: pytest.LogCaptureFixture) -> None:
    said = ShortfallLog()
    caplog.set_level(logging.INFO, logger="overcommitd.shortfall")
    lines = [said.update(short(kib)) for kib in (0, 0, 3 * GIB, 3 * GIB + 10 * MIB, 3 * GIB - 100 * MIB, 4 * GIB, 0, 0)]
    assert lines[:2] == [None, None]
    assert lines[2] is not None and lines[2].startswith("host short by 3.0 GiB: no balloon can help")
    assert lines[3] is None and lines[4] is None  # within 10 % of 3 GiB: not news
    assert lines[5] is not None and "host short by 4.0 GiB (was 3.0 GiB)" in lines[5]
    assert lines[6] == "host has room again (was short by 4.0 GiB)" and lines[7] is None
    records = [r for r in caplog.records if r.name == "overcommitd.shortfall"]
    assert [r.__dict__["event"] for r in records] == ["host-short", "host-short", "host-short-recovered"]
    assert records[0].levelno == logging.WARNING and records[2].levelno == logging.INFO


def test_small_shortfalls_change_by_at_least_the_minimum_step() -> None:
    said = ShortfallLog()
    assert said.update(short(100 * MIB)) is not None
    assert said.update(short(100 * MIB + NEWS_MIN_KIB - 1)) is None
    assert said.update(short(100 * MIB + NEWS_MIN_KIB)) is not None


def test_the_words() -> None:
    assert short_text(0) == "host has room"
    assert short_text(int(2.25 * GIB)) == "host short by 2.2 GiB"


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(min_value=-(2**80), max_value=2**80), st.floats(), st.text(max_size=20), st.none()))
def test_a_status_document_with_any_shortfall_value_parses_or_is_refused_by_name(value: object) -> None:
    """The status socket's document is read back by ``overcommitd status``: a shortfall that is
    not a size is a validation error naming the field, a size of any magnitude renders."""
    import json

    from pydantic import ValidationError

    from overcommitd import status as status_doc

    doc = {"policy": "p", "dry_run": False, "ticks": 1, "interval_s": 10.0, "updated_at": "x", "host_short_kib": value}
    try:
        parsed = status_doc.DaemonStatus.model_validate_json(json.dumps(doc))
    except (ValidationError, ValueError) as e:
        assert "host_short_kib" in str(e)
        return
    assert parsed.host_short_kib >= 0
    head = status_doc.table(parsed).splitlines()
    assert (parsed.host_short_kib > 0) == head[1].startswith("host short by")
