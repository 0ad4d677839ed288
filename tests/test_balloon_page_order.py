"""Which free pages the balloon and the guest take, last freed first, as measured on a
real 6.1 guest (tests/realguest/test_balloon_page_order.py repeats the measurement in
CI): a balloon cycled by the same amount re-takes the pages it gave
back, and the guest's next allocation after a deflate costs the host fresh pages. Both
of the simulator's speeds follow the rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.memory.guest import GuestSpec, take_in_order
from sim.memory.hypervisor import SimHypervisor
from sim.virtio.world import World

MIB = 1024
RAM_MIB = 1024


class OneGuest:
    """A 1 GiB guest without swap at either speed, advanced 10 s per step."""

    def __init__(self, model: str) -> None:
        self.world = World()
        extra = {"model": "protocol", "world": self.world} if model == "protocol" else {}
        spec = GuestSpec("00000000-0000-0000-0000-000000000001", "g", RAM_MIB * MIB, swap_kib=0)
        self.hv = SimHypervisor([spec], host_mem_kib=8 << 20, initial_demand_kib=np.array([50.0 * MIB]), **extra)
        self.now_s = 0.0

    def run(self, demand_mib: float, target_mib: float | None = None, steps: int = 3) -> float:
        """Set the target (if any), advance; returns the guest's host-backed MiB."""
        if target_mib is not None:
            self.hv.set_target(self.hv.fleet.specs[0].uuid, int(target_mib * MIB))
        for _ in range(steps):
            self.now_s += 10.0
            self.world.run(self.now_s)
            self.hv.advance(self.now_s, np.array([demand_mib * MIB]), np.zeros(1))
        return float(self.hv.fleet.touched[0]) / MIB


@pytest.mark.parametrize("model", ["bulk", "protocol"])
def test_a_cycled_balloon_gains_the_host_only_once(model: str) -> None:
    g = OneGuest(model)
    g.run(650)
    start = g.run(50)  # a burst of 600 MiB touched, then freed: touched free memory
    cycles = []
    for _ in range(4):
        inflated = g.run(50, RAM_MIB - 100)
        deflated = g.run(50, RAM_MIB)
        cycles.append((inflated, deflated))
    assert cycles[0][0] == pytest.approx(start - 100, abs=1)  # the first inflate took touched pages
    for inflated, deflated in cycles:
        assert inflated == pytest.approx(cycles[0][0], abs=1)  # later ones re-take their own
        assert deflated == pytest.approx(inflated, abs=1)  # a deflate touches nothing
    deep = g.run(50, RAM_MIB - 500)
    assert deep == pytest.approx(cycles[-1][1] - 400, abs=1)  # 100 re-taken, then 400 touched


def cycled_once(model: str) -> tuple[OneGuest, float]:
    """A guest that burst by 600 MiB and freed it, whose balloon then took 100 MiB and gave
    them back: 100 MiB deflated (unbacked) pages on top of 500 MiB touched free ones.
    Returns it and its host-backed MiB."""
    g = OneGuest(model)
    g.run(650)
    g.run(50)
    g.run(50, RAM_MIB - 100)
    return g, g.run(50, RAM_MIB)


@pytest.mark.parametrize("model", ["bulk", "protocol"])
def test_an_allocation_after_a_deflate_takes_the_deflated_pages_first(model: str) -> None:
    g, before = cycled_once(model)
    after = g.run(200)  # 150 MiB more: the 100 deflated (unbacked), then 50 touched free
    assert after == pytest.approx(before + 100, abs=1)


@pytest.mark.parametrize("model", ["bulk", "protocol"])
def test_pages_freed_after_a_deflate_are_taken_before_the_deflated_ones(model: str) -> None:
    g, _ = cycled_once(model)
    g.run(250)  # the guest grows into the deflated pages and 100 touched...
    freed = g.run(100)  # ...and frees 150 MiB of them again
    assert g.run(100, RAM_MIB - 100) == pytest.approx(freed - 100, abs=1)


@given(
    amount=st.floats(0, 1e9, allow_nan=False),
    layers=st.lists(st.floats(0, 1e9, allow_nan=False), min_size=1, max_size=4),
)
@settings(max_examples=200, deadline=None)
def test_take_in_order_takes_what_is_there_first_layer_first(amount: float, layers: list[float]) -> None:
    scalar = take_in_order(amount, layers, min)
    arrays = take_in_order(np.array([amount]), [np.array([x]) for x in layers], np.minimum)
    assert [float(a[0]) for a in arrays] == scalar
    assert all(0 <= t <= layer for t, layer in zip(scalar, layers, strict=True))
    assert sum(scalar) == pytest.approx(min(amount, sum(layers)), rel=1e-9, abs=1e-6)
    for k, t in enumerate(scalar):  # a layer is touched only once those above it are spent
        if t > 0:
            assert all(scalar[j] == layers[j] for j in range(k))
