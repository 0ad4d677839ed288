"""The compiled scorecard recording (``sim.evaluation.score_kernel``) against its
reference, ``Recorder``'s numpy methods: numpy's own pairwise sum, every running total,
the per-guest state and the recoveries bit for bit on arbitrary ticks, and the same
scorecards and timelines on replays."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.compiled
from overcommitd.config import DaemonConfig
from policies import registry
from sim.evaluation import score_kernel
from sim.evaluation.metrics import GuestTick, Recorder, RunCounters, RunFacts
from sim.evaluation.replay import ReplayResult, ReplaySpec, load_traces, replay
from sim.memory import traces
from tests.test_honest_scorecard import GIB, SPIKE_S, FixedTarget, spec_for, write_trace

pytestmark = pytest.mark.skipif(not sim.compiled.AVAILABLE, reason="numba (the sim extra) is not installed")

GIB_KIB = float(GIB)

finite = st.floats(-1e12, 1e12, allow_nan=False)
any_double = st.one_of(
    finite,
    st.sampled_from([0.0, -0.0, 1e-300, -1e-300, 0.1, 1e16, -1e16, math.inf, -math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True),
)
# KiB figures as the fleet holds them, with the float dust and odd values it can reach.
kib = st.one_of(st.floats(0.0, 64 * GIB_KIB, allow_nan=False), st.sampled_from([0.0, -0.0, 1e-9, -1e-9, math.nan]))
MANY_GUESTS = 12  # above this, arrays come from a drawn seed (``draw_array``)


def bits(x: float) -> int:
    return int(np.array(x, dtype=np.float64).view(np.int64))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, in numpy
@settings(max_examples=400, deadline=None)
@given(st.lists(any_double, max_size=300))
def test_the_pairwise_sum_is_numpys_bit_for_bit(values: list[float]) -> None:
    a = np.array(values, dtype=np.float64)
    assert bits(score_kernel.pairwise_sum(a)) == bits(float(a.sum()))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(129, 20_000), seed=st.integers(0, 2**32 - 1), spread=st.integers(0, 30))
def test_the_pairwise_sum_of_long_arrays_splits_as_numpy_does(n: int, seed: int, spread: int) -> None:
    """Above 128 elements numpy halves the array (at multiples of 8) and recurses."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n) * 10.0 ** rng.uniform(-spread, spread, n)
    assert bits(score_kernel.pairwise_sum(a)) == bits(float(a.sum()))


def draw_array(
    data: st.DataObject, n: int, elements: st.SearchStrategy[Any] = kib, dtype: type = np.float64
) -> np.ndarray:
    """``n`` values of ``elements``: drawn one by one for a few guests; for more (the
    kernel's pairwise sum splits past 128) picked by a drawn seed from a small drawn
    pool, the KiB figures mixed with uniform ones, so that an example stays within
    hypothesis's entropy budget (drawn one by one, 11 arrays of 140 for 6 ticks failed
    its health check now and then)."""
    if n <= MANY_GUESTS:
        return np.array(data.draw(st.lists(elements, min_size=n, max_size=n)), dtype=dtype)
    pool = np.array(data.draw(st.lists(elements, min_size=1, max_size=8)), dtype=dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    out = rng.choice(pool, n)
    if elements is kib:  # values no pool holds, so the sums round at every step
        mixed = rng.random(n) < data.draw(st.floats(0.0, 1.0))
        out[mixed] = rng.uniform(0.0, 64 * GIB_KIB, int(mixed.sum()))
    return out


def tick_arrays(data: st.DataObject, n: int, ram: np.ndarray) -> GuestTick:
    """One tick's arrays, drawn; demand rises now and then by a jump or more."""
    jump = ram * data.draw(st.sampled_from([0.0, 0.05, 0.1, 0.5]))
    return GuestTick(
        touched_kib=draw_array(data, n),
        actual_kib=draw_array(data, n),
        target_kib=draw_array(data, n),
        demand_kib=draw_array(data, n) + jump,
        available_kib=ram * draw_array(data, n, st.sampled_from([0.0, 0.049, 0.05, 0.2, 1.0])),
        swap_in_kib=draw_array(data, n, st.sampled_from([0.0, 1.0, 2.0, 1e6])),
        unserved_kib=draw_array(data, n),
        degraded=draw_array(data, n, st.booleans(), bool),
        ballooned_kib=draw_array(data, n),
        unbacked_kib=draw_array(data, n),
        reported_kib=draw_array(data, n),
    )


def recorder_state(rec: Recorder) -> tuple[object, ...]:
    """Everything a Recorder carries, as bits (NaN payloads included)."""
    rows = np.delete(rec._state, score_kernel.RECOVERED_S, axis=0)  # that row is the kernel's scratch
    return (
        rec._acc.view(np.int64).tolist(),
        rows.view(np.int64).tolist(),
        [bits(r) for r in rec.recoveries_s],
        rec.jumps,
        rec.ticks,
        rec.host_used_pct[: rec.ticks].view(np.int64).tolist(),
        rec.over_100_s,
        rec.over_100_kib_s,
    )


@settings(max_examples=200, deadline=None)
@given(
    n=st.one_of(st.integers(1, 12), st.integers(120, 140)),
    n_ticks=st.integers(1, 6),
    dt_s=st.sampled_from([10.0, 0.3, 1.0 / 3]),
    data=st.data(),
)
def test_arbitrary_ticks_record_bit_identical(n: int, n_ticks: int, dt_s: float, data: st.DataObject) -> None:
    ram = draw_array(data, n, st.integers(1, 64 << 20))
    floor = draw_array(data, n)
    ref, fast = Recorder(ram, floor, n_ticks, compiled=False), Recorder(ram, floor, n_ticks, compiled=True)
    for k in range(n_ticks):
        tick = tick_arrays(data, n, ram)
        used_kib, total_kib = data.draw(finite), data.draw(st.floats(1.0, 1e12))
        for rec in (ref, fast):
            rec.record((k + 1) * dt_s, dt_s, host_used_kib=used_kib, host_total_kib=total_kib, g=tick)
    assert recorder_state(fast) == recorder_state(ref)
    facts = RunFacts(RunCounters.zero(), np.ones(n), 0, 0.2)
    cards = [r.scorecard("p", duration_s=n_ticks * dt_s, host_total_kib=1.0, facts=facts) for r in (ref, fast)]
    assert repr(cards[1]) == repr(cards[0])


def test_a_tick_the_kernel_cannot_sum_as_numpy_does_takes_the_numpy_path() -> None:
    """float32 or integer arrays: numpy sums them in their own type, so the recorder keeps
    to its reference for that tick."""
    n = 9
    ram = np.full(n, 4 * GIB_KIB)
    ones = np.ones(n, dtype=np.float32)
    tick = GuestTick(ones, ram, ram, ram, ram, ram, ram, np.zeros(n, bool), ram, ram, ram)
    ref, fast = Recorder(ram, np.zeros(n), 1, compiled=False), Recorder(ram, np.zeros(n), 1, compiled=True)
    for rec in (ref, fast):
        rec.record(10.0, 10.0, host_used_kib=1.0, host_total_kib=2.0, g=tick)
    assert recorder_state(fast) == recorder_state(ref)


def same_result(a: ReplayResult, b: ReplayResult) -> None:
    assert repr(a.scorecard) == repr(b.scorecard)
    for name in ("t_s", "host_used_kib", "demand_kib", "target_kib", "actual_kib", "available_kib", "swap_in_kib"):
        assert np.array_equal(getattr(a.timeline, name), getattr(b.timeline, name), equal_nan=True), name


@pytest.fixture(scope="module")
def bitbrains() -> list[traces.Trace]:
    return load_traces(ReplaySpec(traces=(traces.BUNDLED_DIR / "bitbrains-rnd",)))


@pytest.mark.parametrize(
    ("policy", "update"),
    [
        ("headroom", {}),
        ("mom", {"floor_pct": 60.0}),  # unguarded upstream baseline: below-floor seconds
        ("proxmox", {"guard_baselines": True}),
        ("pid", {"overcommit": 4.0}),  # host above 100 %, degraded guests
    ],
)
def test_a_replay_scores_the_same_on_both_paths(
    bitbrains: list[traces.Trace], monkeypatch: pytest.MonkeyPatch, policy: str, update: dict[str, object]
) -> None:
    spec = ReplaySpec(
        traces=(traces.BUNDLED_DIR / "bitbrains-rnd",), guests=8, hours=3.0, warmup_h=0.5, overcommit=3.0
    ).model_copy(update=update)
    cfg = DaemonConfig(interval_s=spec.interval_s)
    fast = replay(spec, registry.create(policy), cfg, loaded=bitbrains)
    monkeypatch.setattr(sim.compiled, "AVAILABLE", False)
    ref = replay(spec, registry.create(policy), cfg, loaded=bitbrains)
    same_result(fast, ref)


def test_a_squeezed_spike_scores_the_same_on_both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 GiB guest held at 1.5 GiB through a 3 GiB spike, below its 2 GiB floor, by an
    unguarded baseline, then given its RAM: a demand jump, kills, unserved demand,
    degraded and below-floor seconds and a recovery, on both paths alike."""
    loaded = [traces.load(write_trace(tmp_path / "1.csv"))]
    cfg = DaemonConfig.model_validate({"guests": {"g000-1": {"floor_kib": 2 * GIB}}})
    policy = FixedTarget("mom", int(1.5 * GIB), (SPIKE_S[1] - 1800.0, 1e9))
    spec = spec_for(loaded, hours=3.0)
    fast = replay(spec, policy, cfg, loaded=loaded)
    monkeypatch.setattr(sim.compiled, "AVAILABLE", False)
    same_result(fast, replay(spec, policy, cfg, loaded=loaded))
    card = fast.scorecard
    assert card.demand_jumps and card.recovery_p50_s > 0 and card.below_floor_guest_s > 0 and card.degraded_guest_s > 0


def test_a_tick_with_the_wrong_number_of_guests_is_refused_on_both_paths() -> None:
    ram = np.full(3, 4 * GIB_KIB)
    a, short = np.ones(3), np.ones(2)
    tick = GuestTick(a, a, a, short, a, a, a, np.zeros(3, bool), a, a, a)
    for compiled in (False, True):
        with pytest.raises(ValueError):
            Recorder(ram, np.zeros(3), 1, compiled=compiled).record(
                10.0, 10.0, host_used_kib=1.0, host_total_kib=2.0, g=tick
            )
