"""The compiled end of a bulk interval (``sim.memory.fleet_kernel``) against its reference,
``Fleet.land_workload`` in numpy: bit for bit, on the bundled real traces and on
arbitrary guest states (issue 13 item 2)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.compiled
from overcommitd.config import DaemonConfig
from policies import registry
from sim.evaluation.replay import ReplaySpec, build_guests, load_traces, replay
from sim.memory.guest import Fleet, GuestModelParams, GuestSpec
from sim.memory.traces import BUNDLED_DIR

pytestmark = pytest.mark.skipif(not sim.compiled.AVAILABLE, reason="numba (the sim extra) is not installed")

# Every array the Fleet and its bulk driver change while an interval lands.
STATE = (
    "anon",
    "swap",
    "cache",
    "hot_cache",
    "touched",
    "balloon_resident",
    "older_touched",
    "deflated_free",
    "reported_free",
    "pcp",
    "refault_debt",
    "own_refault_debt",
    "reaping",
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "oom_kills",
    "oom_deflates",
    "refault_kib",
    "own_refault_kib",
    "unserved_kib",
    "degraded",
)
DRIVER = ("balloon_kib", "num_pages_kib", "waiting_for_config", "puff_retries", "puff_clock_s")


def differences(a: Fleet, b: Fleet) -> list[str]:
    """The arrays in which the two fleets are not bit-identical."""
    out = [n for n in STATE if not np.array_equal(getattr(a, n), getattr(b, n))]
    return out + [f"driver.{n}" for n in DRIVER if not np.array_equal(getattr(a.driver, n), getattr(b.driver, n))]


def twins(specs: list[GuestSpec], demand: np.ndarray, reads: np.ndarray) -> tuple[Fleet, Fleet]:
    """Two identical fleets, the first on the numpy reference, the second compiled."""
    ref, fast = (Fleet(specs, GuestModelParams(), demand, reads) for _ in range(2))
    ref.compiled = False
    assert fast.compiled and fast.driver.__class__.__name__ == "BalloonDriver"
    return ref, fast


def advance_sampled(fleet: Fleet, dt_s: float, demand: np.ndarray, reads: np.ndarray) -> list[np.ndarray]:
    """Advance ``fleet`` and return the stats its interval's samples read (``between``)."""
    seen: list[np.ndarray] = []
    fleet.advance(dt_s, demand, reads, between=lambda stats: seen.extend(v.copy() for _, v in stats().items()))
    return seen


def same_samples(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) == 9 and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b, strict=True))


def same_landed(ref: Fleet, fast: Fleet) -> bool:
    """The compiled ``landed`` is the reference's ``mem_available`` and ``saved_split``."""
    (available, split), want = fast.landed(), (ref.mem_available(), ref.saved_split())
    return fast._landed is not None and all(
        np.array_equal(a, b) for a, b in zip((available, *split), (want[0], *want[1]), strict=True)
    )


def test_real_traces_land_bit_identical_under_a_balloon_storm() -> None:
    """Bundled Bitbrains guests, half with DEFLATE_ON_OOM, balloons driven hard up and
    down at random: both paths hold every array bit for bit, tick after tick, through
    reclaim, swap, auto-deflates and OOM kills."""
    spec = ReplaySpec(traces=(BUNDLED_DIR / "bitbrains-rnd",), guests=24, hours=6, warmup_h=0)
    specs, workload = build_guests(spec, load_traces(spec))
    specs = [GuestSpec(s.uuid, s.name, s.ram_kib, s.swap_kib, i % 2 == 0, s.reporting) for i, s in enumerate(specs)]
    ram = np.array([s.ram_kib for s in specs], dtype=np.float64)
    times = np.arange(1, 721, dtype=np.float64) * 30.0
    demand, reads = workload.block(times)
    ref, fast = twins(specs, demand[0], reads[0])
    rng = np.random.default_rng(7)
    seen = {"kills": 0.0, "deflates": 0.0, "swap": 0.0}
    for k in range(len(times)):
        if k % 3 == 0:  # new targets: from empty to 95 % of RAM ballooned
            pages = np.floor(ram * rng.uniform(0.0, 0.95, len(ram)) / 4) * 4
            for fleet in (ref, fast):
                fleet.driver.config_changed(np.arange(len(ram)), pages)
        samples = [advance_sampled(fleet, 30.0, demand[k] * 1.3, reads[k]) for fleet in (ref, fast)]
        assert differences(ref, fast) == [], f"tick {k}"
        assert same_samples(*samples), f"tick {k}: the stats samples differ"
        assert same_landed(ref, fast), f"tick {k}: what the scorecard reads differs"
    seen = {"kills": ref.oom_kills.sum(), "deflates": ref.oom_deflates.sum(), "swap": ref.swap_out.sum()}
    assert all(v > 0 for v in seen.values()), seen  # the storm reached every rule


def _replay(spec: ReplaySpec, policy: str, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(sim.compiled, "AVAILABLE", compiled)
    return replay(spec, registry.create(policy), DaemonConfig(interval_s=spec.interval_s))


@pytest.mark.parametrize("policy", ["trim", "pid"])
def test_replay_scorecard_and_timeline_identical(policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole replay at 4x overcommit (balloons, auto-deflates, swap) gives the same
    scorecard and timeline on either path."""
    spec = ReplaySpec(traces=(BUNDLED_DIR / "bitbrains-rnd",), guests=16, hours=3, warmup_h=1, overcommit=4.0)
    ref = _replay(spec, policy, False, monkeypatch)
    fast = _replay(spec, policy, True, monkeypatch)
    assert ref.scorecard.balloon_ops > 0
    assert fast.scorecard == ref.scorecard
    for name in ("t_s", "host_used_kib", "demand_kib", "target_kib", "actual_kib", "available_kib", "swap_in_kib"):
        assert np.array_equal(np.asarray(getattr(fast.timeline, name)), np.asarray(getattr(ref.timeline, name)))


kib = st.floats(min_value=0.0, max_value=64.0 * 2**20, allow_nan=False)
odd = st.one_of(kib, st.sampled_from([0.0, 1e-9, 0.5, 1.0, 1024.0]), st.floats(-1e6, 0.0))


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 6),
    data=st.data(),
    dt_s=st.sampled_from([0.5, 5.0, 10.0, 3600.0]),
)
def test_arbitrary_states_land_bit_identical(n: int, data: st.DataObject, dt_s: float) -> None:
    """Any state the arrays can hold - over-full guests, negative float dust, empty
    balloons, killed workloads not reaped yet, free page reporting on or off - moves and
    lands the same on both paths."""
    ram = np.array(data.draw(st.lists(st.integers(256 * 1024, 64 * 2**20), min_size=n, max_size=n)), dtype=float)
    specs = [
        GuestSpec(
            str(i),
            f"g{i}",
            int(r),
            deflate_on_oom=data.draw(st.booleans()),
            reporting=data.draw(st.booleans()),
            swap_kib=data.draw(st.integers(0, 2**21)),
        )
        for i, r in enumerate(ram)
    ]

    def arr(strategy: st.SearchStrategy[float] = odd) -> np.ndarray:
        return np.array(data.draw(st.lists(strategy, min_size=n, max_size=n)), dtype=float)

    ref, fast = twins(specs, arr(kib), arr(kib))
    for name in ("anon", "swap", "cache", "hot_cache", "touched", "balloon_resident", "older_touched"):
        value = arr()
        setattr(ref, name, value.copy())
        setattr(fast, name, value.copy())
    for name in ("deflated_free", "reported_free", "pcp", "refault_debt", "own_refault_debt"):
        value = arr()
        setattr(ref, name, value.copy())
        setattr(fast, name, value.copy())
    reaping = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    balloon, pages = arr(kib), arr(kib)
    for fleet in (ref, fast):
        fleet.reaping = reaping.copy()
        fleet.driver.balloon_kib[:] = balloon
        fleet.driver.num_pages_kib[:] = pages
    # Read before any advance: the compiled reads a protocol-model Fleet uses between them.
    assert np.array_equal(fast.reportable_blocks(), ref.reportable_blocks(), equal_nan=True)
    (fast_available, fast_split), (ref_available, ref_split) = fast.landed(), ref.landed()
    assert all(
        np.array_equal(a, b, equal_nan=True) for a, b in zip((fast_available, *fast_split), (ref_available, *ref_split))
    )
    demand, reads = arr(kib), arr(st.floats(0.0, 1e7))
    samples = [advance_sampled(fleet, dt_s, demand, reads) for fleet in (ref, fast)]
    assert differences(ref, fast) == []
    assert same_samples(*samples)
    assert same_landed(ref, fast)


@pytest.mark.parametrize("trace_dir", sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir()))
def test_workload_block_identical(trace_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled trace lookup of ``Workload.block`` finds the sample numpy's
    ``searchsorted`` finds, for every bundled trace set, reused traces (offsets) and
    times that wrap around the traces' ends and go back (the replay's sample instants)."""
    spec = ReplaySpec(traces=(BUNDLED_DIR / trace_dir,), guests=60, hours=6, start_h=5000.0)
    _, workload = build_guests(spec, load_traces(spec))
    longest = max(t.duration_s for t in workload.traces)
    ends = np.arange(1, 3001, dtype=np.float64) * 10.0 * (longest / 20000.0)
    times = np.concatenate([ends, ends - 4.9, np.zeros(3), [1e12, 0.5]])
    monkeypatch.setattr(sim.compiled, "AVAILABLE", False)
    ref = workload.block(times)
    monkeypatch.setattr(sim.compiled, "AVAILABLE", True)
    fast = workload.block(times)
    assert np.array_equal(ref[0], fast[0]) and np.array_equal(ref[1], fast[1])
    assert len(np.unique(ref[0])) > 100  # the lookup had samples to tell apart


@pytest.mark.parametrize("trace_dir", sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir()))
def test_workload_peaks_identical(trace_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled ``Workload.peaks`` finds numpy's peaks, for every bundled trace set,
    with windows finer and coarser than the samples and across the traces' wrap."""
    spec = ReplaySpec(traces=(BUNDLED_DIR / trace_dir,), guests=60, hours=6, start_h=5000.0)
    _, workload = build_guests(spec, load_traces(spec))
    longest = max(t.duration_s for t in workload.traces)
    at = np.sort(np.concatenate([np.arange(1, 3001) * 10.0, np.arange(1, 300) * (longest / 100.0)]))
    monkeypatch.setattr(sim.compiled, "AVAILABLE", False)
    ref = workload.peaks(3.0, at)
    monkeypatch.setattr(sim.compiled, "AVAILABLE", True)
    fast = workload.peaks(3.0, at)
    assert np.array_equal(ref, fast)
    assert (ref > workload.block(at)[0]).any()  # some window held a peak above its end's demand


@pytest.mark.parametrize("trace_dir", sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir()))
def test_workload_landings_identical(trace_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Workload.landings``' one compiled pass gives numpy's peaks and I/O rates, across
    the traces' wrap and before a trace's first sample (its I/O is then the last one's)."""
    spec = ReplaySpec(traces=(BUNDLED_DIR / trace_dir,), guests=60, hours=6, start_h=5000.0)
    _, workload = build_guests(spec, load_traces(spec))
    longest = max(t.duration_s for t in workload.traces)
    at = np.sort(np.concatenate([np.arange(1, 3001) * 10.0, np.arange(1, 300) * (longest / 100.0)]))
    monkeypatch.setattr(sim.compiled, "AVAILABLE", False)
    ref = workload.landings(-3.0, at)
    monkeypatch.setattr(sim.compiled, "AVAILABLE", True)
    fast = workload.landings(-3.0, at)
    assert np.array_equal(ref[0], fast[0]) and np.array_equal(ref[1], fast[1])
    assert len(np.unique(ref[1])) > 100 or workload.io_columns == "none"  # the I/O lookups told samples apart
