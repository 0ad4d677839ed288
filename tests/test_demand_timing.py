"""Issue 16 item 4: a trace sample's demand lands during the tick it belongs to, and the
stats a simulated policy reads at a tick's end saw it, as a real daemon's would; the
snapshot's stats carry their age. Before, the replay read a sample's demand at the start
of a tick and applied it at its end, after the stats were polled: a rise was seen two
ticks after it happened."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overcommitd.config import DaemonConfig
from overcommitd.model import GuestSnapshot, HostSnapshot
from policies.api import PolicyResult
from sim.evaluation.replay import ReplaySpec, replay
from sim.virtio.calibration import STATS_WORK_S

MIB = 1024
GUEST_KIB = 1024 * MIB
INTERVAL_S = 10.0
PERIOD_S = 2.0
LOW_MIB, HIGH_MIB = 100, 400
DURATION_S = 60


class Watcher:
    """Asks for nothing; keeps, per decision, (now, MemAvailable seen, stats' last update)."""

    name = "watcher"

    def __init__(self) -> None:
        self.seen: list[tuple[float, int, float]] = []

    def initial_state(self) -> None:
        return None

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        s = guests[0].stats
        assert s is not None and s.mem_available_kib is not None
        self.seen.append((host.taken_at_s, s.mem_available_kib, s.last_update_s))
        return PolicyResult({}, None)


def step_trace(path: Path, step_s: float) -> Path:
    """One 1024 MiB guest holding LOW_MIB, then HIGH_MIB from ``step_s`` on, sampled every second."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time_s", "guest", "provisioned_kib", "used_kib"])
        for t in range(DURATION_S + 1):
            w.writerow([t, "step", GUEST_KIB, (HIGH_MIB if t >= step_s else LOW_MIB) * MIB])
    return path


def watch(tmp_path: Path, step_s: float, phase_s: float = 0.0) -> list[tuple[float, int, float]]:
    spec = ReplaySpec(
        traces=(step_trace(tmp_path / f"step-{step_s}.csv", step_s),),
        hours=DURATION_S / 3600,
        warmup_h=0,
        interval_s=INTERVAL_S,
        stats_period_s=PERIOD_S,
        guest_swap_kib=0,
        overcommit=0.25,
        deflate_on_oom_guests=(),
        reporting_share=0,
        stats_phase_s=(("step", phase_s),),
    )
    policy = Watcher()
    replay(spec, policy, DaemonConfig(interval_s=INTERVAL_S))  # type: ignore[arg-type]
    return policy.seen


def first_seen_s(seen: list[tuple[float, int, float]]) -> float:
    """When the policy first saw MemAvailable down by most of the step."""
    before = seen[0][1]
    return next(now for now, avail, _ in seen if before - avail > 0.8 * (HIGH_MIB - LOW_MIB) * MIB)


def test_a_rise_is_seen_at_the_end_of_the_tick_it_happened_in(tmp_path: Path) -> None:
    """A rise at 13 s, with stats every 2 s: the sample at ~18 s shows it, so the policy
    deciding at 20 s sees it (the old timing: not before 40 s)."""
    assert first_seen_s(watch(tmp_path, 13)) == 20.0


def last_sample_before(end_s: float) -> float:
    """The bulk device's last stats sample before ``end_s`` (first at STATS_WORK_S, then
    every period + STATS_WORK_S, as a real guest's: sim.virtio.device)."""
    step_s = PERIOD_S + STATS_WORK_S
    return STATS_WORK_S + (math.ceil((end_s - STATS_WORK_S) / step_s) - 1) * step_s


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step_s=st.integers(min_value=11, max_value=45))  # after the first decision (10 s)
def test_a_rise_is_seen_by_the_first_decision_after_a_sample_taken_since(tmp_path: Path, step_s: int) -> None:
    """Wherever in a tick a rise falls, the first decision that sees it is the first one
    whose latest stats sample was taken at or after the rise; and the stats it reads are
    never older than one period (plus the guest's answer), their age explicit. (Each
    example writes its own trace file: the shared tmp_path is safe.)"""
    seen = watch(tmp_path, step_s)
    expected = next(now for now, _, _ in seen if last_sample_before(now) >= step_s)
    assert first_seen_s(seen) == expected
    assert expected - step_s < INTERVAL_S + PERIOD_S + STATS_WORK_S
    for now, _, last_update_s in seen:
        assert 0 <= now - last_update_s <= PERIOD_S + STATS_WORK_S + 1  # QEMU stamps whole seconds


def last_sample_in_phase_before(end_s: float, phase_s: float) -> float:
    """``last_sample_before`` for a guest whose stats timer first fires at ``phase_s``."""
    step_s = PERIOD_S + STATS_WORK_S
    first_s = phase_s + STATS_WORK_S
    return first_s + (math.ceil((end_s - first_s) / step_s) - 1) * step_s


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step_s=st.integers(min_value=11, max_value=45), phase_s=st.sampled_from([0.3, 0.9, 1.5, 1.95]))
def test_a_guest_polled_in_its_own_phase_sees_a_rise_at_its_own_sample(
    tmp_path: Path, step_s: int, phase_s: float
) -> None:
    """Issue 16: real guests' stats timers run each in its own phase, so a rise between
    two guests' samples is seen by one a tick before the other. With the guest's phase
    (``ReplaySpec.stats_phase_s``) its samples fall at ``phase + k (period + answer)``,
    the demand lands at them, and the first decision that sees a rise is the first
    whose latest sample was taken at or after it."""
    seen = watch(tmp_path, step_s, phase_s)
    for now, _, last_update_s in seen:
        assert last_update_s == math.floor(last_sample_in_phase_before(now, phase_s))  # QEMU stamps whole seconds
    expected = next(now for now, _, _ in seen if last_sample_in_phase_before(now, phase_s) >= step_s)
    assert first_seen_s(seen) == expected
