"""The compiled per-request Fleet accounting of the protocol model
(``sim.memory.protocol_kernel``) against its reference, ``Fleet.balloon_moved_one``:
bit for bit, on arbitrary guest states and through a whole inflate and deflate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.compiled
from sim.memory import protocol_kernel
from sim.memory.balloon_fleet import ProtocolBalloons, spare_kib
from sim.memory.guest import Fleet, GuestModelParams, GuestSpec
from sim.memory.hypervisor import SimHypervisor

pytestmark = pytest.mark.skipif(not sim.compiled.AVAILABLE, reason="numba (the sim extra) is not installed")

# What balloon_moved_one reads or changes, besides the driver's balloon_kib.
STATE = (
    "anon",
    "cache",
    "hot_cache",
    "refault_debt",
    "touched",
    "balloon_resident",
    "deflated_free",
    "older_touched",
    "pcp",
    "pcp_cap",
)
GIB_KIB = 1 << 20

kib = st.floats(min_value=0.0, max_value=64.0 * 2**20, allow_nan=False)
odd = st.one_of(kib, st.sampled_from([0.0, -0.0, 1e-9, 0.5, 1.0, 1024.0]), st.floats(-1e6, 0.0))


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 4),
    data=st.data(),
    delta_kib=st.one_of(st.sampled_from([1024, -1024, 4, -4, 0]), st.floats(-4e6, 4e6, allow_nan=False)),
    release_frac=st.sampled_from([0.0, 0.25, 1.0]),
)
def test_arbitrary_states_move_bit_identical(
    n: int, data: st.DataObject, delta_kib: float, release_frac: float
) -> None:
    """Any state the arrays can hold (over-full guests, negative float dust, empty
    balloons, hint blocks held), any move up or down: the same doubles on both paths."""
    ram = data.draw(st.lists(st.integers(256 * 1024, 64 * 2**20), min_size=n, max_size=n))
    specs = [GuestSpec(str(k), f"g{k}", r) for k, r in enumerate(ram)]
    demand = np.array(data.draw(st.lists(kib, min_size=n, max_size=n)))
    ref, fast = (Fleet(specs, GuestModelParams(), demand) for _ in range(2))
    for name in (*STATE, "balloon_kib", "held_kib"):
        value = np.array(data.draw(st.lists(odd, min_size=n, max_size=n)))
        for fleet in (ref, fast):
            owner = fleet.driver if name in ("balloon_kib", "held_kib") else fleet
            setattr(owner, name, value.copy())
    i = data.draw(st.integers(0, n - 1))
    ref.driver.balloon_kib[i] = ref.driver.balloon_kib.item(i) + delta_kib
    ref.balloon_moved_one(i, delta_kib, release_frac)
    drv = fast.driver
    row = fast.fixed_row(i)
    spare = protocol_kernel.balloon_moved_one(fast, drv.balloon_kib, drv.held_kib, row, i, delta_kib, release_frac)
    for name in STATE:
        assert np.array_equal(getattr(ref, name), getattr(fast, name), equal_nan=True), name
    assert np.array_equal(ref.driver.balloon_kib, drv.balloon_kib)
    # The spare it hands the next request is the one read afresh from the arrays.
    after = (drv.balloon_kib.item(i), drv.held_kib.item(i), fast.anon.item(i), fast.cache.item(i))
    assert repr(spare) == repr(spare_kib(row, *after, reclaim=True))


def _inflate_and_back(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """1 GiB into a 4 GiB guest whose page cache must give some of it, then 512 MiB
    back, through the protocol model; the Fleet's arrays after each."""
    monkeypatch.setattr(sim.compiled, "AVAILABLE", compiled)
    spec = GuestSpec(uuid="1", name="g", ram_kib=4 * GIB_KIB)
    hv = SimHypervisor(
        [spec], host_mem_kib=64 * GIB_KIB, initial_demand_kib=np.array([2.6 * GIB_KIB]), model="protocol"
    )
    balloons = hv.device
    assert isinstance(balloons, ProtocolBalloons)
    fleet, device = hv.fleet, balloons.guests[0].device
    fleet.cache[0] = 0.6 * GIB_KIB
    out: dict[str, np.ndarray] = {}
    for target_kib, pages in ((3 * GIB_KIB, 262_144), (int(3.5 * GIB_KIB), 131_072)):
        hv.set_target(spec.uuid, target_kib)
        while device.actual != pages:
            hv.world.step()
        for name in STATE:
            out[f"{name}@{pages}"] = getattr(fleet, name).copy()
        out[f"balloon@{pages}"] = balloons.balloon_kib.copy()
    return out


def test_inflate_and_deflate_identical_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole inflate that evicts page cache, and a deflate: every array the same."""
    ref = _inflate_and_back(False, monkeypatch)
    fast = _inflate_and_back(True, monkeypatch)
    assert ref["cache@262144"][0] < 0.6 * GIB_KIB  # the inflate reached the cache rule
    for name, value in ref.items():
        assert np.array_equal(value, fast[name]), name
