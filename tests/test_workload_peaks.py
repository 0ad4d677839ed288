"""Issue 16: the replay lands each guest's demand at a few instants a tick, and at each
the peak its trace reached since the one before (``Workload.peaks``), so a spike finer
than the landings still reaches the simulated guest: on the real-guest fidelity run a
500 MiB spike of 2.4 s OOM-killed the real guest and never reached the simulated one."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from overcommitd.config import DaemonConfig
from overcommitd.model import GuestSnapshot, HostSnapshot
from policies.api import PolicyResult
from sim.evaluation.replay import ReplaySpec, replay
from sim.memory.guest import GuestModelParams
from sim.memory.traces import Trace
from sim.memory.workload import Workload

MIB = 1024
GUEST_KIB = 1024 * MIB


def trace_of(demand_mib: list[int], period_s: float = 1.0) -> Trace:
    t = np.arange(len(demand_mib), dtype=np.float64) * period_s
    d = np.array(demand_mib, dtype=np.int64) * MIB
    return Trace("t", "test", GUEST_KIB, t, d, None, None)


def workload(trace: Trace) -> Workload:
    return Workload.assign([trace], 1, GuestModelParams())


def brute_peak(trace: Trace, since_s: float, until_s: float) -> float:
    """The oracle: the largest sample within (since, until], else the one in force at until."""
    t, d = trace.t_s, trace.demand_kib
    within = d[(t > since_s) & (t <= until_s)]
    if len(within):
        return float(within.max())
    return float(d[np.searchsorted(t, until_s, side="right") - 1])


def test_a_spike_between_two_landings_is_landed_at_the_next() -> None:
    trace = trace_of([60, 60, 60, 500, 0, 0, 0, 0, 0, 0])
    peaks = workload(trace).peaks(0.0, np.array([2.5, 5.0, 7.5]))[:, 0] / MIB
    assert peaks.tolist() == [60, 500, 0]


def test_a_fall_lands_where_it_happened_not_an_instant_later() -> None:
    """The demand in force at a window's start was landed there: a fall inside the next
    window lands at its end, not a window late."""
    trace = trace_of([500, 500, 100, 100, 100, 100])
    peaks = workload(trace).peaks(0.0, np.array([1.5, 3.0, 4.5]))[:, 0] / MIB
    assert peaks.tolist() == [500, 100, 100]


@given(
    demand=st.lists(st.integers(min_value=0, max_value=900), min_size=2, max_size=40),
    cuts=st.lists(st.floats(min_value=0.01, max_value=3.0), min_size=1, max_size=30),
)
def test_peaks_are_the_largest_sample_of_each_window(demand: list[int], cuts: list[float]) -> None:
    """Against the oracle, within the trace's span (no wrap), capped as the workload caps
    demand; and never below the demand in force at the window's end (``block``)."""
    trace = trace_of(demand)
    w = workload(trace)
    at = np.cumsum(cuts)
    at = at[at < trace.duration_s]
    if len(at) == 0:
        return
    peaks = w.peaks(0.0, at)[:, 0]
    edges = np.concatenate([[0.0], at])
    oracle = [min(brute_peak(trace, a, b), float(w.demand_cap_kib[0])) for a, b in pairwise(edges)]
    assert peaks.tolist() == oracle
    assert (peaks >= w.block(at)[0][:, 0]).all()


def test_a_trace_no_finer_than_the_landings_lands_as_it_is_in_force() -> None:
    """5-minute samples, landings every 10 s: every landing is the sample in force there
    (replays of the bundled traces are unchanged)."""
    rng = np.random.default_rng(7)
    trace = trace_of(rng.integers(0, 900, size=50).tolist(), period_s=300.0)
    w = workload(trace)
    at = np.arange(1, 1400) * 10.0
    assert np.array_equal(w.peaks(0.0, at), w.block(at)[0])


class Squeeze:
    """Asks every guest down to 400 MiB, always."""

    name = "squeeze"

    def initial_state(self) -> None:
        return None

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        return PolicyResult({g.uuid: 400 * MIB for g in guests}, None)


def test_a_spike_shorter_than_the_stats_period_reaches_the_simulated_guest(tmp_path: Path) -> None:
    """A 1 s trace: 60 MiB, at 23 s a 1 s spike to 500 MiB, past what the guest
    ballooned to 400 MiB holds, 0 after (the real workload was killed). Landed only
    at the tick's last stats sample (~24 s) and its end (25 s), the spike was skipped;
    landed as a peak, the guest runs out and the OOM killer strikes once."""
    path = tmp_path / "spike.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time_s", "guest", "provisioned_kib", "used_kib"])
        for t in range(41):
            w.writerow([t, "spike", GUEST_KIB, (500 if t == 23 else 0 if t > 23 else 60) * MIB])
    spec = ReplaySpec(
        traces=(path,),
        hours=40 / 3600,
        warmup_h=0,
        interval_s=5.0,
        stats_period_s=2.0,
        guest_swap_kib=0,
        overcommit=0.25,
        deflate_on_oom_guests=(),
        reporting_share=0,
    )
    card = replay(spec, Squeeze(), DaemonConfig(interval_s=5.0)).scorecard  # type: ignore[arg-type]
    assert card.oom_kills == 1
