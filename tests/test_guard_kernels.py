"""The replay's compiled guard kernels (``sim.evaluation.guard_kernels``) against the
daemon's numpy ones (``overcommitd.guard_kernels``): identical columns for arbitrary
tables, wishes, back-offs and rules, so a replay decides exactly as the daemon would."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.compiled
from overcommitd.config import GuardConfig
from overcommitd.guard import GuardOutcome, guard_table
from overcommitd.guard_kernels import NUMPY
from overcommitd.model import GuestSnapshot, HostSnapshot
from overcommitd.shortfall import estimate_table
from overcommitd.table import GuestTable
from sim.evaluation import guard_kernels
from tests.test_guard_columns import NOW, cases, previous_actual, rules

Case = tuple[GuestSnapshot, int | None, float, bool, str | None]


def _outcome(
    rows: list[Case], seen: list[int | None], rules: GuardConfig, kernels: guard_kernels.GuardKernels
) -> GuardOutcome:
    guests = [dataclasses.replace(g, uuid=f"u{i}") for i, (g, *_rest) in enumerate(rows)]
    table = GuestTable.of(guests, auto_deflate_tolerance_kib=rules.auto_deflate_tolerance_kib)
    return guard_table(
        NOW,
        table,
        np.array([np.nan if w is None else w for _, w, *_ in rows], dtype=np.float64),
        rules=rules,
        backoff_until_s=np.array([b for _, _, b, _, _ in rows]),
        excluded=np.array([x for *_, x, _ in rows]),
        failed=np.array([e is not None for *_, e in rows]),
        previous_actual_kib=np.array([np.nan if a is None else a for a in seen], dtype=np.float64),
        kernels=kernels,
    )


@given(rows=st.lists(cases(), min_size=1, max_size=16), rules=rules, data=st.data())
@settings(max_examples=600, deadline=None)
def test_compiled_and_numpy_guard_kernels_give_identical_columns(
    rows: list[Case], rules: GuardConfig, data: st.DataObject
) -> None:
    seen = [data.draw(previous_actual(g)) for g, *_ in rows]
    numpy_out = _outcome(rows, seen, rules, NUMPY)
    compiled_out = _outcome(rows, seen, rules, guard_kernels.COMPILED)
    for f in dataclasses.fields(GuardOutcome):
        a, b = getattr(numpy_out, f.name), getattr(compiled_out, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype, f.name
            assert np.array_equal(a, b), f.name
        else:
            assert a == b, f.name


def test_the_replay_runs_the_compiled_kernels_where_numba_is() -> None:
    expected = guard_kernels.COMPILED if sim.compiled.AVAILABLE else NUMPY
    assert guard_kernels.KERNELS is expected


_available = st.one_of(st.just(float("nan")), st.floats(-(2.0**50), 2.0**50, allow_nan=False))


@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 2**42), _available, st.integers(0, 2**42), st.booleans(), st.booleans(), st.integers(0, 3)
        ),
        min_size=1,
        max_size=32,
    )
)
@settings(max_examples=400, deadline=None)
def test_compiled_and_numpy_needs_are_identical(rows: list[tuple[int, float, int, bool, bool, int]]) -> None:
    """The shortfall's need of each guest, both ways: same values, same dtype."""
    actual, available, floor, held, running, problem = (np.array(c) for c in zip(*rows, strict=True))
    args = (
        actual.astype(np.int64),
        available.astype(np.float64),
        floor.astype(np.int64),
        held.astype(bool),
        running.astype(bool),
        problem.astype(np.int64),
    )
    for a, b in zip(NUMPY.needs(*args), guard_kernels.COMPILED.needs(*args), strict=True):
        assert a.dtype == b.dtype
        assert np.array_equal(a, b)
    totals = NUMPY.need_totals(*args)
    assert guard_kernels.COMPILED.need_totals(*args) == totals
    assert all(type(t) is int for t in totals)


@given(rows=st.lists(cases(), min_size=1, max_size=16), rules=rules, data=st.data())
@settings(max_examples=200, deadline=None)
def test_the_shortfall_reads_the_steps_verdict_as_it_would_work_it_out(
    rows: list[Case], rules: GuardConfig, data: st.DataObject
) -> None:
    """A verdict lends the shortfall its stats judgement and floors: the same Shortfall
    as without it, with either kernels."""
    seen = [data.draw(previous_actual(g)) for g, *_ in rows]
    verdict = _outcome(rows, seen, rules, NUMPY)
    table = GuestTable.of([g for g, *_ in rows], auto_deflate_tolerance_kib=rules.auto_deflate_tolerance_kib)
    host = HostSnapshot(NOW, 64 * 2**30, 16 * 2**30)
    held = np.array([x for *_, x, _ in rows])
    plain = estimate_table(host, table, rules, held=held)
    for kernels in (NUMPY, guard_kernels.COMPILED):
        assert estimate_table(host, table, rules, held=held, kernels=kernels, verdict=verdict) == plain
