"""The bulk device's compiled stats polling (``sim.virtio.stats_kernel.poll_stats``) against its numpy
reference (``BalloonDevice._poll_reference``): the same samples taken, the same stamps and
the same next arrivals, bit for bit, for any periods, phases and polling instants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim import compiled
from sim.virtio.calibration import STATS_WORK_S
from sim.virtio.device import STAT_ARRAY_NAMES, BalloonDevice, StatArrays
from sim.virtio.driver import BalloonDriver

pytestmark = pytest.mark.skipif(not compiled.AVAILABLE, reason="numba (the sim extra) is not installed")

periods = st.one_of(st.sampled_from([0.0, 1.0, 5.0, 10.0]), st.floats(0.0, 30.0))
phases = st.one_of(st.sampled_from([0.0, 2.5, float("nan")]), st.floats(0.0, 40.0))


class Asked:
    """A ``current`` for ``poll_stats`` that counts how often it was asked."""

    def __init__(self, sample: StatArrays) -> None:
        self.sample, self.times = sample, 0

    def __call__(self) -> StatArrays:
        self.times += 1
        return self.sample


def device(period_s: list[float], phase_s: list[float], *, compiled: bool) -> BalloonDevice:
    n = len(period_s)
    driver = BalloonDriver(n, np.zeros(n, dtype=bool))
    dev = BalloonDevice(np.full(n, 1024.0**2), np.array(period_s), driver, np.array(phase_s))
    dev.compiled = compiled
    return dev


@given(
    guests=st.lists(st.tuples(periods, phases), min_size=1, max_size=8),
    steps_s=st.lists(st.floats(0.0, 25.0), min_size=1, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=400, deadline=None)
def test_compiled_poll_takes_the_reference_samples(
    guests: list[tuple[float, float]], steps_s: list[float], seed: int
) -> None:
    period_s, phase_s = [p for p, _ in guests], [ph for _, ph in guests]
    ref, fast = device(period_s, phase_s, compiled=False), device(period_s, phase_s, compiled=True)
    rng = np.random.default_rng(seed)
    now_s = 0.0
    for step_s in steps_s:
        now_s += step_s
        sample = StatArrays.of_block(rng.uniform(0, 2**30, (len(STAT_ARRAY_NAMES), len(guests))))
        asked = [Asked(sample), Asked(sample)]
        ref.poll_stats(now_s, asked[0])
        fast.poll_stats(now_s, asked[1])
        assert asked[0].times == asked[1].times <= 1  # the state is computed once, only when a sample is due
        assert np.array_equal(ref.next_arrival_s, fast.next_arrival_s, equal_nan=True)
        assert np.array_equal(ref.last_update_s, fast.last_update_s)
        assert np.array_equal(ref.stats.block, fast.stats.block)


def test_compiled_poll_stamps_every_arrival_before_now() -> None:
    """Not only alike: guests polled every 5 s, each arrival STATS_WORK_S after its timer,
    are stamped with the whole second of their last arrival before a 23 s jump; a guest
    whose first timer fires after it is not due and keeps its old stats."""
    dev = device([5.0, 5.0, 5.0], [0.0, 2.5, 30.0], compiled=True)
    sample = StatArrays.of_block(np.arange(3.0 * len(STAT_ARRAY_NAMES)).reshape(-1, 3))
    dev.poll_stats(23.0, lambda: sample)
    step_s = 5.0 + STATS_WORK_S
    assert dev.last_update_s.tolist() == [20.0, 22.0, -np.inf]  # arrivals at ~20.005 and ~22.505
    assert dev.next_arrival_s[:2] == pytest.approx([STATS_WORK_S + 5 * step_s, 2.5 + STATS_WORK_S + 5 * step_s])
    assert np.array_equal(dev.stats.block[:, :2], sample.block[:, :2]) and not dev.stats.block[:, 2].any()
