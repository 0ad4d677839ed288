"""The protocol model's fast paths against their references (issue 13 item 2): the
interval's workload landed by the compiled ``fleet_kernel.land`` instead of the Fleet's
numpy methods (with the driver's own OOM notifier whenever it has to run), and the
stats exchange's packed entries and parsed buffers kept between exchanges."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.compiled
import sim.virtio.balloon_spec as spec
from overcommitd.config import DaemonConfig
from policies import registry
from sim.evaluation.replay import ReplaySpec, replay
from sim.memory.balloon_fleet import ProtocolBalloons
from sim.memory.guest import Fleet, GuestSpec
from sim.memory.hypervisor import SimHypervisor
from sim.memory.traces import BUNDLED_DIR
from sim.virtio.device import StatArrays
from tests.helpers import numbered_guest
from tests.test_fleet_kernel import STATE

GIB_KIB = 1 << 20
compiled_only = pytest.mark.skipif(not sim.compiled.AVAILABLE, reason="numba (the sim extra) is not installed")
kib = st.floats(min_value=0.0, max_value=4.0 * GIB_KIB, allow_nan=False)
odd = st.one_of(kib, st.sampled_from([0.0, 1e-9, 0.5, 1.0, 1024.0]), st.floats(-1e6, 0.0))


def protocol_twins(specs: list[GuestSpec]) -> tuple[SimHypervisor, SimHypervisor]:
    """Two identical protocol-model hosts, the first landing intervals on the numpy reference."""
    n = len(specs)
    ref, fast = (
        SimHypervisor(specs, host_mem_kib=64 * GIB_KIB, initial_demand_kib=np.full(n, 64.0 * 1024), model="protocol")
        for _ in range(2)
    )
    ref.fleet.compiled = False
    return ref, fast


def differences(a: SimHypervisor, b: SimHypervisor) -> list[str]:
    """Where the two hosts' fleets, balloons or rings are not bit-identical."""
    fa, fb = a.fleet, b.fleet
    out = [n for n in STATE if not np.array_equal(getattr(fa, n), getattr(fb, n))]
    da, db = a.device, b.device
    assert isinstance(da, ProtocolBalloons) and isinstance(db, ProtocolBalloons)
    for name in ("balloon_kib", "held_kib", "managed_removed_kib"):
        if not np.array_equal(getattr(da, name), getattr(db, name)):
            out.append(name)
    for i, (ga, gb) in enumerate(zip(da.guests, db.guests, strict=True)):
        if ga.mem.buf != gb.mem.buf or ga.driver.num_pages != gb.driver.num_pages:
            out.append(f"guest {i}: rings or balloon")
    return out + (["world"] if a.world.now_s != b.world.now_s else [])


@compiled_only
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), data=st.data(), dt_s=st.sampled_from([5.0, 10.0, 300.0]))
def test_arbitrary_states_land_as_the_reference(n: int, data: st.DataObject, dt_s: float) -> None:
    """Balloons inflated through the protocol, then any state of the Fleet's layers and
    any demand: the compiled landing (or its fall back to the reference, when an OOM
    deflate is due or requests still await the host) leaves every array, ring and
    balloon as the numpy reference does."""
    specs = [
        GuestSpec(
            str(i),
            f"g{i}",
            data.draw(st.integers(1, 4)) * GIB_KIB,
            deflate_on_oom=data.draw(st.booleans()),
            swap_kib=data.draw(st.integers(0, 2**20)),
        )
        for i in range(n)
    ]
    ref, fast = protocol_twins(specs)
    for i, s in enumerate(specs):
        target_kib = int(s.ram_kib * data.draw(st.floats(0.3, 1.0)))
        for hv in (ref, fast):
            hv.set_target(s.uuid, target_kib)
    until_s = data.draw(st.sampled_from([0.001, 0.5, 2.0, 10.0]))  # early: requests still awaiting the host
    for hv in (ref, fast):
        hv.world.run(until_s=until_s)

    def arr(strategy: st.SearchStrategy[float] = odd) -> np.ndarray:
        return np.array(data.draw(st.lists(strategy, min_size=n, max_size=n)), dtype=float)

    for name in ("anon", "swap", "cache", "hot_cache", "touched", "pcp", "refault_debt", "own_refault_debt"):
        value = arr()
        for hv in (ref, fast):
            setattr(hv.fleet, name, value.copy())
    reaping = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    demand, reads = arr(st.floats(0.0, 6.0 * GIB_KIB)), arr(st.floats(0.0, 1e6))
    for hv in (ref, fast):
        hv.fleet.reaping = reaping.copy()
        hv.fleet.advance(dt_s, demand, reads)
    assert differences(ref, fast) == []


@compiled_only
@pytest.mark.parametrize("policy", ["trim", "pid"])
def test_protocol_replay_identical_with_the_reference_landing(policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A protocol-model replay at 4x overcommit (balloons, swap, the OOM notifier) gives
    the same scorecard and timeline with the compiled landing as with numpy's."""
    spec = ReplaySpec(
        traces=(BUNDLED_DIR / "bitbrains-rnd",), guests=6, hours=2, warmup_h=0.5, overcommit=4.0, model="protocol"
    )
    cards = []
    for compiled in (False, True):
        monkeypatch.setattr(Fleet, "_land_compiled", Fleet._land_compiled if compiled else lambda *a: False)
        cards.append(replay(spec, registry.create(policy), DaemonConfig(interval_s=spec.interval_s)))
    ref, fast = cards
    assert ref.scorecard.balloon_ops > 0
    assert fast.scorecard == ref.scorecard
    for name in ("t_s", "host_used_kib", "demand_kib", "target_kib", "actual_kib", "available_kib", "swap_in_kib"):
        assert np.array_equal(np.asarray(getattr(fast.timeline, name)), np.asarray(getattr(ref.timeline, name)))


def fleet(n: int) -> ProtocolBalloons:
    specs = [numbered_guest(i, GIB_KIB) for i in range(n)]
    hv = SimHypervisor(specs, host_mem_kib=16 * GIB_KIB, initial_demand_kib=np.full(n, 256.0 * 1024), model="protocol")
    assert isinstance(hv.device, ProtocolBalloons)
    return hv.device


STAT_FIELDS = StatArrays.__dataclass_fields__.keys() - {"block"}
values = st.floats(0.0, 2.0**40, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.lists(values, min_size=2, max_size=2), min_size=9, max_size=9), min_size=1, max_size=4))
def test_packed_stats_are_the_entries_packed(samples: list[list[list[float]]]) -> None:
    """Whatever the Fleet's stats do from one gather to the next (change, stay, come
    back), each guest's packed bytes are its ``vm_stats`` entries packed, and the
    device parses every buffer as it would afresh."""
    balloons = fleet(2)
    for columns in samples + samples[:1]:
        arrays = StatArrays(**{name: np.array(col) for name, col in zip(sorted(STAT_FIELDS), columns, strict=True)})
        balloons.fleet_stats = lambda arrays=arrays: arrays  # type: ignore[method-assign, misc]
        for g in balloons.guests:
            entries = g.mm.vm_stats()
            want = spec.stats_array(len(entries)).pack(*itertools.chain.from_iterable(entries))
            assert g.mm.packed_stats() == want
            assert g.driver._pack_stats() == want


def parsed_afresh(buffer: bytes) -> list[int]:
    """What QEMU's virtio_balloon_receive_stats makes of one buffer on its own: every
    stat "-1" first, then each entry's value at its tag in order (tags past the last
    stat ignored)."""
    stats = [spec.STAT_NOT_SUPPLIED] * spec.VIRTIO_BALLOON_S_NR
    for tag, value in spec.STAT.iter_unpack(buffer[: len(buffer) // spec.STAT.size * spec.STAT.size]):
        if tag < spec.VIRTIO_BALLOON_S_NR:
            stats[tag] = value
    return stats


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=8), st.data())
def test_device_parses_each_buffer_as_afresh(order: list[int], data: st.DataObject) -> None:
    """Buffers that repeat, change and come back, through the whole exchange (timer,
    interrupt, work item, ring): after each, the device holds what that buffer says."""
    entries = [
        data.draw(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2**64 - 1)), min_size=16, max_size=16))
        for _ in range(3)
    ]
    buffers = [spec.stats_array(16).pack(*itertools.chain.from_iterable(e)) for e in entries]
    balloons = fleet(1)
    g = balloons.guests[0]
    g.device.set_stats_poll_interval(1)
    for k in order:
        g.driver._packed_stats = functools.partial(bytes, buffers[k])  # the guest's next buffer
        updates = g.device.stats_updates
        while g.device.stats_updates == updates:
            balloons.world.step()
        assert g.device.stats == parsed_afresh(buffers[k])


@compiled_only
@pytest.mark.parametrize("moment", ["in flight", "ballooned"])
@pytest.mark.parametrize("demand_gib", [0.5, 8.0])
def test_oom_landings_with_a_ballooned_guest(moment: str, demand_gib: float) -> None:
    """A DEFLATE_ON_OOM guest with pages in its balloon, caught while a request still
    awaits the host's ack or after it, under a demand it holds or one that needs the OOM
    notifier: whichever path lands it, the result is the reference's."""
    specs = [GuestSpec("0", "g0", 2 * GIB_KIB, deflate_on_oom=True), GuestSpec("1", "g1", 2 * GIB_KIB)]
    ref, fast = protocol_twins(specs)
    for hv in (ref, fast):
        hv.world.jumps = False  # every continuation queued: a request in flight can be seen between events
        hv.set_target("0", GIB_KIB)
    balloons = fast.device
    assert isinstance(balloons, ProtocolBalloons)

    def caught() -> bool:
        in_flight = balloons.notifier_kib[0] != balloons.balloon_kib[0]
        return (
            bool(in_flight and balloons.balloon_kib[0] == 0) if moment == "in flight" else balloons.balloon_kib[0] > 0
        )

    while not caught():
        for hv in (ref, fast):
            hv.world.step()
    demand = np.array([demand_gib * GIB_KIB, 0.25 * GIB_KIB])
    for hv in (ref, fast):
        hv.fleet.advance(10.0, demand, np.zeros(2))
    assert differences(ref, fast) == []
    # The big demand needs the notifier, which waits for the pages still awaiting the host's ack.
    assert (ref.fleet.oom_deflates[0] > 0) == (demand_gib > 1)
