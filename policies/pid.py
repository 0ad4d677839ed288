"""``pid``: hold each guest's available-memory headroom at a set-point with a PI controller
(no derivative term: the stats are too noisy to differentiate), and let host pressure
tighten or relax that set-point.

Inner loop, per guest and per step:

* the measurement is the guest's headroom, ``actual - use`` with ``use = actual -
  MemAvailable`` (cache-aware, never MemFree alone). Use is low-passed *fast up, slow
  down* with time constant ``filter_tau_s``: a rise is acted on at once, a fall only
  once it lasts (balloon stats are noisy: a freed buffer or a cache flush makes use dip
  for one sample). Use, not headroom, is filtered, because the balloon moves headroom
  but not use: the controller's own moves never pass through the filter's lag;
* the set-point is ``max(min_headroom_kib, headroom_pct % of use, min_headroom_pct_of_max
  % of the guest's maximum) x host_scale``. The last term is for large guests idling
  at a small use: their bursts scale with their size, not with their idle use;
* error ``e = headroom - set-point`` (KiB; positive means the guest has memory to
  spare); swap-in since the last sample counts against the error ``swap_in_weight``
  times over, since a guest that swaps is short whatever MemAvailable says;
* output ``u = kp x e + I``, the target is ``actual - u`` (we start from what the guest
  has, not from what we asked last). ``kp`` is ``kp_reclaim`` when taking and the larger
  ``kp_return`` when giving back: reclaim slowly, give back fast;
* anti-windup: the integral only accumulates while the output is not saturated (step
  cap, floor, maximum) and the error is within ``integral_band_kib`` of the set-point,
  is clamped to ``integral_limit_kib``, and is cleared when the error changes sign. It
  removes the steady lag of P alone on a slow ramp (``rate / kp``) without winding up
  during a large move, so a step settles without overshoot beyond a few MiB.

The plant is nearly a pure gain (taking X KiB from a guest lowers its MemAvailable by
about X), so any ``kp`` in (0, 1] converges monotonically on a step; ``kp_return = 1``
closes a shortfall in one step (the guard still paces it).

Outer loop, once per step for the host: pressure is the larger of how far host
MemAvailable is below ``host_available_target_pct`` and how far PSI ``some`` avg10 is
above ``host_psi_target_pct`` (each as a fraction of its target, capped at 1). Under
pressure ``host_scale`` shrinks by ``host_gain`` x pressure per step down to
``min_setpoint_scale`` (guests keep less headroom); without it, it relaxes back toward
1 at the same rate. It is bounded at both ends, so it cannot wind up either.

The set-point is never below ``burst_factor`` x the largest rise of use the guest has
shown between two samples (``policies.signals.Bursts``, not scaled by host pressure:
a burst does not shrink because the host is short). After an OOM kill in the guest (the
``oom_kills`` stat, Linux >= 6.12, went up) the guest demonstrably needed more than it
had, by an unknown amount: that rise becomes its whole maximum, so it gets its maximum
back and is not reclaimed from again. After an auto-deflate of a DEFLATE_ON_OOM guest
(``actual`` above the target last set) we know what it needed: no target below that
``actual`` for ``oom_hold_s``. Without these a guest whose demand leaps in bursts is
squeezed again after each burst and killed again at the next (bitbrains-rnd has guests
idling at 1 % of their RAM that leap to 90 % within one 5-minute sample).

A guest that pages gets room back: the set-point grows by the room its swap-ins and
page-cache refaults earned (``policies.signals.Paging``, as ``share``: every KiB paged,
halving every ``paging_half_life_s``, doubled at once while it pages faster than its
SLO), not scaled by host pressure either.

A guest first seen less than ``warmup_s`` ago is watched, not reclaimed from (memory is
still given back): its use filter and its burst memory learn the peaks it shows
meanwhile.

Guests without stats are held.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot, Kib
from policies.api import PolicyResult
from policies.signals import (
    Bursts,
    Paging,
    auto_deflated,
    fast_up_slow_down,
    smoothing_weight,
    swap_in_delta_kib,
    used_kib,
)

MIB = 1024


class PidParams(BaseModel):
    """Knobs of the ``pid`` policy; the defaults are what ``overcommitd tune`` starts from."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    headroom_pct: float = Field(10.0, ge=0, le=200, description="headroom set-point, % of the guest's use")
    min_headroom_kib: Kib = Field(256 * MIB, ge=0, description="headroom set-point at least this")
    min_headroom_pct_of_max: float = Field(
        10.0, ge=0, le=100, description="... and at least this % of the guest's maximum"
    )
    kp_reclaim: float = Field(0.3, gt=0, le=1, description="share of spare headroom taken per step")
    kp_return: float = Field(1.0, gt=0, le=2, description="share of missing headroom given back per step")
    ki_per_s: float = Field(0.001, ge=0, le=0.1, description="integral gain, per second")
    integral_limit_kib: Kib = Field(512 * MIB, ge=0, description="anti-windup clamp on the integral term")
    integral_band_kib: Kib = Field(64 * MIB, ge=0, description="integrate only while |error| is below this")
    filter_tau_s: float = Field(3600.0, ge=0, description="low-pass time constant for falling use")
    max_reclaim_step_kib: Kib = Field(128 * MIB, gt=0, description="most taken from a guest per step")
    swap_in_weight: float = Field(1.0, ge=0, le=100, description="KiB of headroom error per KiB swapped in")
    host_available_target_pct: float = Field(10.0, ge=0, le=100, description="host MemAvailable below this is pressure")
    host_psi_target_pct: float = Field(1.0, gt=0, le=100, description="host PSI some avg10 above this is pressure")
    count_arc: bool = Field(True, description="count the ZFS ARC above c_min as available host memory")
    host_gain: float = Field(0.05, ge=0, le=1, description="host_scale change per step at full pressure")
    min_setpoint_scale: float = Field(0.5, gt=0, le=1, description="most the host loop may tighten the set-point")
    burst_factor: float = Field(1.25, ge=0, le=10, description="headroom at least this times the largest rise of use")
    oom_hold_s: float = Field(86400.0, ge=0, description="no reclaim below what a guest took back for this long")
    auto_deflate_tolerance_kib: Kib = Field(
        2 * MIB, ge=0, description="actual above last target by more = auto-deflate"
    )
    warmup_s: float = Field(3600.0, ge=0, description="watch a new guest this long before reclaiming from it")
    slo_pct_per_min: float = Field(
        0.2, gt=0, le=100, description="paging (swap-in + refaults), % of use per minute, before the room doubles"
    )
    paging_half_life_s: float = Field(3600.0, gt=0, description="room earned by swap-ins and refaults halves this fast")


@dataclass(frozen=True, slots=True)
class PidGuestState:
    """One guest's controller memory."""

    at_s: float
    used_kib: float  # filtered use (actual - MemAvailable)
    integral_kib: float = 0.0
    swap_in_total_kib: int | None = None  # cumulative counter, for the delta
    hold_until_s: float = float("-inf")  # until then no target below hold_floor_kib
    hold_floor_kib: int = 0  # after an auto-deflate: what the guest took back
    bursts: Bursts | None = None  # set at the first sample
    paging: Paging | None = None  # room earned by paging, set at the first sample


@dataclass(frozen=True, slots=True)
class PidState:
    host_scale: float = 1.0
    guests: Mapping[str, PidGuestState] = field(default_factory=dict)


class PidPolicy:
    """Per-guest PI controller on headroom with a host-pressure outer loop."""

    name = "pid"
    Params = PidParams

    def __init__(self, params: PidParams | None = None) -> None:
        self.params = params or PidParams()

    def initial_state(self) -> PidState:
        return PidState()

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: PidState) -> PolicyResult[PidState]:
        scale = self.host_scale(host, state.host_scale)
        targets: dict[str, int] = {}
        errors: dict[str, str] = {}
        reasons: dict[str, str] = {}
        next_guests: dict[str, PidGuestState] = {}
        for guest in guests:
            previous = state.guests.get(guest.uuid)
            try:
                target_kib, guest_state = self.decide_guest(host.taken_at_s, guest, previous, scale)
            except Exception as e:  # noqa: BLE001 - one bad guest is held, the others go on
                errors[guest.uuid] = f"{type(e).__name__}: {e}"
                target_kib, guest_state = None, previous
            if guest_state is not None:
                next_guests[guest.uuid] = guest_state
            if target_kib is not None and guest.uuid not in errors:
                targets[guest.uuid] = target_kib
            if guest.uuid not in errors:
                reasons[guest.uuid] = self.why(host.taken_at_s, guest, guest_state, scale)
        return PolicyResult(targets, PidState(scale, next_guests), errors, reasons)

    def why(self, now_s: float, guest: GuestSnapshot, gs: PidGuestState | None, scale: float) -> str:
        """What ``decide_guest`` did, in words: the first of no stats, warm-up, the hold
        after an auto-deflate, or the set-point it steers to."""
        p = self.params
        if gs is None or gs.at_s != now_s:
            return "no stats from the guest yet"
        if gs.bursts is not None and gs.bursts.warming_up(now_s, p.warmup_s):
            return f"warm-up: {(p.warmup_s - (now_s - gs.bursts.first_seen_s)) / 60:.0f} min left"
        if now_s < gs.hold_until_s:
            return f"held after an auto-deflate: {gs.hold_until_s - now_s:.0f} s left"
        burst_kib = gs.bursts.margin_kib(p.burst_factor) if gs.bursts is not None else 0
        setpoint = self.setpoint_kib(gs.used_kib, scale, guest.max_kib, burst_kib)
        setpoint += gs.paging.room_kib if gs.paging is not None else 0.0
        return f"steering free memory to {setpoint / 1024:.0f} MiB (use {gs.used_kib / 1024:.0f} MiB)"

    def host_pressure(self, host: HostSnapshot) -> float:
        """0 (none) .. 1 (full): the worse of low MemAvailable (with the ARC the host can
        drop, unless ``count_arc`` is off) and high PSI."""
        p = self.params
        pressure = 0.0
        if p.host_available_target_pct > 0:
            available_pct = 100 * host.available_kib(count_arc=p.count_arc) / host.mem_total_kib
            short = (p.host_available_target_pct - available_pct) / p.host_available_target_pct
            pressure = max(pressure, short)
        if host.psi is not None:
            pressure = max(pressure, (host.psi.some_avg10 - p.host_psi_target_pct) / p.host_psi_target_pct)
        return min(1.0, max(0.0, pressure))

    def host_scale(self, host: HostSnapshot, previous: float) -> float:
        """Outer loop: tighten the set-point under host pressure, relax without it."""
        p = self.params
        pressure = self.host_pressure(host)
        scale = previous - p.host_gain * pressure if pressure > 0 else previous + p.host_gain
        return min(1.0, max(p.min_setpoint_scale, scale))

    def setpoint_kib(self, used: float, scale: float, max_kib: int = 0, burst_kib: int = 0) -> float:
        p = self.params
        scaled = max(p.min_headroom_kib, used * p.headroom_pct / 100, max_kib * p.min_headroom_pct_of_max / 100) * scale
        return max(scaled, burst_kib)

    def decide_guest(
        self, now_s: float, guest: GuestSnapshot, previous: PidGuestState | None, scale: float
    ) -> tuple[int | None, PidGuestState | None]:
        """Inner loop for one guest: (target or None to hold, next state)."""
        p = self.params
        raw_used = used_kib(guest)
        if raw_used is None:
            return None, previous
        dt_s = 0.0 if previous is None else max(0.0, now_s - previous.at_s)
        weight = smoothing_weight(dt_s, p.filter_tau_s)
        used = fast_up_slow_down(None if previous is None else previous.used_kib, float(raw_used), weight)
        headroom = guest.actual_kib - used
        swapped_kib, swap_total = swap_in_delta_kib(None if previous is None else previous.swap_in_total_kib, guest)
        bursts, _ = (previous.bursts if previous and previous.bursts else Bursts(now_s)).observe(guest, raw_used)
        paging = (previous.paging if previous and previous.paging else Paging(now_s)).observe(
            now_s, guest, raw_used, p.slo_pct_per_min, p.paging_half_life_s, p.min_headroom_kib
        )
        setpoint = self.setpoint_kib(used, scale, guest.max_kib, bursts.margin_kib(p.burst_factor))
        setpoint += paging.room_kib
        error = headroom - setpoint - p.swap_in_weight * swapped_kib

        integral = 0.0 if previous is None else previous.integral_kib
        if integral * error < 0:
            integral = 0.0  # error changed sign: drop the stale integral instead of overshooting
        proposed = integral + p.ki_per_s * error * dt_s
        proposed = max(-p.integral_limit_kib, min(p.integral_limit_kib, proposed))
        kp = p.kp_reclaim if error > 0 else p.kp_return
        output = kp * error + proposed
        take_kib = min(output, p.max_reclaim_step_kib)
        target = round(guest.actual_kib - take_kib)
        bounded = min(guest.max_kib, max(guest.floor_kib, target))
        saturated = take_kib != output or bounded != target
        if not saturated and abs(error) < p.integral_band_kib:
            integral = proposed  # conditional integration: no windup while the output is capped
        hold_until_s, hold_floor = self.hold(now_s, guest, previous)
        if now_s < hold_until_s and bounded < hold_floor:
            bounded, integral = hold_floor, 0.0
        if bursts.warming_up(now_s, p.warmup_s) and bounded < guest.actual_kib:
            bounded, integral = guest.actual_kib, 0.0
        return bounded, PidGuestState(now_s, used, integral, swap_total, hold_until_s, hold_floor, bursts, paging)

    def hold(self, now_s: float, guest: GuestSnapshot, previous: PidGuestState | None) -> tuple[float, int]:
        """(until when, at least what) a DEFLATE_ON_OOM guest is held after it took
        memory back from the balloon: what it took, for ``oom_hold_s``."""
        until_s, floor = (float("-inf"), 0) if previous is None else (previous.hold_until_s, previous.hold_floor_kib)
        if not auto_deflated(guest, self.params.auto_deflate_tolerance_kib):
            return until_s, floor
        return now_s + self.params.oom_hold_s, max(guest.actual_kib, floor if now_s < until_s else 0)
