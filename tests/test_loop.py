"""The control step: overrides, policy failures held per guest or for all, decisions
applied; and the asyncio runner doing one step against a simulated host."""

from __future__ import annotations

import dataclasses

import numpy as np

from overcommitd.config import DaemonConfig, GuestOverride
from overcommitd.loop import LoopState, apply, step
from overcommitd.model import ClampReason, GuestSnapshot, HostSnapshot
from policies.api import PerGuestPolicy
from sim.memory.guest import GuestSpec
from sim.memory.hypervisor import SimHypervisor
from tests.helpers import GIB, FixedParams, FixedPolicy, Noop, Raising, guest, host

CFG = DaemonConfig()


def test_fixed_policy_is_stepped_by_the_guard_and_state_carries() -> None:
    guests = [guest("a", actual_kib=4 * GIB), guest("b", actual_kib=4 * GIB)]
    policy = FixedPolicy(FixedParams(target_kib=1 * GIB))
    out = step(100.0, host(), guests, policy, LoopState.initial(policy), CFG)
    assert [d.target_kib for d in out.decisions] == [4 * GIB - CFG.guard.max_inflate_step_kib] * 2
    assert out.state.policy_state == 1


def test_a_policy_that_raises_holds_every_guest_and_the_loop_goes_on() -> None:
    policy = Raising()
    out = step(100.0, host(), [guest("a"), guest("b")], policy, LoopState(None), CFG)
    assert out.policy_error is not None and "ZeroDivisionError" in out.policy_error
    assert all(d.held and d.clamped_by(ClampReason.POLICY_ERROR) for d in out.decisions)


class FailsOnB(PerGuestPolicy[int]):
    name = "fails-on-b"

    def initial_guest_state(self, guest: GuestSnapshot) -> int:
        return 0

    def decide_guest(self, host: HostSnapshot, guest: GuestSnapshot, state: int) -> tuple[int | None, int]:
        if guest.name == "b":
            raise KeyError("mem_unused")
        return guest.actual_kib - 64 * 1024, state + 1


def test_one_bad_guest_holds_only_that_guest() -> None:
    """MOM's evaluator skipped the whole host when one guest's field was bad."""
    policy = FailsOnB()
    out = step(100.0, host(), [guest("a"), guest("b")], policy, LoopState.initial(policy), CFG)
    a, b = out.decisions
    assert a.target_kib == 4 * GIB - 64 * 1024
    assert b.held and b.clamped_by(ClampReason.POLICY_ERROR) and "mem_unused" in b.clamps[0].detail
    assert out.state.policy_state == {"uuid-a": 1, "uuid-b": 0}


def test_config_overrides_exclude_raise_floor_and_weight() -> None:
    seen: list[GuestSnapshot] = []

    class Spy(Noop):
        def decide(self, host, guests, state):  # type: ignore[no-untyped-def]
            seen.extend(guests)
            return super().decide(host, guests, state)

    cfg = DaemonConfig(
        guests={"a": GuestOverride(exclude=True), "uuid-b": GuestOverride(floor_kib=3 * GIB, weight=2.0)}
    )
    out = step(100.0, host(), [guest("a"), guest("b", floor_kib=GIB)], Spy(), LoopState(None), cfg)
    assert [g.name for g in seen] == ["b"]
    assert seen[0].floor_kib == 3 * GIB and seen[0].weight == 2.0
    assert out.decisions[0].clamped_by(ClampReason.EXCLUDED)


def sim_host(n: int = 2) -> SimHypervisor:
    specs = [GuestSpec(uuid=f"u{i}", name=f"g{i}", ram_kib=4 * GIB) for i in range(n)]
    return SimHypervisor(specs, host_mem_kib=16 * GIB, initial_demand_kib=np.full(n, 1.0 * GIB))


def test_apply_sets_only_targets_that_are_not_holds_and_survives_a_vanished_guest() -> None:
    hv = sim_host()
    policy = FixedPolicy(FixedParams(target_kib=3 * GIB))
    out = step(hv.now_s, hv.read(), hv.snapshot(), policy, LoopState.initial(policy), CFG)
    assert apply(hv, out.decisions) == {"u0", "u1"}
    hv.advance(10.0, np.full(2, 1.0 * GIB), np.zeros(2))
    assert [g.actual_kib for g in hv.snapshot()] == [4 * GIB - CFG.guard.max_inflate_step_kib] * 2
    gone = dataclasses.replace(out.decisions[0], uuid="vanished")
    assert apply(hv, [gone, out.decisions[1]]) == {"u1"}
