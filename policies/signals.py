"""Signals several policies derive from a snapshot, computed one way so they agree.

A guest's *use* is ``actual - MemAvailable``: page cache is reclaimable, so it is not use
(MOM's ``balloon_cur - MemFree`` counts cache as used and ratchets guests to their
maximum, CloudVAMP#6). ``actual``, not MemTotal, is the base: a DEFLATE_ON_OOM guest
reports an unchanged MemTotal while inflated (Linux commit 997e120843e8), so MemTotal -
MemAvailable would count the balloon as use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from overcommitd.model import GuestSnapshot
from overcommitd.table import BoolArray, FloatArray, GuestTable, IntArray


def available_kib(guest: GuestSnapshot) -> int | None:
    """MemAvailable (or MemFree + caches from old guests); None without stats."""
    return guest.stats.available_kib() if guest.stats is not None else None


def used_kib(guest: GuestSnapshot) -> int | None:
    """Memory the guest cannot give up without swapping; None without stats."""
    avail = available_kib(guest)
    if avail is None:
        return None
    return max(0, guest.actual_kib - min(avail, guest.actual_kib))


def used_kib_columns(guests: GuestTable) -> FloatArray:
    """``used_kib`` of every guest at once; NaN without stats (or without MemAvailable,
    MemFree)."""
    return used_kib_arrays(guests.actual_kib, guests.stats.available_kib(), guests.stats.present)


def used_kib_arrays(actual_kib: IntArray, available_kib: FloatArray, present: BoolArray) -> FloatArray:
    """``used_kib_columns`` on the columns it reads: ``available_kib`` counts where
    ``present`` (the guest sent stats)."""
    avail = np.where(present, available_kib, np.nan)
    return np.maximum(0.0, actual_kib - np.minimum(avail, actual_kib))


def smoothing_weight(dt_s: float, tau_s: float) -> float:
    """Weight of a new sample in a first-order low-pass (exponential moving average)
    with time constant ``tau_s``, for a sample ``dt_s`` after the previous one. Using the
    elapsed time rather than a fixed per-tick alpha keeps the filter's corner frequency
    (1 / (2 pi tau_s)) the same whatever the control interval or a late tick."""
    if tau_s <= 0 or dt_s <= 0:
        return 1.0 if tau_s <= 0 else 0.0
    return 1.0 - math.exp(-dt_s / tau_s)


def fast_up_slow_down(previous: float | None, sample: float, weight: float) -> float:
    """Asymmetric low-pass of a guest's use: a rise is believed at once (demand rising
    must be met now), a fall is smoothed (a burst of freed memory may not last). ESX
    smooths its active-memory estimate the same way, fast up, slow down (prior-art.md
    §5.7). Filter use, not headroom: the balloon moves headroom but not use, so the
    controller's own moves never pass through the filter's lag."""
    if previous is None or sample >= previous:
        return sample
    return previous + weight * (sample - previous)


def swap_in_delta_kib(previous_total: int | None, guest: GuestSnapshot) -> tuple[int, int | None]:
    """KiB swapped in since the last sample, and the new cumulative total. A counter that
    went backwards (guest reboot) counts as zero."""
    total = guest.stats.swap_in_kib if guest.stats is not None else None
    if total is None:
        return 0, previous_total
    if previous_total is None or total < previous_total:
        return 0, total
    return total - previous_total, total


def oom_killed(previous_total: int | None, guest: GuestSnapshot) -> tuple[bool, int | None]:
    """Whether the guest OOM-killed since the last sample (stat tag 10, Linux >= 6.12),
    and the cumulative total to keep. A guest that does not report the counter was not
    seen to kill; the last total is kept."""
    total = guest.stats.oom_kills if guest.stats is not None else None
    if total is None:
        return False, previous_total
    return previous_total is not None and total > previous_total, total


# Linux before 6.12 sends no OOM-kill counter (tag 10; sim.memory.stat_tags), and libvirt drops
# it anyway. A kill then shows as a guest at the end of its memory whose use collapses by
# the next sample: the OOM killer frees its victim's whole working set at once (issue 16:
# the real 6.1 guest went from MemAvailable ~0 to its idle use within one 2 s sample).
OOM_EXHAUSTED_PCT = 2.0  # MemAvailable under this share of the guest's memory: exhausted
OOM_COLLAPSE_PCT = 25.0  # then use falling by at least this share of its memory: a kill


def exhausted(guest: GuestSnapshot) -> bool:
    """The guest had next to nothing left: MemAvailable under OOM_EXHAUSTED_PCT of ``actual``."""
    avail = available_kib(guest)
    return avail is not None and avail * 100 < guest.actual_kib * OOM_EXHAUSTED_PCT


def oom_inferred(was_exhausted: bool, previous_used_kib: int | None, used: int, guest: GuestSnapshot) -> bool:
    """A kill seen without the counter: exhausted at the last sample, use collapsed since."""
    if not was_exhausted or previous_used_kib is None:
        return False
    return (previous_used_kib - used) * 100 >= guest.actual_kib * OOM_COLLAPSE_PCT


def auto_deflated(guest: GuestSnapshot, tolerance_kib: int) -> bool:
    """A DEFLATE_ON_OOM guest holding more than the last target asked for by over
    ``tolerance_kib``: it deflated itself under OOM pressure (1 MiB per OOM notification)."""
    last = guest.last_target_kib
    return guest.features.deflate_on_oom and last is not None and guest.actual_kib > last + tolerance_kib


@dataclass(frozen=True, slots=True)
class Bursts:
    """What a guest has shown of its bursts, kept from step to step.

    The largest rise of use between two samples is never lowered: bitbrains-rnd has
    guests that idle for days at 1 % of their RAM and then leap to 50-90 % within one
    5-minute sample, and a guest squeezed to its use plus a fixed reserve is OOM-killed
    by the next such leap before any control loop can act. After an OOM kill the rise
    becomes the guest's whole maximum: it showed it needs more than any margin we can
    reason about, so it is not squeezed again. ``first_seen_s`` starts a warm-up in
    which a policy only watches, so the bursts of a guest are seen before anything is
    taken from it.
    """

    first_seen_s: float
    used_kib: int | None = None  # the last sample's use, for the next rise
    largest_rise_kib: int = 0
    oom_kills_total: int | None = None
    exhausted: bool = False  # the last sample's guest had next to nothing left

    def observe(self, guest: GuestSnapshot, used: int) -> tuple[Bursts, bool]:
        """This sample learned from, and whether the guest OOM-killed since the last:
        from the counter when the guest sends it, else from a collapse of use."""
        rise = 0 if self.used_kib is None else used - self.used_kib
        killed, kills = oom_killed(self.oom_kills_total, guest)
        if guest.stats is not None and guest.stats.oom_kills is None:
            killed = oom_inferred(self.exhausted, self.used_kib, used, guest)
        largest = guest.max_kib if killed else max(self.largest_rise_kib, rise)
        return Bursts(self.first_seen_s, used, largest, kills, exhausted(guest)), killed

    def warming_up(self, now_s: float, warmup_s: float) -> bool:
        return now_s - self.first_seen_s < warmup_s

    def margin_kib(self, factor: float) -> int:
        """Room for the largest burst seen, ``factor`` times over."""
        return round(self.largest_rise_kib * factor)


PAGE_KIB = 4


def refault_count(guest: GuestSnapshot) -> int | None:
    """Major faults that were not swap-ins: page-cache refaults, in pages."""
    stats = guest.stats
    if stats is None or stats.major_faults is None:
        return None
    return stats.major_faults - (stats.swap_in_kib or 0) // PAGE_KIB


# What share of a guest's paging SLO error budget a policy lets it spend before its paging
# room stops shrinking. Half: the policy measures against the guest's use now, the SLO
# against its mean working set over the span, and the host's own swap (which the policy
# does not see) is charged to the same budget; half is kept for those. An error budget
# spent this way is the SRE practice of slowing risky changes once a share of the budget
# is gone (Beyer et al., "Site Reliability Engineering", O'Reilly 2016, ch. 3).
SLO_BUDGET_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class Paging:
    """Room a guest earned by paging, kept from step to step.

    The room grows by every KiB the guest swapped in or refaulted from page cache since
    the last sample and halves every ``half_life_s``: a refault is a page the guest would
    have kept with that much more memory (mm/workingset.c), so the room follows the
    guest's measured shortage, with no constant fitted to a trace. A guest paging at its
    SLO's rate or faster (``slo_pct_per_min`` of its use per minute; Google's far-memory
    SLO of 0.2 %, Lagar-Cavilla et al., ASPLOS 2019) has its room doubled at once
    (multiplicative increase, as TCP's congestion window).

    The SLO bounds a rate *on average*, so a guest that pages in bursts (a job re-reading
    its files every few hours) can stay under the per-sample rate and still breach it
    over a day: the room it earned halves away between the bursts, the cache is taken
    again, and the next burst refaults it again. So the guest's paging and its allowance
    are also summed over ``window_s`` (exponentially forgotten, the SLO's window; 0, the
    default, keeps no budget): while it has spent more than ``SLO_BUDGET_SHARE`` of that
    error budget, its room does not shrink.

    Paging while the balloon is empty (``actual`` at the maximum) earns nothing: the
    guest would page the same on a host of its own, so it is its workload's, not a
    shortage a balloon made (the scorecard leaves it out of the SLO for the same reason).
    """

    seen_s: float
    swap_in_total_kib: int | None = None
    refault_total: int | None = None  # major faults less swap-in pages, cumulative
    room_kib: float = 0.0
    paged_window_kib: float = 0.0  # paging over the SLO window, forgotten exponentially
    allowed_window_kib: float = 0.0  # what the SLO allowed over the same window

    def observe(
        self,
        now_s: float,
        guest: GuestSnapshot,
        used: int,
        slo_pct_per_min: float,
        half_life_s: float,
        min_room_kib: int,
        window_s: float = 0.0,
    ) -> Paging:
        """This sample's swap-ins and refaults learned from; ``window_s`` 0: no error
        budget kept (the room halves whatever the guest spent)."""
        swapped_kib, swap_total = swap_in_delta_kib(self.swap_in_total_kib, guest)
        refaults = refault_count(guest)
        refaulted_kib = 0
        if refaults is not None and self.refault_total is not None and refaults >= self.refault_total:
            refaulted_kib = (refaults - self.refault_total) * PAGE_KIB
        dt_s = max(0.0, now_s - self.seen_s)
        # A guest with its balloon empty pages as it would on a host of its own: that is
        # its workload's, which no room can help (and the SLO does not count it).
        paged_kib = 0 if guest.actual_kib >= guest.max_kib else swapped_kib + refaulted_kib
        allowed_kib = used * slo_pct_per_min / 100 * dt_s / 60
        keep = math.exp(-dt_s / window_s) if window_s > 0 else 0.0
        paged_window = self.paged_window_kib * keep + paged_kib
        allowed_window = self.allowed_window_kib * keep + allowed_kib
        if paged_kib > 0 and paged_kib >= allowed_kib:
            room = max(2 * self.room_kib, self.room_kib + paged_kib, min_room_kib)
        elif window_s > 0 and paged_window > SLO_BUDGET_SHARE * allowed_window:
            room = self.room_kib + paged_kib  # spending its error budget: keep what it earned
        else:
            room = self.room_kib * 0.5 ** (dt_s / half_life_s) + paged_kib
        room = min(room, float(guest.max_kib))
        return Paging(now_s, swap_total, refaults, room, paged_window, allowed_window)
