"""The per-guest guard as it was before the guard ran over columns (overcommitd
a355348^, ``overcommitd/guard.py``), kept verbatim as an oracle: the property test in
``test_guard_columns.py`` holds the array guard to the same decisions. Not used by the
daemon; do not change it to follow the guard - a difference is what the test is for."""

from __future__ import annotations

from overcommitd.config import GuardConfig
from overcommitd.guard import FRESH, GuardMemory
from overcommitd.model import Clamp, ClampReason, Decision, GuestSnapshot, RunState


def floor_kib(guest: GuestSnapshot, rules: GuardConfig) -> int:
    """The lowest target the guest may get: its SLA floor or the global minimum, never
    above its maximum."""
    return min(max(guest.floor_kib, rules.min_guest_kib), guest.max_kib)


def stats_problem(now_s: float, guest: GuestSnapshot, rules: GuardConfig) -> Clamp | None:
    """Why the guest's stats cannot justify inflation, or None if they can."""
    if guest.stats is None:
        return Clamp(ClampReason.MISSING_STATS, None, None, "the guest has sent no stats")
    limit_s = max(rules.stale_after_periods * guest.stats_period_s, rules.stale_after_min_s)
    age_s = now_s - guest.stats.last_update_s
    if age_s > limit_s:
        return Clamp(ClampReason.STALE_STATS, None, None, f"stats are {age_s:.0f} s old, limit {limit_s:.0f} s")
    lie = implausible(guest)
    if lie is not None:
        return Clamp(ClampReason.IMPLAUSIBLE_STATS, None, None, lie)
    return None


def implausible(guest: GuestSnapshot) -> str | None:
    """What is impossible about a guest's stats, or None. Stats come from an untrusted
    guest (Firecracker's ballooning docs say as much): a buggy or hostile driver must not
    talk the host into taking memory the guest needs."""
    s = guest.stats
    assert s is not None
    total = s.mem_total_kib
    if total is not None and total > guest.max_kib:
        return f"MemTotal {total} KiB exceeds the guest's maximum {guest.max_kib} KiB"
    for name in ("mem_available_kib", "mem_free_kib", "disk_caches_kib"):
        value = getattr(s, name)
        if value is not None and (value < 0 or total is not None and value > total):
            return f"{name} {value} KiB is outside 0..MemTotal ({total} KiB)"
    return None


def _short_of_target(guest: GuestSnapshot, rules: GuardConfig) -> bool:
    """The balloon holds less than the last target asked for."""
    last = guest.last_target_kib
    return last is not None and guest.actual_kib > last + rules.auto_deflate_tolerance_kib


def _settling(guest: GuestSnapshot, rules: GuardConfig) -> bool:
    """The last target is younger than ``settle_s``: a balloon short of it is still
    moving (a guest just resumed, a slow TCG guest), not stopped. Backing it off would
    stall the guest for the whole cooldown."""
    age_s = guest.last_target_age_s
    return age_s is not None and age_s < rules.settle_s


def guard(
    now_s: float,
    guest: GuestSnapshot,
    wish_kib: int | None,
    *,
    rules: GuardConfig,
    memory: GuardMemory = FRESH,
    excluded: bool = False,
    error: str | None = None,
) -> tuple[Decision, GuardMemory]:
    """Check one guest's wish; returns the Decision and what to remember for next time."""
    hold_reason = _hold_reason(guest, wish_kib, excluded, error)
    if hold_reason is not None:
        seen = GuardMemory(memory.backoff_until_s, guest.actual_kib)
        return _hold_or_restore_floor(guest, wish_kib, hold_reason, rules), seen
    assert wish_kib is not None
    clamps: list[Clamp] = []
    target = _clamp_range(guest, int(wish_kib), rules, clamps)
    actual = guest.actual_kib

    # Short of the last target: stopped (the guest deflated itself under DEFLATE_ON_OOM or
    # had nothing to give), or still moving to a target set within ``settle_s``. During a
    # back-off any shortfall is one more stop (a guest still deflating past the target
    # that met it a moment ago), never a balloon in flight.
    in_flight = False
    previous = memory.actual_kib
    memory = GuardMemory(memory.backoff_until_s, actual)
    if _short_of_target(guest, rules):
        # A DEFLATE_ON_OOM balloon that rose since the last step went away from its lower
        # target: the guest deflated itself, however recent the target.
        rose = guest.features.deflate_on_oom and previous is not None and actual > previous
        in_flight = now_s >= memory.backoff_until_s and _settling(guest, rules) and not rose
        if not in_flight:
            memory = GuardMemory(now_s + rules.auto_deflate_cooldown_s, actual)
    if target < actual:
        target = _check_inflate(now_s, guest, target, rules, memory, clamps, in_flight=in_flight)
    elif target > actual + rules.max_deflate_step_kib:
        stepped = max(actual + rules.max_deflate_step_kib, floor_kib(guest, rules))
        clamps.append(Clamp(ClampReason.DEFLATE_STEP, target, stepped, f"at most +{rules.max_deflate_step_kib} KiB"))
        target = stepped

    reference = guest.last_target_kib if guest.last_target_kib is not None else actual
    below_floor = reference < floor_kib(guest, rules)
    if abs(target - reference) < rules.dead_band_kib and not below_floor:
        clamps.append(Clamp(ClampReason.DEAD_BAND, target, None, f"{target - reference:+d} KiB from {reference}"))
        return Decision(guest.uuid, guest.name, None, wish_kib, tuple(clamps)), memory
    return Decision(guest.uuid, guest.name, target, wish_kib, tuple(clamps)), memory


def _hold_reason(guest: GuestSnapshot, wish_kib: int | None, excluded: bool, error: str | None) -> Clamp | None:
    if guest.run_state is not RunState.RUNNING:
        return Clamp(ClampReason.NOT_RUNNING, wish_kib, None, guest.run_state.value)
    if excluded:
        return Clamp(ClampReason.EXCLUDED, wish_kib, None, "excluded by config")
    if error is not None:
        return Clamp(ClampReason.POLICY_ERROR, None, None, error)
    if wish_kib is None:
        return Clamp(ClampReason.NO_WISH, None, None, "the policy gave no target")
    return None


def _hold_or_restore_floor(guest: GuestSnapshot, wish_kib: int | None, why: Clamp, rules: GuardConfig) -> Decision:
    """Hold, unless a running, included guest's balloon is set below its floor (someone
    ran ``virsh setmem`` behind our back, or the floor was raised): then stop it at the
    floor, or where it is if that is higher. Never inflates."""
    floor = floor_kib(guest, rules)
    current = guest.last_target_kib if guest.last_target_kib is not None else guest.actual_kib
    restorable = why.reason in (ClampReason.POLICY_ERROR, ClampReason.NO_WISH)
    if restorable and min(current, guest.actual_kib) < floor:
        target = max(floor, guest.actual_kib)
        raised = Clamp(ClampReason.FLOOR, None, target, f"set below the floor of {floor} KiB")
        return Decision(guest.uuid, guest.name, target, wish_kib, (why, raised))
    return Decision(guest.uuid, guest.name, None, wish_kib, (why,))


def _clamp_range(guest: GuestSnapshot, target: int, rules: GuardConfig, clamps: list[Clamp]) -> int:
    if target > guest.max_kib:
        clamps.append(Clamp(ClampReason.MAXIMUM, target, guest.max_kib, f"maximum {guest.max_kib} KiB"))
        target = guest.max_kib
    floor = floor_kib(guest, rules)
    if target < floor:
        clamps.append(Clamp(ClampReason.FLOOR, target, floor, f"floor {floor} KiB"))
        target = floor
    return target


def _check_inflate(
    now_s: float,
    guest: GuestSnapshot,
    target: int,
    rules: GuardConfig,
    memory: GuardMemory,
    clamps: list[Clamp],
    *,
    in_flight: bool,
) -> int:
    """Bound a target below ``actual``: refused on bad stats or during back-off, no
    deeper than a target the balloon is still moving to, else at most one inflate step."""
    actual = guest.actual_kib
    problem = stats_problem(now_s, guest, rules)
    if problem is not None:
        clamps.append(Clamp(problem.reason, target, actual, problem.detail))
        return actual
    if now_s < memory.backoff_until_s:
        reason = ClampReason.AUTO_DEFLATE if guest.features.deflate_on_oom else ClampReason.NO_PROGRESS
        detail = f"balloon stopped short of its target; no inflation for {memory.backoff_until_s - now_s:.0f} s"
        clamps.append(Clamp(reason, target, actual, detail))
        return actual
    last = guest.last_target_kib
    if in_flight and last is not None and target < last:
        detail = f"balloon still moving to {last} KiB, set {guest.last_target_age_s:.1f} s ago"
        clamps.append(Clamp(ClampReason.IN_FLIGHT, target, last, detail))
        return last
    if actual - target > rules.max_inflate_step_kib:
        stepped = actual - rules.max_inflate_step_kib
        clamps.append(Clamp(ClampReason.INFLATE_STEP, target, stepped, f"at most -{rules.max_inflate_step_kib} KiB"))
        return stepped
    return target
