"""The replay's compiled policy arithmetic (``policies.headroom``'s row loops, compiled by
``sim.compiled.jit``) against the policies' numpy (``policies.headroom``'s ``numpy_needs``, ``numpy_take``): identical
columns on arbitrary inputs, and identical decisions on arbitrary tables, so a replay
decides exactly as the daemon would."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd.model import GuestSnapshot, HostSnapshot
from overcommitd.table import GuestTable
from policies import registry
from policies.api import CompiledTwin
from policies.headroom import NUMPY, HeadroomParams, HeadroomPolicy
from sim import compiled
from tests.test_guard_columns import GIB, snapshots

_kib = st.integers(0, 2**42)
_available = st.one_of(st.just(float("nan")), st.floats(-(2.0**44), 2.0**44, allow_nan=False))
_need = st.one_of(st.just(float("nan")), st.floats(0, 2.0**43, allow_nan=False))
_weight = st.floats(0, 1e6, allow_nan=False)
# The twin the replay runs: the row loops compiled (plain Python loops without numba).
HEADROOM = HeadroomPolicy().compiled(compiled.jit).kernels


def _same(a: np.ndarray, b: np.ndarray) -> None:  # type: ignore[type-arg]
    assert a.dtype == b.dtype
    assert np.array_equal(a, b, equal_nan=True)


@given(
    rows=st.lists(st.tuples(_kib, _available, st.booleans(), _kib), min_size=1, max_size=32),
    buffer_pct=st.floats(0, 1000, allow_nan=False),
    min_free_kib=st.integers(0, 2**32),
)
@settings(max_examples=400, deadline=None)
def test_compiled_and_numpy_needs_are_identical(
    rows: list[tuple[int, float, bool, int]], buffer_pct: float, min_free_kib: int
) -> None:
    actual, available, present, max_kib = (np.array(c) for c in zip(*rows, strict=True))
    args = (actual.astype(np.int64), available.astype(np.float64), present.astype(bool), max_kib.astype(np.int64))
    _same(NUMPY.needs(*args, buffer_pct, min_free_kib), HEADROOM.needs(*args, buffer_pct, min_free_kib))


@given(
    rows=st.lists(st.tuples(_kib, _need, _weight, _need), min_size=1, max_size=32),
    amount_kib=st.integers(1, 2**44),
)
@settings(max_examples=400, deadline=None)
def test_compiled_and_numpy_take_are_identical(rows: list[tuple[int, float, float, float]], amount_kib: int) -> None:
    actual, need, weight, targets = (np.array(c) for c in zip(*rows, strict=True))
    args = (actual.astype(np.int64), need.astype(np.float64), weight.astype(np.float64), targets.astype(np.float64))
    _same(NUMPY.take(amount_kib, *args), HEADROOM.take(amount_kib, *args))


@given(
    guests=st.lists(snapshots(), min_size=1, max_size=12),
    used_pct=st.floats(1, 100),
    host_used_kib=st.integers(0, 512 * GIB),
)
@settings(max_examples=300, deadline=None)
def test_headroom_decides_the_same_with_either_kernels(
    guests: list[GuestSnapshot], used_pct: float, host_used_kib: int
) -> None:
    """Whole decisions, both ways, on tables with stale, missing and impossible stats."""
    table = GuestTable.of([dataclasses.replace(g, uuid=f"u{i}") for i, g in enumerate(guests)])
    host = HostSnapshot(0.0, 512 * GIB, 512 * GIB - host_used_kib)
    policy = HeadroomPolicy(HeadroomParams(host_target_used_pct=used_pct))
    a = policy.decide_batch(host, table, None)
    b = policy.with_kernels(HEADROOM).decide_batch(host, table, None)
    _same(a.targets_kib, b.targets_kib)


def test_the_replay_compiles_headroom_where_numba_is_and_leaves_other_policies() -> None:
    headroom = compiled.compiled_policy(registry.create("headroom"))
    assert isinstance(headroom, HeadroomPolicy)
    assert headroom.kernels.name == ("compiled" if compiled.AVAILABLE else "numpy")
    pid = registry.create("pid")
    assert not isinstance(pid, CompiledTwin)
    assert compiled.compiled_policy(pid) is pid
