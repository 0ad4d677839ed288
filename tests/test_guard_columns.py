"""The guard over columns against the per-guest guard it replaced (``guard_reference``),
and a whole table against each of its rows alone: the same Decisions, clamps and
back-offs for arbitrary snapshots (stale, missing and implausible stats, back-offs,
floors above the maximum, excluded, failed and paused guests)."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd.config import GuardConfig
from overcommitd.guard import GuardMemory, decisions, guard, guard_table
from overcommitd.model import BalloonFeatures, GuestSnapshot, GuestStats, RunState
from overcommitd.table import GuestTable
from tests import guard_reference

GIB, MIB = 1024 * 1024, 1024
NOW = 10_000.0
RULES = GuardConfig()
stat = st.none() | st.integers(min_value=0, max_value=80 * GIB) | st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def snapshots(draw: st.DrawFn, uuid: str = "u") -> GuestSnapshot:
    max_kib = draw(st.integers(min_value=64 * MIB, max_value=64 * GIB))
    actual = draw(st.integers(min_value=0, max_value=max_kib))
    stats = draw(
        st.none()
        | st.builds(
            GuestStats,
            last_update_s=st.floats(min_value=-1e6, max_value=NOW + 100, allow_nan=False),
            mem_available_kib=stat | st.integers(min_value=-(2**40), max_value=-1),
            mem_free_kib=stat,
            mem_total_kib=stat,
            disk_caches_kib=stat,
            swap_in_kib=stat,
        )
    )
    last = draw(st.none() | st.integers(min_value=1, max_value=max_kib))
    near = draw(st.none() | st.integers(min_value=-8 * MIB, max_value=8 * MIB))  # at the tolerance's edge
    if last is not None and near is not None:
        last = min(max(actual + near, 1), max_kib)
    return GuestSnapshot(
        uuid=uuid,
        name=f"g-{uuid}",
        max_kib=max_kib,
        actual_kib=actual,
        current_kib=actual,
        last_target_kib=last,
        last_target_age_s=draw(st.none() | st.floats(min_value=0, max_value=1e6) | st.sampled_from([4.9, 5.0, 5.1])),
        features=BalloonFeatures.from_bits(draw(st.integers(min_value=0, max_value=63))),
        stats=stats,
        stats_period_s=draw(st.sampled_from([0.0, 1.0, 5.0, 60.0])),
        floor_kib=draw(st.integers(min_value=0, max_value=2 * max_kib)),
        run_state=draw(st.sampled_from(list(RunState))),
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[GuestSnapshot, int | None, float, bool, str | None]:
    g = draw(snapshots())
    wish = draw(
        st.none()
        | st.integers(min_value=-(2**40), max_value=2**40)
        | st.integers(min_value=g.actual_kib - 2 * GIB, max_value=g.actual_kib + 2 * GIB)
    )
    backoff = draw(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False) | st.sampled_from([NOW, NOW + 1, -np.inf]))
    return g, wish, backoff, draw(st.booleans()), draw(st.none() | st.just("boom"))


rules = st.builds(
    GuardConfig,
    max_inflate_step_kib=st.integers(min_value=1, max_value=GIB),
    max_deflate_step_kib=st.just(2 * GIB),
    dead_band_kib=st.integers(min_value=0, max_value=64 * MIB),
    auto_deflate_tolerance_kib=st.integers(min_value=0, max_value=4 * MIB),
    settle_s=st.sampled_from([0.0, 5.0, 60.0]),
    auto_deflate_cooldown_s=st.sampled_from([0.0, 600.0]),
)


def previous_actual(g: GuestSnapshot) -> st.SearchStrategy[int | None]:
    """The ``actual`` the guard saw at its last step: none, or near this one (risen,
    fallen or the same: a DEFLATE_ON_OOM balloon that rose is deflating itself)."""
    return st.none() | st.integers(min_value=max(g.actual_kib - 64 * MIB, 0), max_value=g.actual_kib + 64 * MIB)


@given(case=cases(), rules=rules, data=st.data())
@settings(max_examples=1500, deadline=None)
def test_the_guard_over_columns_decides_as_the_per_guest_guard_did(
    case: tuple[GuestSnapshot, int | None, float, bool, str | None], rules: GuardConfig, data: st.DataObject
) -> None:
    g, wish, backoff, excluded, error = case
    memory = GuardMemory(backoff, data.draw(previous_actual(g)))
    expected = guard_reference.guard(NOW, g, wish, rules=rules, memory=memory, excluded=excluded, error=error)
    assert guard(NOW, g, wish, rules=rules, memory=memory, excluded=excluded, error=error) == expected


@given(rows=st.lists(cases(), min_size=1, max_size=12), data=st.data())
@settings(max_examples=300, deadline=None)
def test_a_table_decides_each_row_as_that_guest_alone(
    rows: list[tuple[GuestSnapshot, int | None, float, bool, str | None]], data: st.DataObject
) -> None:
    guests = [dataclasses.replace(g, uuid=f"u{i}") for i, (g, *_rest) in enumerate(rows)]
    seen = [data.draw(previous_actual(g)) for g in guests]
    table = GuestTable.of(guests)
    wishes = np.array([np.nan if w is None else w for _, w, *_ in rows], dtype=np.float64)
    out = guard_table(
        NOW,
        table,
        wishes,
        rules=RULES,
        backoff_until_s=np.array([b for _, _, b, _, _ in rows]),
        excluded=np.array([x for *_, x, _ in rows]),
        failed=np.array([e is not None for *_, e in rows]),
        previous_actual_kib=np.array([np.nan if a is None else a for a in seen], dtype=np.float64),
    )
    errors = {i: e for i, (*_, e) in enumerate(rows) if e is not None}
    together = decisions(table, out, errors)
    for i, (g, wish, backoff, excluded, error) in enumerate(rows):
        memory_before = GuardMemory(backoff, seen[i])
        alone, memory = guard(NOW, guests[i], wish, rules=RULES, memory=memory_before, excluded=excluded, error=error)
        assert together[i] == alone
        assert out.backoff_until_s[i] == memory.backoff_until_s
        assert out.actual_kib[i] == memory.actual_kib == guests[i].actual_kib
        assert (int(out.target_kib[i]) if out.has_target[i] else None) == alone.target_kib


def test_a_table_built_by_the_simulator_gives_back_the_snapshots_it_describes() -> None:
    """``GuestTable.snapshot`` of an array-built table is the snapshot the fields say."""
    g = GuestSnapshot(
        "u",
        "g",
        4 * GIB,
        3 * GIB,
        3 * GIB,
        2 * GIB,
        1.5,
        BalloonFeatures(deflate_on_oom=True),
        GuestStats(9.0, mem_free_kib=5, mem_total_kib=7),
        5.0,
        256 * MIB,
        2.0,
        RunState.PAUSED,
        True,
    )
    table = GuestTable.of([g]).replace()  # drops the source: rebuilt from the columns
    assert table.source is None
    assert table.snapshot(0) == g
    assert table.snapshots() == (g,)
