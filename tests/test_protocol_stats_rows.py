"""The protocol model's stats gather, built for every guest at once in numpy, writes
what the per-guest rule says: each value in bytes (memory) or counts, truncated toward
zero as ``int()`` of the float would, in Linux's order; and the host's copy of each
device's sample divides back into KiB exactly as the per-guest copy did."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.virtio.balloon_spec as spec
from sim.memory.balloon_fleet import _STAT_ROW, _TAG_OF, ProtocolBalloons
from sim.memory.hypervisor import SimHypervisor
from sim.virtio.device import StatArrays
from tests.helpers import numbered_guest, play, protocol_hypervisor

GIB_KIB = 1 << 20
N = 3
values = st.floats(0.0, 2.0**40, allow_nan=False, allow_infinity=False)


def fleet(n: int = N) -> tuple[SimHypervisor, ProtocolBalloons]:
    specs = [numbered_guest(i, GIB_KIB) for i in range(n)]
    hv = SimHypervisor(specs, host_mem_kib=16 * GIB_KIB, initial_demand_kib=np.full(n, 256.0 * 1024), model="protocol")
    assert isinstance(hv.device, ProtocolBalloons)
    return hv, hv.device


STAT_FIELDS = tuple(f.name for f in dataclasses.fields(StatArrays))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(values, min_size=N, max_size=N), min_size=len(STAT_FIELDS), max_size=len(STAT_FIELDS)))
def test_every_guests_row_is_the_per_guest_truncation(columns: list[list[float]]) -> None:
    _, balloons = fleet()
    stats = {name: np.array(col) for name, col in zip(STAT_FIELDS, columns)}
    arrays = StatArrays(**stats)
    balloons.fleet_stats = lambda: arrays  # type: ignore[method-assign]
    balloons.fleet_changed()  # the Fleet "moved": rows cached at this instant are stale
    for i, mm in enumerate(g.mm for g in balloons.guests):
        expected = [(tag, 0 if name is None else int(stats[name][i].item() * unit)) for tag, name, unit in _STAT_ROW]
        assert mm.vm_stats() == expected


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(0, 2**64 - 1), min_size=spec.VIRTIO_BALLOON_S_NR, max_size=spec.VIRTIO_BALLOON_S_NR),
        min_size=N,
        max_size=N,
    ),
    st.lists(st.booleans(), min_size=N, max_size=N),
)
def test_copying_fresh_samples_at_once_matches_one_by_one(received: list[list[int]], fresh: list[bool]) -> None:
    _, balloons = fleet()
    before = {name: values.copy() for name, values in balloons.stats.items()}
    before_update_s = balloons.last_update_s.copy()
    for g, sample, new in zip(balloons.guests, received, fresh):
        if new:
            g.device.stats = list(sample)
            g.device.stats_updates += 1
            g.device.stats_last_update_s = 7.0
    balloons.poll_stats(8.0)
    for i, (sample, new) in enumerate(zip(received, fresh)):
        for name, (tag, unit) in _TAG_OF.items():
            want = float(sample[tag] // unit) if new else before[name][i]
            assert getattr(balloons.stats, name)[i] == want
        assert balloons.last_update_s[i] == (7.0 if new else before_update_s[i])


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.floats(0.0, 4.9), min_size=2, max_size=3),
    st.lists(st.tuples(st.floats(0.0, 30.0), st.integers(0, 2), st.integers(128, 1024)), max_size=6),
    st.sampled_from([1.0, 3.0, 10.0]),
    st.lists(st.integers(100, 1000), min_size=3, max_size=3),
    st.booleans(),
)
def test_every_gather_writes_what_the_fleet_holds_at_that_instant(
    phases_s: list[float], targets: list[tuple[float, int, int]], tick_s: float, demand_mib: list[int], oom: bool
) -> None:
    """The rows are cached per change of the Fleet (``fleet_version``), not per instant:
    guests on their own timer phases, inflating, deflating (the OOM notifier too) and
    reporting between ticks, each gather still packs what a fresh ``Fleet.stats()``
    gives at its own instant, value for value."""
    n = len(phases_s)
    specs = [
        numbered_guest(
            i,
            GIB_KIB,
            stats_phase_s=phase_s,
            deflate_on_oom=oom,
            reporting=i == 1,
            free_page_hint=i == 2,
        )
        for i, phase_s in enumerate(phases_s)
    ]
    demand = np.array([m * 1024.0 for m in demand_mib[:n]])
    hv, balloons = protocol_hypervisor(specs, demand, 1)
    gathered = [0] * n

    def checked(i: int, packed: Callable[[], bytes]) -> Callable[[], bytes]:
        def gather() -> bytes:
            stats = {name: values for name, values in hv.fleet.stats().items()}
            fresh = [(tag, 0 if name is None else int(stats[name][i].item() * unit)) for tag, name, unit in _STAT_ROW]
            got = packed()
            assert got == spec.stats_array(len(fresh)).pack(*itertools.chain.from_iterable(fresh))
            gathered[i] += 1
            return got

        return gather

    for i, g in enumerate(balloons.guests):
        g.driver._packed_stats = checked(i, g.driver._packed_stats)
    play(hv, demand, [(t, i, mib * 1024) for t, i, mib in targets if i < n], tick_s, 30.0, 35.0)
    assert min(gathered) >= 25  # every guest gathered about once a second
