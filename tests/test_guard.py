"""The guard: each rule on a hand-built guest, then the invariants for arbitrary
snapshots and arbitrary policy outputs."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from overcommitd.config import GuardConfig
from overcommitd.guard import GuardMemory, floor_kib, guard, implausible
from overcommitd.model import BalloonFeatures, ClampReason, GuestSnapshot, GuestStats, RunState
from tests.helpers import GIB, MIB, guest, stats

RULES = GuardConfig()
NOW = 100.0


def decide(g: GuestSnapshot, wish: int | None, **kw: object) -> tuple[int | None, set[ClampReason]]:
    decision, _ = guard(NOW, g, wish, rules=RULES, **kw)  # type: ignore[arg-type]
    return decision.target_kib, {c.reason for c in decision.clamps}


def test_inflation_is_bounded_per_tick() -> None:
    target, reasons = decide(guest(actual_kib=4 * GIB), 1 * GIB)
    assert target == 4 * GIB - RULES.max_inflate_step_kib
    assert reasons == {ClampReason.INFLATE_STEP}


def test_deflation_is_faster_than_inflation_and_bounded() -> None:
    target, reasons = decide(guest(max_kib=8 * GIB, actual_kib=1 * GIB), 8 * GIB)
    assert target == 1 * GIB + RULES.max_deflate_step_kib
    assert RULES.max_deflate_step_kib > RULES.max_inflate_step_kib
    assert reasons == {ClampReason.DEFLATE_STEP}


def test_floor_and_maximum() -> None:
    g = guest(actual_kib=2 * GIB, floor_kib=int(1.9 * GIB))
    assert decide(g, 1 * GIB) == (int(1.9 * GIB), {ClampReason.FLOOR})
    assert decide(guest(actual_kib=3 * GIB), 9 * GIB) == (4 * GIB, {ClampReason.MAXIMUM})


def test_floor_beats_the_deflate_step() -> None:
    g = guest(max_kib=16 * GIB, actual_kib=1 * GIB, floor_kib=8 * GIB)
    target, reasons = decide(g, 2 * GIB)
    assert target == 8 * GIB
    assert ClampReason.FLOOR in reasons


def test_no_inflation_on_stale_or_missing_stats_but_deflation_goes_on() -> None:
    stale = guest(actual_kib=3 * GIB, stats_=stats(last_update_s=NOW - 120))
    # Clamped to where it is, which is no change: held.
    assert decide(stale, 2 * GIB) == (None, {ClampReason.STALE_STATS, ClampReason.DEAD_BAND})
    assert decide(stale, 4 * GIB) == (4 * GIB, set())
    missing = dataclasses.replace(guest(actual_kib=3 * GIB, last_target_kib=2 * GIB + 1), stats=None)
    assert decide(missing, 2 * GIB) == (3 * GIB, {ClampReason.MISSING_STATS})


def test_a_guest_that_lies_in_its_stats_is_not_inflated() -> None:
    liar = guest(actual_kib=3 * GIB)
    assert liar.stats is not None
    bogus = dataclasses.replace(liar.stats, mem_available_kib=9 * GIB)
    assert decide(dataclasses.replace(liar, stats=bogus), 2 * GIB) == (
        None,
        {ClampReason.IMPLAUSIBLE_STATS, ClampReason.DEAD_BAND},
    )
    huge = dataclasses.replace(liar.stats, mem_total_kib=64 * GIB)
    assert ClampReason.IMPLAUSIBLE_STATS in decide(dataclasses.replace(liar, stats=huge), 2 * GIB)[1]
    assert decide(dataclasses.replace(liar, stats=huge), 4 * GIB)[0] == 4 * GIB  # giving back is still fine


def test_dead_band_holds_small_changes() -> None:
    g = guest(actual_kib=2 * GIB, last_target_kib=2 * GIB)
    assert decide(g, 2 * GIB - 4 * MIB) == (None, {ClampReason.DEAD_BAND})
    assert decide(g, 2 * GIB - 64 * MIB)[0] == 2 * GIB - 64 * MIB


def test_auto_deflated_guest_is_met_not_fought() -> None:
    """A DEFLATE_ON_OOM guest whose actual sits above the last target deflated itself:
    the target rises to meet it and inflation waits for the cool-down."""
    g = guest(actual_kib=3 * GIB, last_target_kib=2 * GIB, deflate_on_oom=True)
    decision, memory = guard(NOW, g, 2 * GIB, rules=RULES)
    assert decision.target_kib == 3 * GIB
    assert decision.clamped_by(ClampReason.AUTO_DEFLATE)
    assert memory.backoff_until_s == NOW + RULES.auto_deflate_cooldown_s
    # Next tick, the balloon met the new target; the policy still wants less: held off.
    settled = dataclasses.replace(g, last_target_kib=3 * GIB)
    later, _ = guard(NOW + 10, settled, 2 * GIB, rules=RULES, memory=memory)
    assert later.target_kib is None  # the wish was clamped to actual, which is the last target
    fresh = dataclasses.replace(settled, stats=stats(last_update_s=memory.backoff_until_s))
    after, _ = guard(memory.backoff_until_s + 1, fresh, 2 * GIB, rules=RULES, memory=memory)
    assert after.target_kib == 3 * GIB - RULES.max_inflate_step_kib


def test_a_guest_that_cannot_reach_its_target_is_not_pushed() -> None:
    g = guest(actual_kib=3 * GIB, last_target_kib=2 * GIB)
    target, reasons = decide(g, 1 * GIB)
    assert target == 3 * GIB
    assert reasons == {ClampReason.NO_PROGRESS}


def test_a_balloon_still_moving_is_waited_for_not_backed_off() -> None:
    """A target set 1 s ago that the balloon has not reached (a guest just resumed, a slow
    TCG guest): no cool-down and no deeper target; a shallower one is never held."""
    moving = dataclasses.replace(guest(actual_kib=3 * GIB, last_target_kib=2 * GIB), last_target_age_s=1.0)
    decision, memory = guard(NOW, moving, 1 * GIB, rules=RULES)
    assert decision.target_kib is None and decision.clamped_by(ClampReason.IN_FLIGHT)
    assert memory.backoff_until_s == float("-inf")
    shallower = 3 * GIB - RULES.max_inflate_step_kib  # less deep than the move: the usual step
    assert decide(moving, int(2.5 * GIB)) == (shallower, {ClampReason.INFLATE_STEP})
    assert decide(moving, 4 * GIB) == (4 * GIB, set())
    # Past settle_s it has stopped short: the back-off of a guest with nothing to give.
    stopped = dataclasses.replace(moving, last_target_age_s=RULES.settle_s)
    assert decide(stopped, 1 * GIB) == (3 * GIB, {ClampReason.NO_PROGRESS})


def test_a_guest_still_deflating_itself_past_a_fresh_target_extends_its_back_off() -> None:
    """A DEFLATE_ON_OOM guest met at 3 GiB a moment ago that went on deflating: during the
    back-off that is one more auto-deflate, not a balloon in flight."""
    g = guest(actual_kib=3 * GIB + 256 * MIB, last_target_kib=3 * GIB, deflate_on_oom=True)
    deflating = dataclasses.replace(g, last_target_age_s=1.0)
    decision, memory = guard(NOW, deflating, 2 * GIB, rules=RULES, memory=GuardMemory(NOW + 5))
    assert decision.target_kib == deflating.actual_kib and decision.clamped_by(ClampReason.AUTO_DEFLATE)
    assert memory.backoff_until_s == NOW + RULES.auto_deflate_cooldown_s


def test_a_deflate_on_oom_balloon_that_rose_deflated_itself_however_fresh_its_target() -> None:
    """Issue 16: a target set 4 s before the guest ran out (the tick before; whether it was
    set hung on the dead band) made the guard take the auto-deflate for a balloon in flight
    and reclaim at once. A balloon moving to a lower target only falls: one that rose
    since the last step is the guest taking pages back."""
    g = guest(actual_kib=3 * GIB + 256 * MIB, last_target_kib=3 * GIB, deflate_on_oom=True)
    fresh = dataclasses.replace(g, last_target_age_s=4.0)
    decision, memory = guard(NOW, fresh, 2 * GIB, rules=RULES, memory=GuardMemory(actual_kib=3 * GIB + 64 * MIB))
    assert decision.clamped_by(ClampReason.AUTO_DEFLATE) and decision.target_kib == fresh.actual_kib
    assert memory == GuardMemory(NOW + RULES.auto_deflate_cooldown_s, fresh.actual_kib)
    # Falling toward its target (or not seen before): still in flight, as before.
    for before in (3 * GIB + 512 * MIB, fresh.actual_kib, None):
        decision, memory = guard(NOW, fresh, 2 * GIB, rules=RULES, memory=GuardMemory(actual_kib=before))
        assert decision.clamped_by(ClampReason.IN_FLIGHT) and memory.backoff_until_s == float("-inf")
    # Without DEFLATE_ON_OOM a balloon cannot deflate itself: a rise is not one.
    plain = dataclasses.replace(fresh, features=BalloonFeatures())
    decision, _ = guard(NOW, plain, 2 * GIB, rules=RULES, memory=GuardMemory(actual_kib=3 * GIB))
    assert decision.clamped_by(ClampReason.IN_FLIGHT)


def test_holds_and_the_floor_restore() -> None:
    assert decide(guest(run_state=RunState.PAUSED), 1 * GIB) == (None, {ClampReason.NOT_RUNNING})
    assert decide(guest(), 1 * GIB, excluded=True) == (None, {ClampReason.EXCLUDED})
    assert decide(guest(), None, error="boom") == (None, {ClampReason.POLICY_ERROR})
    assert decide(guest(), None) == (None, {ClampReason.NO_WISH})
    # Someone ballooned the guest below its floor behind our back: raised even on a hold.
    low = guest(actual_kib=1 * GIB, floor_kib=2 * GIB)
    assert decide(low, None) == (2 * GIB, {ClampReason.NO_WISH, ClampReason.FLOOR})


# -- invariants ---------------------------------------------------------------------

kib = st.integers(min_value=1, max_value=64 * GIB)


@st.composite
def snapshots(draw: st.DrawFn) -> GuestSnapshot:
    max_kib = draw(st.integers(min_value=64 * MIB, max_value=64 * GIB))
    actual = draw(st.integers(min_value=0, max_value=max_kib))
    s = draw(
        st.none()
        | st.builds(
            GuestStats,
            last_update_s=st.floats(min_value=-1e6, max_value=NOW + 100, allow_nan=False),
            mem_available_kib=st.none() | kib,
            mem_free_kib=st.none() | kib,
            mem_total_kib=st.none() | kib,
        )
    )
    return GuestSnapshot(
        uuid="u",
        name="g",
        max_kib=max_kib,
        actual_kib=actual,
        current_kib=actual,
        last_target_kib=draw(st.none() | st.integers(min_value=1, max_value=max_kib)),
        last_target_age_s=draw(st.none() | st.floats(min_value=0, max_value=1e6)),
        features=BalloonFeatures.from_bits(draw(st.integers(min_value=0, max_value=63))),
        stats=s,
        stats_period_s=draw(st.sampled_from([0.0, 1.0, 5.0, 60.0])),
        floor_kib=draw(st.integers(min_value=0, max_value=2 * max_kib)),
        run_state=draw(st.sampled_from(list(RunState))),
    )


@given(
    g=snapshots(),
    wish=st.none() | st.integers(min_value=-(2**40), max_value=2**40),
    backoff=st.floats(min_value=-1e9, max_value=1e9, allow_nan=False),
    excluded=st.booleans(),
    error=st.none() | st.just("boom"),
)
@settings(max_examples=500)
def test_guard_invariants(
    g: GuestSnapshot, wish: int | None, backoff: float, excluded: bool, error: str | None
) -> None:
    decision, memory = guard(NOW, g, wish, rules=RULES, memory=GuardMemory(backoff), excluded=excluded, error=error)
    target = decision.target_kib
    assert decision.wish_kib == wish
    if g.run_state is not RunState.RUNNING or excluded:
        assert target is None
        return
    if target is None:
        return
    floor = floor_kib(g, RULES)
    assert floor <= target <= g.max_kib, "never below the floor, never above the maximum"
    if target < g.actual_kib:
        assert g.actual_kib - target <= RULES.max_inflate_step_kib, "inflation bounded per tick"
        assert g.stats is not None and NOW - g.stats.last_update_s <= max(
            RULES.stale_after_periods * g.stats_period_s, RULES.stale_after_min_s
        ), "no inflation on stale or missing stats"
        assert implausible(g) is None, "no inflation on impossible stats"
        assert NOW >= memory.backoff_until_s, "no inflation during a back-off"
        assert error is None and wish is not None, "a held guest is never inflated"
    if target > g.actual_kib:
        assert target - g.actual_kib <= RULES.max_deflate_step_kib or target == floor
    if target != wish:
        assert decision.clamps, "every change to the wish is recorded"
