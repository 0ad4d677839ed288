"""The compiled trace lookups (``fleet_kernel.trace_block``/``trace_landings``, behind
``Workload.block``/``peaks``/``landings``) against ``Workload``'s numpy reference, bit for
bit, on arbitrary small traces: times before a trace's first sample, past its end (it
wraps), going back, NaN, and several guests sharing one trace at different offsets.
``tests/test_fleet_kernel.py`` holds them to the same on the bundled real traces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.compiled
from sim.memory.traces import Trace
from sim.memory.workload import TraceColumns, Workload

pytestmark = pytest.mark.skipif(not sim.compiled.AVAILABLE, reason="numba (the sim extra) is not installed")


@st.composite
def traces(draw: st.DrawFn) -> Trace:
    steps_s = draw(st.lists(st.sampled_from([1.0, 2.5, 300.0, 0.125]), min_size=0, max_size=12))
    t_s = np.concatenate([[0.0], np.cumsum(steps_s)])
    demand = draw(st.lists(st.integers(0, 2**30), min_size=len(t_s), max_size=len(t_s)))
    io = draw(st.one_of(st.none(), st.lists(st.floats(0, 1e6), min_size=len(t_s), max_size=len(t_s))))
    return Trace(
        name="synthetic",
        source="test",
        size_kib=2**30,
        t_s=t_s,
        demand_kib=np.array(demand, dtype=np.int64),
        disk_read_kib_s=None if io is None else np.array(io),
        disk_write_kib_s=None,
    )


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    distinct = draw(st.lists(traces(), min_size=1, max_size=3))
    chosen = tuple(draw(st.lists(st.sampled_from(distinct), min_size=1, max_size=5)))
    shares = st.sampled_from([0.0, 0.5]) | st.floats(0.0, 0.999)  # 0: the guest's time is the trace's
    offsets = np.array([draw(shares) * t.duration_s for t in chosen])
    cap = np.array([draw(st.sampled_from([2.0**29, 2.0**31])) for _ in chosen])
    return Workload(chosen, offsets, cap, TraceColumns.of(chosen))


# On a sample, a trace's end (its duration) and past it as well as between.
times = st.floats(-1000.0, 5000.0) | st.sampled_from([0.0, 1.0, 2.5, 300.0, 600.0, 602.5, 1e9])


def both(call: object, *args: object) -> tuple[object, object]:
    """``call(*args)`` on numpy's path and on the compiled one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sim.compiled, "AVAILABLE", False)
        ref = call(*args)  # type: ignore[operator]
    return ref, call(*args)  # type: ignore[operator]


@given(workload=workloads(), at_s=st.lists(times | st.just(float("nan")), min_size=1, max_size=30))
@settings(max_examples=300, deadline=None)
def test_block_lookups_match_numpy(workload: Workload, at_s: list[float]) -> None:
    """Any times, in any order, NaN included."""
    ref, fast = both(workload.block, np.array(at_s))
    assert all(np.array_equal(a, b) for a, b in zip(ref, fast, strict=True))  # type: ignore[call-overload]


@given(workload=workloads(), since_s=times, at_s=st.lists(times, min_size=1, max_size=30))
@settings(max_examples=300, deadline=None)
def test_peak_and_landing_lookups_match_numpy(workload: Workload, since_s: float, at_s: list[float]) -> None:
    """Increasing times after ``since_s``, as the replay lands them."""
    at = np.sort(np.array(at_s))
    ref, fast = both(workload.peaks, since_s, at)
    assert np.array_equal(ref, fast)  # type: ignore[arg-type]
    ref, fast = both(workload.landings, since_s, at)
    assert all(np.array_equal(a, b) for a, b in zip(ref, fast, strict=True))  # type: ignore[call-overload]
