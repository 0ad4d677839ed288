"""What every built-in policy owes the loop, checked on random snapshots: targets only
for guests it was given, within 0..maximum, and purity (same inputs, same outputs; the
previous state is not mutated)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd.model import BalloonFeatures, GuestSnapshot
from policies import registry
from policies.testing import GIB, guest, host

BUILT_INS = ("pid", "sla-floor", "free-page", "mom", "proxmox", "headroom", "trim", "share")


@st.composite
def guests(draw: st.DrawFn) -> list[GuestSnapshot]:
    out = []
    for i in range(draw(st.integers(0, 6))):
        max_kib = draw(st.integers(1, 64)) * GIB
        actual = draw(st.integers(1, max_kib))
        avail = draw(st.integers(0, actual))
        out.append(
            guest(
                f"g{i}",
                max_kib=max_kib,
                actual_kib=actual,
                available_kib=avail,
                free_kib=draw(st.integers(0, avail)),
                floor_kib=draw(st.integers(0, max_kib)),
                last_target_kib=draw(st.none() | st.integers(1, max_kib)),
                features=BalloonFeatures(deflate_on_oom=draw(st.booleans()), reporting=draw(st.booleans())),
                stats=draw(st.booleans()),
                weight=draw(st.floats(0.5, 4)),
            )
        )
    return out


@pytest.mark.parametrize("name", BUILT_INS)
@settings(max_examples=60, deadline=None)
@given(gs=guests(), host_avail_frac=st.floats(0, 1), steps=st.integers(1, 3))
def test_targets_are_bounded_and_decide_is_pure(
    name: str, gs: list[GuestSnapshot], host_avail_frac: float, steps: int
) -> None:
    policy = registry.create(name)
    state = policy.initial_state()
    for k in range(steps):
        h = host(at_s=10.0 * k, available_kib=int(64 * GIB * host_avail_frac))
        before = copy.deepcopy(state)
        result = policy.decide(h, gs, state)
        again = policy.decide(h, gs, before)
        assert result.targets_kib == again.targets_kib  # pure: a function of its inputs
        assert repr(state) == repr(before)  # the previous state was not mutated
        by_uuid = {g.uuid: g for g in gs}
        assert set(result.targets_kib) <= set(by_uuid)
        assert all(0 <= t <= by_uuid[u].max_kib for u, t in result.targets_kib.items())
        assert not result.errors  # no built-in raises on a valid snapshot
        state = result.state


@pytest.mark.parametrize("name", ["pid", "sla-floor", "free-page", "trim"])
def test_the_holding_built_ins_say_why_for_every_guest(name: str) -> None:
    """A new guest is in its warm-up and one without stats has none: both are said."""
    policy = registry.create(name)
    seen, blind = guest("seen", max_kib=8 * GIB, available_kib=6 * GIB), guest("blind", max_kib=8 * GIB, stats=False)
    result = policy.decide(host(at_s=0.0), [seen, blind], policy.initial_state())
    assert result.reasons[blind.uuid] == "no stats from the guest yet"
    assert result.reasons[seen.uuid].startswith("warm-up: ") and "min left" in result.reasons[seen.uuid]


def test_a_plugin_without_reasons_still_works_and_gives_none() -> None:
    """``PerGuestPolicy`` subclasses that predate reasons keep working unchanged."""
    from overcommitd.model import HostSnapshot
    from policies.api import PerGuestPolicy

    class Old(PerGuestPolicy[int]):
        name = "old"

        def initial_guest_state(self, guest: GuestSnapshot) -> int:
            return 0

        def decide_guest(self, host: HostSnapshot, guest: GuestSnapshot, state: int) -> tuple[int | None, int]:
            return guest.max_kib, state + 1

    g = guest("g", max_kib=2 * GIB)
    result = Old().decide(host(), [g], {})
    assert result.targets_kib == {g.uuid: 2 * GIB} and result.state == {g.uuid: 1} and result.reasons == {}
