"""sla-floor: the floor is never crossed; an auto-deflate is met, not fought."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from overcommitd.model import BalloonFeatures
from policies.sla_floor import SlaFloorParams, SlaFloorPolicy, SlaGuestState
from policies.testing import GIB, MIB, guest, host

DOO = BalloonFeatures(deflate_on_oom=True)


def _policy(**params: object) -> SlaFloorPolicy:
    """The policy with its warm-up off: these tests are about what follows it."""
    return SlaFloorPolicy(SlaFloorParams(**({"warmup_s": 0.0} | params)))


def _target(
    policy: SlaFloorPolicy, g, state: SlaGuestState | None = None, at_s: float = 0.0
) -> tuple[int | None, SlaGuestState]:  # type: ignore[no-untyped-def]
    return policy.decide_guest(host(at_s=at_s), g, state or SlaGuestState())


@given(
    max_gib=st.integers(1, 64),
    actual_frac=st.floats(0.01, 1.0),
    avail_frac=st.floats(0.0, 1.0),
    floor_frac=st.floats(0.0, 1.0),
    floor_pct=st.floats(0.0, 100.0),
    doo=st.booleans(),
    last_frac=st.none() | st.floats(0.01, 1.0),
)
def test_the_floor_is_never_crossed(
    max_gib: int,
    actual_frac: float,
    avail_frac: float,
    floor_frac: float,
    floor_pct: float,
    doo: bool,
    last_frac: float | None,
) -> None:
    policy = SlaFloorPolicy(SlaFloorParams(floor_pct=floor_pct))
    max_kib = max_gib * GIB
    actual = max(1, int(max_kib * actual_frac))
    g = guest(
        max_kib=max_kib,
        actual_kib=actual,
        available_kib=int(actual * avail_frac),
        floor_kib=int(max_kib * floor_frac),
        features=BalloonFeatures(deflate_on_oom=doo),
        last_target_kib=None if last_frac is None else int(max_kib * last_frac),
    )
    target, _ = _target(policy, g)
    assert target is not None
    assert max(g.floor_kib, int(max_kib * floor_pct / 100)) <= target <= max_kib


def test_a_guest_below_its_floor_is_raised_even_without_stats() -> None:
    target, _ = _target(SlaFloorPolicy(), guest(max_kib=8 * GIB, actual_kib=GIB, floor_kib=2 * GIB, stats=False))
    assert target == 2 * GIB


def test_backs_off_after_an_auto_deflate_and_resumes_after_the_cooldown() -> None:
    policy = _policy()
    # we asked for 3 GiB; the DEFLATE_ON_OOM guest deflated itself to 3.5 GiB
    deflated = guest(
        max_kib=8 * GIB, actual_kib=3 * GIB + 512 * MIB, available_kib=2 * GIB, last_target_kib=3 * GIB, features=DOO
    )
    target, state = _target(policy, deflated, at_s=100)
    assert target == deflated.actual_kib + policy.params.deflate_margin_kib  # met, with a margin
    assert state.auto_deflates == 1
    # the guest now shows lots of headroom; during the cool-down no target goes below actual
    roomy = guest(max_kib=8 * GIB, actual_kib=target, available_kib=3 * GIB, last_target_kib=target, features=DOO)
    held, state = _target(policy, roomy, state, at_s=100 + policy.params.cooldown_s - 1)
    assert held is not None and held >= roomy.actual_kib
    # after it, reclaim resumes, one bounded step at a time
    resumed, _ = _target(policy, roomy, state, at_s=100 + policy.params.cooldown_s + 1)
    assert resumed == roomy.actual_kib - policy.params.max_reclaim_step_kib


def test_without_deflate_on_oom_a_short_balloon_is_not_an_auto_deflate() -> None:
    policy = _policy()
    g = guest(max_kib=8 * GIB, actual_kib=3 * GIB + 512 * MIB, available_kib=2 * GIB, last_target_kib=3 * GIB)
    target, state = _target(policy, g)
    assert state.auto_deflates == 0 and target is not None and target < g.actual_kib


def test_an_inflated_deflate_on_oom_guest_is_judged_by_actual_not_memtotal() -> None:
    # same memory and MemAvailable; the DOO guest reports MemTotal = 8 GiB while inflated
    policy = SlaFloorPolicy()
    plain = guest(max_kib=8 * GIB, actual_kib=4 * GIB, available_kib=2 * GIB)
    doo = guest(max_kib=8 * GIB, actual_kib=4 * GIB, available_kib=2 * GIB, features=DOO)
    assert doo.stats is not None and doo.stats.mem_total_kib == 8 * GIB
    assert _target(policy, plain)[0] == _target(policy, doo)[0]
