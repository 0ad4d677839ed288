"""Oracle: the per-guest policy before it ran over columns (overcommitd 134522e), kept
verbatim for ``tests/test_batch_policies.py``; not used by the daemon.

The policy's own docstring (``policies/trim.py``) says what it does and why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from overcommitd.model import GuestSnapshot, HostSnapshot
from policies.api import PerGuestPolicy
from policies.signals import PAGE_KIB, Bursts, auto_deflated, refault_count, swap_in_delta_kib, used_kib
from policies.trim import TrimParams, _mib, _minutes

MIB = 1024


@dataclass(frozen=True, slots=True)
class TrimGuestState:
    """One guest's trim cycle and what it has learned."""

    bursts: Bursts | None = None  # set at the first sample
    squeezing: bool = False
    actual_kib: int = 0  # last sample, to see a squeeze stall
    released_s: float = float("-inf")
    cache_at_release_kib: int = 0
    peak_used_kib: int = 0  # highest use since the last release
    refault_base: int | None = None  # major faults less swap-in pages, at the last release
    keep_cache_kib: int = 0  # hot page cache a squeeze leaves alone
    swap_in_total_kib: int | None = None


class TrimPolicy(PerGuestPolicy[TrimGuestState]):
    """Squeeze, then release: reclaim touched-but-idle memory, keep burst room."""

    name = "trim"
    Params = TrimParams

    def __init__(self, params: TrimParams | None = None) -> None:
        self.params = params or TrimParams()

    def initial_guest_state(self, guest: GuestSnapshot) -> TrimGuestState:
        return TrimGuestState()

    def decide_guest(
        self, host: HostSnapshot, guest: GuestSnapshot, state: TrimGuestState
    ) -> tuple[int | None, TrimGuestState]:
        target_kib, state, _why = self.decide_guest_why(host, guest, state)
        return target_kib, state

    def decide_guest_why(
        self, host: HostSnapshot, guest: GuestSnapshot, state: TrimGuestState
    ) -> tuple[int | None, TrimGuestState, str | None]:
        used = used_kib(guest)
        if used is None or guest.stats is None:
            return None, state, "no stats from the guest yet"
        now_s = host.taken_at_s
        bursts = state.bursts or Bursts(now_s)
        state, harmed = self.observe(guest, used, state, bursts)
        if bursts.warming_up(now_s, self.params.warmup_s):
            left_s = self.params.warmup_s - (now_s - bursts.first_seen_s)
            # watched: its bursts are seen before anything is taken
            return guest.max_kib, state, f"warm-up: {_minutes(left_s)} left"
        keep = self.keep_kib(guest, used, state)
        if state.squeezing:
            stalled = guest.actual_kib >= state.actual_kib  # reached keep, or the guard holds it
            if harmed or stalled:
                done = not harmed and guest.actual_kib - keep < self.min_gain_kib(guest)
                target, state = self.release(host, guest, used, keep, state, done)
                why = (
                    "squeeze ended early (swap-in, auto-deflate, OOM kill or rising use)"
                    if harmed
                    else ("squeeze done" if done else "squeeze stalled short of keep")
                )
                return target, state, f"{why}: {self.released_why(host, guest)}"
            return keep, replace(state, actual_kib=guest.actual_kib), f"squeezing to keep {_mib(keep)}"
        not_due = self.not_due(host, guest, used, keep, state)
        if not_due is None:
            state = self.start_squeeze(guest, state)
            keep = self.keep_kib(guest, used, state)
            return keep, state, f"squeeze started: keep {_mib(keep)}"
        return self.released_target(host, guest, keep), state, f"{not_due}; {self.released_why(host, guest)}"

    def observe(
        self, guest: GuestSnapshot, used: int, state: TrimGuestState, bursts: Bursts
    ) -> tuple[TrimGuestState, bool]:
        """Learn from this sample: the burst margin, the peak, and whether the guest was
        harmed (swap-in, auto-deflate, OOM kill, a rise mid-squeeze) since the last."""
        last_used = bursts.used_kib
        bursts, killed = bursts.observe(guest, used)
        swapped_kib, swap_total = swap_in_delta_kib(state.swap_in_total_kib, guest)
        deflated = auto_deflated(guest, self.params.auto_deflate_tolerance_kib)
        # a rise is alarming in proportion to the room the guest had left for it
        rise = 0 if last_used is None else used - last_used
        room_kib = 0 if last_used is None else max(0, guest.actual_kib - last_used)
        rising = rise > room_kib * self.params.abort_rise_pct / 100
        harmed = swapped_kib > 0 or killed or deflated or (state.squeezing and rising)
        state = replace(
            state, bursts=bursts, peak_used_kib=max(state.peak_used_kib, used), swap_in_total_kib=swap_total
        )
        return state, harmed

    def margin_kib(self, guest: GuestSnapshot, state: TrimGuestState) -> float:
        """Room above use a squeezed guest keeps for a burst."""
        p = self.params
        burst_kib = state.bursts.margin_kib(p.burst_factor) if state.bursts is not None else 0
        return max(p.min_headroom_kib, guest.max_kib * p.headroom_pct / 100, burst_kib)

    def keep_kib(self, guest: GuestSnapshot, used: int, state: TrimGuestState) -> int:
        """What a squeeze leaves the guest: use, burst room, hot cache; within bounds."""
        keep = round(used + self.margin_kib(guest, state) + state.keep_cache_kib)
        return min(guest.max_kib, max(guest.floor_kib, keep))

    def gain_kib(self, guest: GuestSnapshot, used: int, state: TrimGuestState) -> int:
        """Touched-but-reclaimable memory since the last release: cache growth beyond the
        hot cache kept, plus memory a burst touched and freed."""
        caches = guest.stats.disk_caches_kib if guest.stats is not None else None
        cache_growth = max(0, (caches or 0) - max(state.cache_at_release_kib, state.keep_cache_kib))
        return cache_growth + max(0, state.peak_used_kib - used)

    def min_gain_kib(self, guest: GuestSnapshot) -> int:
        """The least a squeeze must reclaim: ``min_gain_pct`` % of the guest's maximum,
        at least ``min_gain_kib`` (absolute defaults did nothing on small guests)."""
        return max(self.params.min_gain_kib, round(guest.max_kib * self.params.min_gain_pct / 100))

    def not_due(
        self, host: HostSnapshot, guest: GuestSnapshot, used: int, keep: int, state: TrimGuestState
    ) -> str | None:
        """Why no squeeze starts now, or None when one is due."""
        p = self.params
        if state.bursts is not None and state.bursts.largest_rise_kib >= guest.max_kib:
            return "OOM kill seen: never squeezed again"
        interval_s = p.trim_interval_s / 4 if self.host_pressed(host) else p.trim_interval_s
        wait_s = interval_s - (host.taken_at_s - state.released_s)
        if wait_s > 0:
            return f"next squeeze in {_minutes(wait_s)}"
        depth_kib = guest.actual_kib - keep
        min_gain = self.min_gain_kib(guest)
        if depth_kib < min_gain:
            return f"room above keep {_mib(max(0, depth_kib))} below min_gain {_mib(min_gain)}"
        gain_kib = self.gain_kib(guest, used, state)
        need_kib = max(min_gain, round(depth_kib * p.min_gain_pct_of_depth / 100))
        if gain_kib < need_kib:
            return f"gain {_mib(gain_kib)} below min_gain {_mib(need_kib)}"
        return None

    def start_squeeze(self, guest: GuestSnapshot, state: TrimGuestState) -> TrimGuestState:
        """Begin a squeeze; charge the refaults since the last release to the hot cache."""
        refaulted_kib = 0
        base = state.refault_base
        current = refault_count(guest)
        if base is not None and current is not None:
            refaulted_kib = max(0, current - base) * PAGE_KIB
        keep_cache = max(refaulted_kib, state.keep_cache_kib // 2)
        return replace(state, squeezing=True, actual_kib=guest.actual_kib, keep_cache_kib=keep_cache)

    def release(
        self, host: HostSnapshot, guest: GuestSnapshot, used: int, keep: int, state: TrimGuestState, done: bool
    ) -> tuple[int, TrimGuestState]:
        """End a squeeze. Only one that reached ``keep`` resets what the next gain is
        measured from; one cut short leaves it, so the guest is tried again."""
        state = replace(state, squeezing=False, released_s=host.taken_at_s)
        if done:
            caches = guest.stats.disk_caches_kib if guest.stats is not None else None
            state = replace(
                state,
                cache_at_release_kib=caches or 0,
                peak_used_kib=used,
                refault_base=refault_count(guest),
            )
        return self.released_target(host, guest, keep), state

    def released_target(self, host: HostSnapshot, guest: GuestSnapshot, keep: int) -> int:
        """The maximum; under host pressure, what a squeeze keeps plus as much again."""
        if self.params.hold_deflate_on_oom and guest.features.deflate_on_oom:
            return keep
        if self.host_pressed(host):
            return min(guest.max_kib, 2 * keep)
        return guest.max_kib

    def released_why(self, host: HostSnapshot, guest: GuestSnapshot) -> str:
        """Where ``released_target`` puts the guest, in words."""
        if self.params.hold_deflate_on_oom and guest.features.deflate_on_oom:
            return "deflate-on-oom guest held at keep"
        if self.host_pressed(host):
            return "host under pressure: released to twice keep"
        return "released to its maximum"

    def host_pressed(self, host: HostSnapshot) -> bool:
        """MemAvailable (with the ZFS ARC above c_min, unless ``count_arc`` is off) below target."""
        available_pct = 100 * host.available_kib(count_arc=self.params.count_arc) / host.mem_total_kib
        return available_pct < self.params.host_available_target_pct
