"""trim: squeeze, then release; a squeeze ends at the first sign of harm; what a guest
showed (bursts, OOM kills, refaults) shapes its next squeeze."""

from __future__ import annotations

from dataclasses import replace

from overcommitd.model import BalloonFeatures, GuestSnapshot, GuestStats
from policies.signals import Bursts
from policies.testing import GIB, MIB, guest, host
from policies.trim import TrimGuestState, TrimParams, TrimPolicy

MAX = 16 * GIB
USED = 1 * GIB
CACHE = 6 * GIB


def _policy(**params: object) -> TrimPolicy:
    return TrimPolicy(TrimParams(**({"warmup_s": 0.0} | params)))


def _guest(actual_kib: int = MAX, used_kib: int = USED, cache_kib: int = CACHE, **stats: int) -> GuestSnapshot:
    """A guest using ``used_kib``; the rest is ``cache_kib`` of page cache and free memory."""
    available = actual_kib - used_kib
    g = guest(
        max_kib=MAX,
        actual_kib=actual_kib,
        available_kib=available,
        caches_kib=min(cache_kib, available),
        free_kib=available - min(cache_kib, available),
        last_target_kib=actual_kib,
    )
    assert g.stats is not None
    return replace(g, stats=replace(g.stats, **stats)) if stats else g


def _step(
    policy: TrimPolicy, g: GuestSnapshot, state: TrimGuestState, at_s: float, available_pct: float = 50.0
) -> tuple[int | None, TrimGuestState]:
    total = 64 * GIB
    h = host(at_s=at_s, total_kib=total, available_kib=int(total * available_pct / 100))
    return policy.decide_guest(h, g, state)


def _squeeze(policy: TrimPolicy) -> tuple[int, TrimGuestState]:
    """A first step that starts a squeeze of a quiet guest with 6 GiB of page cache."""
    target, state = _step(policy, _guest(), TrimGuestState(), 0.0)
    assert target is not None and state.squeezing
    return target, state


def test_a_quiet_guest_is_squeezed_to_its_use_plus_margin_then_released() -> None:
    policy = _policy()
    target, state = _squeeze(policy)
    margin = max(policy.params.min_headroom_kib, MAX * policy.params.headroom_pct / 100)
    assert target == round(USED + margin)
    # the balloon moves down (the guard paces it): the squeeze goes on
    target, state = _step(policy, _guest(actual_kib=8 * GIB), state, 10.0)
    assert target == round(USED + margin) and state.squeezing
    # the balloon stops at the target: released, the whole maximum back
    target, state = _step(policy, _guest(actual_kib=8 * GIB), state, 20.0)
    assert target == MAX and not state.squeezing and state.released_s == 20.0


def test_after_a_release_no_squeeze_until_the_interval_and_a_gain() -> None:
    policy = _policy()
    _, state = _squeeze(policy)
    _, state = _step(policy, _guest(actual_kib=2 * GIB, cache_kib=0), state, 10.0)
    _, state = _step(policy, _guest(actual_kib=2 * GIB, cache_kib=0), state, 20.0)
    assert not state.squeezing
    interval = policy.params.trim_interval_s
    # the interval has passed but the guest touched nothing since: nothing to gain
    target, state = _step(policy, _guest(cache_kib=0), state, 20.0 + interval)
    assert target == MAX and not state.squeezing
    # it read 3 GiB of files meanwhile: worth a squeeze
    target, state = _step(policy, _guest(cache_kib=3 * GIB), state, 30.0 + interval)
    assert target is not None and target < MAX and state.squeezing
    # before the interval it would not have been
    early = replace(state, squeezing=False, released_s=40.0 + interval)
    target, _ = _step(policy, _guest(cache_kib=3 * GIB), early, 50.0 + interval)
    assert target == MAX


def test_a_squeeze_ends_at_once_on_swap_in_or_a_rise_in_use() -> None:
    policy = _policy()
    _, squeezing = _squeeze(policy)
    _, squeezing = _step(policy, _guest(actual_kib=10 * GIB, swap_in_kib=0), squeezing, 10.0)
    swapped = _guest(actual_kib=9 * GIB, swap_in_kib=4 * MIB)
    target, state = _step(policy, swapped, squeezing, 20.0)
    assert target == MAX and not state.squeezing
    # a rise of use by more than a quarter of the margin ends it too
    rising = _guest(actual_kib=9 * GIB, used_kib=USED + 3 * GIB, swap_in_kib=0)
    target, state = _step(policy, rising, squeezing, 20.0)
    assert target == MAX and not state.squeezing
    # a small wobble does not
    wobble = _guest(actual_kib=9 * GIB, used_kib=USED + 16 * MIB, swap_in_kib=0)
    target, state = _step(policy, wobble, squeezing, 20.0)
    assert target is not None and target < MAX and state.squeezing


def test_a_burst_is_remembered_and_kept_free_at_the_next_squeeze() -> None:
    policy = _policy()
    state = TrimGuestState()
    _, state = _step(policy, _guest(used_kib=USED), replace(state, bursts=Bursts(0.0), released_s=0.0), 10.0)
    _, state = _step(policy, _guest(used_kib=USED + 5 * GIB), state, 20.0)  # a 5 GiB leap
    assert state.bursts is not None and state.bursts.largest_rise_kib == 5 * GIB
    assert policy.keep_kib(_guest(), USED, state) == USED + round(5 * GIB * policy.params.burst_factor)


def test_after_an_oom_kill_a_guest_is_never_squeezed_again() -> None:
    policy = _policy()
    _, state = _squeeze(policy)
    g = _guest(actual_kib=8 * GIB)
    killed = replace(g, stats=replace(g.stats, oom_kills=1)) if g.stats else g
    _, state = _step(policy, replace(g, stats=replace(g.stats, oom_kills=0)) if g.stats else g, state, 10.0)
    target, state = _step(policy, killed, state, 20.0)
    assert target == MAX and state.bursts is not None and state.bursts.largest_rise_kib == MAX
    later = policy.params.trim_interval_s * 10
    target, state = _step(policy, _guest(cache_kib=12 * GIB, oom_kills=1), state, later)
    assert target == MAX and not state.squeezing


def test_refaults_after_a_squeeze_are_kept_as_hot_cache_next_time() -> None:
    policy = _policy()
    _, state = _squeeze(policy)
    _, state = _step(policy, _guest(actual_kib=2 * GIB, cache_kib=0, major_faults=100), state, 10.0)
    _, state = _step(policy, _guest(actual_kib=2 * GIB, cache_kib=0, major_faults=100), state, 20.0)
    assert not state.squeezing and state.refault_base == 100
    # 2 GiB of file pages were read back (major faults that are not swap-ins)
    refaults = 100 + 2 * GIB // 4
    at_s = 30.0 + policy.params.trim_interval_s
    target, state = _step(policy, _guest(cache_kib=5 * GIB, major_faults=refaults), state, at_s)
    assert state.squeezing and state.keep_cache_kib == 2 * GIB
    assert target == policy.keep_kib(_guest(), USED, state) and target > USED + 2 * GIB


def test_a_deflate_on_oom_guest_is_held_not_released() -> None:
    policy = _policy()
    g = replace(_guest(actual_kib=4 * GIB), features=BalloonFeatures(deflate_on_oom=True))
    state = replace(TrimGuestState(), bursts=Bursts(0.0), released_s=0.0)
    target, _ = _step(policy, g, state, 10.0)
    assert target == policy.keep_kib(g, USED, state) < MAX
    released = _policy(hold_deflate_on_oom=False)
    target, _ = _step(released, g, state, 10.0)
    assert target == MAX
    # while it is watched it is held at nothing: its maximum
    watched = TrimPolicy()
    target, _ = _step(watched, g, state, watched.params.warmup_s - 10.0)
    assert target == MAX


def test_under_host_pressure_a_released_guest_keeps_only_twice_its_keep() -> None:
    policy = _policy()
    state = replace(TrimGuestState(), bursts=Bursts(0.0), released_s=0.0)
    target, _ = _step(policy, _guest(cache_kib=0), state, 10.0, available_pct=5.0)
    assert target == 2 * policy.keep_kib(_guest(), USED, state) < MAX


def test_new_guests_are_watched_before_their_first_squeeze_and_guests_without_stats_held() -> None:
    policy = TrimPolicy()
    for first_s in (0.0, 100.0):  # a clock that starts at zero is a time like any other
        target, state = _step(policy, _guest(), TrimGuestState(), first_s)
        assert (
            target == MAX and state.bursts is not None and state.bursts.first_seen_s == first_s and not state.squeezing
        )
        target, state = _step(policy, _guest(), state, first_s + policy.params.warmup_s - 10)
        assert target == MAX and not state.squeezing
        target, state = _step(policy, _guest(), state, first_s + policy.params.warmup_s)
        assert state.squeezing
    blind = guest(max_kib=MAX, stats=False)
    assert _step(policy, blind, TrimGuestState(), 0.0) == (None, TrimGuestState())


def test_stats_without_fault_counters_still_work() -> None:
    policy = _policy()
    g = _guest()
    bare = replace(g, stats=GuestStats(last_update_s=0.0, mem_available_kib=MAX - USED, disk_caches_kib=CACHE))
    target, state = _step(policy, bare, TrimGuestState(), 0.0)
    assert state.squeezing and state.refault_base is None and target is not None and target < MAX


def test_a_rise_the_guest_has_room_for_does_not_end_a_squeeze() -> None:
    policy = _policy()
    _, squeezing = _squeeze(policy)
    # 300 MiB more use while 15 GiB are still free: a wobble, not a burst
    target, state = _step(policy, _guest(actual_kib=15 * GIB, used_kib=USED + 300 * MIB), squeezing, 10.0)
    assert target is not None and target < MAX and state.squeezing


def test_a_squeeze_cut_short_is_tried_again_after_the_interval() -> None:
    policy = _policy()
    _, squeezing = _squeeze(policy)
    _, squeezing = _step(policy, _guest(actual_kib=12 * GIB, swap_in_kib=0), squeezing, 10.0)
    target, state = _step(policy, _guest(actual_kib=11 * GIB, swap_in_kib=MIB), squeezing, 20.0)
    assert target == MAX and not state.squeezing
    assert state.cache_at_release_kib == 0  # the cache it did not reach still counts as gain
    again = 20.0 + policy.params.trim_interval_s
    target, state = _step(policy, _guest(swap_in_kib=MIB), state, again)
    assert state.squeezing and target is not None and target < MAX


def _why(
    policy: TrimPolicy, g: GuestSnapshot, state: TrimGuestState, at_s: float
) -> tuple[int | None, TrimGuestState, str]:
    h = host(at_s=at_s, total_kib=64 * GIB, available_kib=32 * GIB)
    target, state, why = policy.decide_guest_why(h, g, state)
    assert why is not None
    return target, state, why


def test_every_hold_says_why_in_words() -> None:
    policy = TrimPolicy()  # defaults: a one-hour warm-up
    _, state, why = _why(policy, _guest(), TrimGuestState(), 0.0)
    assert why.startswith("warm-up: 60 min left")
    _, state, why = _why(policy, _guest(), state, 3000.0)
    assert why.startswith("warm-up: 10 min left")
    target, state, why = _why(policy, _guest(), state, 3600.0)
    assert state.squeezing and why == f"squeeze started: keep {target // MIB} MiB"  # type: ignore[operator]
    _, state, why = _why(policy, _guest(actual_kib=8 * GIB), state, 3610.0)
    assert why.startswith("squeezing to keep")
    _, state, why = _why(policy, _guest(actual_kib=8 * GIB), state, 3620.0)  # stopped moving: released
    assert why == "squeeze stalled short of keep: released to its maximum"
    _, state, why = _why(policy, _guest(), state, 3630.0)
    assert why == "next squeeze in 360 min; released to its maximum"
    quiet = _guest(cache_kib=0)  # nothing touched since: no gain
    _, _, why = _why(policy, quiet, replace(state, released_s=-1e9, cache_at_release_kib=CACHE), 3640.0)
    assert why.startswith("gain 0 MiB below min_gain")
    blind = guest(max_kib=MAX, stats=False)
    assert policy.decide_guest_why(host(), blind, TrimGuestState())[2] == "no stats from the guest yet"


def test_after_an_oom_kill_the_reason_says_never_again() -> None:
    policy = _policy()
    g = _guest(oom_kills=0)
    _, state, _ = _why(policy, g, TrimGuestState(), 0.0)
    _, state, why = _why(policy, _guest(oom_kills=1), replace(state, squeezing=False), 10.0)
    _, state, why = _why(policy, _guest(oom_kills=1, cache_kib=12 * GIB), state, 1e7)
    assert why.startswith("OOM kill seen: never squeezed again") and not state.squeezing


def test_min_gain_scales_with_the_guest_and_an_explicit_kib_is_still_honoured() -> None:
    policy = TrimPolicy()
    small, big = guest(max_kib=512 * MIB), guest(max_kib=64 * GIB)
    assert policy.min_gain_kib(small) == policy.params.min_gain_kib == 32 * MIB  # the floor in MiB
    assert policy.min_gain_kib(big) == round(64 * GIB * policy.params.min_gain_pct / 100)
    old_style = TrimPolicy(TrimParams(min_gain_kib=256 * MIB))
    assert old_style.min_gain_kib(small) == 256 * MIB


def test_a_512_mib_guest_is_trimmed_after_warm_up_with_the_default_parameters() -> None:
    """The guest is built with policies.testing and goes through the daemon's own step
    (policy, then guard) with the default config: after the warm-up it is ballooned."""
    from overcommitd.config import DaemonConfig
    from overcommitd.loop import LoopState, step

    policy, cfg = TrimPolicy(), DaemonConfig()
    state = LoopState.initial(policy)
    at_s = 0.0
    while True:  # 400 MiB available, 300 MiB of it page cache: a typical idle small guest
        g = guest("small", at_s=at_s, max_kib=512 * MIB, available_kib=400 * MIB, caches_kib=300 * MIB)
        outcome = step(at_s, host(at_s=at_s), [g], policy, state, cfg)
        state, decision = outcome.state, outcome.decisions[0]
        if at_s < policy.params.warmup_s:
            assert decision.held and decision.policy_reason is not None
            assert decision.policy_reason.startswith("warm-up:")
        else:
            break
        at_s += 600.0
    assert decision.target_kib is not None and decision.target_kib < 512 * MIB
    assert decision.target_kib >= cfg.guard.min_guest_kib  # the guard's floor still holds
    assert decision.policy_reason is not None and decision.policy_reason.startswith("squeeze started")
