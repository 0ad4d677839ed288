"""``free-page``: reclaim only what free page reporting cannot.

How it decides, per guest and per step. Let ``use = actual - MemAvailable`` (memory the
guest cannot drop), ``free`` = MemFree, ``cache = MemAvailable - free`` (page cache and
other reclaimable memory) and ``keep = max(reserve_pct % of use, min_reserve_kib)``,
the headroom the guest keeps, raised to ``burst_factor`` x the largest rise of use the
guest has shown between two samples (after an OOM kill: its whole maximum, so it is not
squeezed again; ``policies.signals.Bursts``), plus the room the guest earned by paging
(``policies.signals.Paging``, as ``share``: its swap-ins and page-cache refaults, halving
every ``paging_half_life_s``, doubled at once while it pages faster than its SLO). A guest is watched for ``warmup_s`` before
anything is taken from it. The squeezed size is ``use x (1 - idle_anon_pct/100) +
keep``: below it the guest would have to give up memory it uses.

* Without REPORTING, the guest's free memory is resident on the host, so inflating the
  balloon over free memory and excess cache both return memory: the target is the
  squeezed size.
* With REPORTING (VIRTIO_BALLOON_F_REPORTING, Linux >= 5.7), free memory in blocks of
  at least 2 MiB is reported to the host ~2 s after it is freed and discarded there
  (mm/page_reporting.c). That memory is *already* returned: a balloon inflated over it
  gains the host nothing and costs the guest its headroom. The policy counts it:
  ``reported = max(0, free - unreported_free_kib)`` (the remainder is watermarks and
  fragments below the reporting order), the host holds ``resident = actual - reported``
  for the guest, and squeezing gains ``resident - squeezed``. Because a balloon takes
  free pages before the guest evicts cache, getting any of that gain means eating the
  free memory first; the policy does it only when the gain is at least
  ``min_gain_kib``, and otherwise holds (it never deflates a reporting guest just because
  it has free memory either: that memory costs the host nothing where it is).
* Idle anonymous memory: no balloon stat says which anonymous pages are idle (the
  working-set reporting proposal, VIRTIO_BALLOON_F_WS_REPORTING, is not upstream), so
  ``idle_anon_pct`` (default 0) is an operator's estimate; it is ignored for a step in
  which the guest swapped in, since then its anonymous memory is not idle.

A guest short of ``use + keep`` is given memory back at once, reporting or not;
reclaim is at most ``max_reclaim_step_kib`` per step.

FREE_PAGE_HINT is for live migration, and a hint pass cannot be started on its own: QEMU
runs one from its precopy notifier at the start of every migration (a new command id,
the guest hands over free 4 MiB blocks, the migration skips them; virtio-balloon.md
§5.1), and the guard holds a guest that is migrating. What a policy can choose is what
to do *before* the migration, once an operator announces it (``migration_pending``,
from the daemon's ``prepare-migration`` command). For such a guest the policy weighs
what the migration will send: free memory the hint pass (or, with REPORTING, the host's
discard, which migration sends as zero pages) will skip counts like reported memory,
``hinted = max(0, free - unreported_free_kib)`` (the pass allocates with NORETRY, so it
stops near the watermarks too). So a guest with FREE_PAGE_HINT keeps its free memory as
headroom and lets the hint pass skip it, and is squeezed only when page cache beyond
its reserve would add at least ``min_gain_kib`` to the copy; a guest without the
feature is squeezed to ``use + keep`` as usual, which spares the migration its free
memory and cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot, Kib
from policies.api import PerGuestPolicy
from policies.signals import Bursts, Paging, available_kib, swap_in_delta_kib, used_kib

MIB = 1024


class FreePageParams(BaseModel):
    """Knobs of the ``free-page`` policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    reserve_pct: float = Field(10.0, ge=0, le=1000, description="headroom kept above use, % of use")
    min_reserve_kib: Kib = Field(256 * MIB, ge=0, description="headroom kept above use, at least")
    idle_anon_pct: float = Field(0.0, ge=0, le=90, description="operator's estimate of idle anonymous memory, % of use")
    # mm/page_reporting.c reports blocks of pageblock_order (2 MiB on x86-64) only, and
    # skips a zone below its low watermark + 32 blocks: 64 MiB covers a typical guest's
    # min/low watermarks and the 32-block margin.
    unreported_free_kib: Kib = Field(64 * MIB, ge=0, description="free memory reporting or a hint pass leaves")
    min_gain_kib: Kib = Field(128 * MIB, ge=0, description="squeeze a reporting guest only for at least this gain")
    max_reclaim_step_kib: Kib = Field(128 * MIB, gt=0, description="most taken from a guest per step")
    burst_factor: float = Field(1.25, ge=0, le=10, description="room kept for this times the largest rise of use seen")
    warmup_s: float = Field(3600.0, ge=0, description="a new guest is watched this long before anything is taken")
    slo_pct_per_min: float = Field(
        0.2, gt=0, le=100, description="paging (swap-in + refaults), % of use per minute, before the room doubles"
    )
    paging_half_life_s: float = Field(3600.0, gt=0, description="room earned by swap-ins and refaults halves this fast")


@dataclass(frozen=True, slots=True)
class FreePageState:
    swap_in_total_kib: int | None = None
    reported_kib: int = 0  # the memory this policy counted as already returned
    hinted_kib: int = 0  # free memory the announced migration's hint pass will skip
    bursts: Bursts | None = None  # set at the first sample with stats
    paging: Paging | None = None  # room earned by paging, set at the first sample with stats


class FreePagePolicy(PerGuestPolicy[FreePageState]):
    """Reclaim page cache and idle memory; leave alone free memory that reporting has
    returned, or that an announced migration's hint pass will skip."""

    name = "free-page"
    Params = FreePageParams

    def __init__(self, params: FreePageParams | None = None) -> None:
        self.params = params or FreePageParams()

    def initial_guest_state(self, guest: GuestSnapshot) -> FreePageState:
        return FreePageState()

    def reported_kib(self, guest: GuestSnapshot) -> int:
        """Free memory the host already has back through free page reporting."""
        return self._free_beyond_margin_kib(guest) if guest.features.reporting else 0

    def hinted_kib(self, guest: GuestSnapshot) -> int:
        """Free memory an announced migration will skip, found by QEMU's hint pass."""
        hinting = guest.migration_pending and guest.features.free_page_hint
        return self._free_beyond_margin_kib(guest) if hinting else 0

    def _free_beyond_margin_kib(self, guest: GuestSnapshot) -> int:
        if guest.stats is None or guest.stats.mem_free_kib is None:
            return 0
        return max(0, guest.stats.mem_free_kib - self.params.unreported_free_kib)

    def decide_guest(
        self, host: HostSnapshot, guest: GuestSnapshot, state: FreePageState
    ) -> tuple[int | None, FreePageState]:
        target_kib, state, _why = self.decide_guest_why(host, guest, state)
        return target_kib, state

    def decide_guest_why(
        self, host: HostSnapshot, guest: GuestSnapshot, state: FreePageState
    ) -> tuple[int | None, FreePageState, str | None]:
        p = self.params
        used, avail = used_kib(guest), available_kib(guest)
        if used is None or avail is None:
            return None, state, "no stats from the guest yet"
        swapped, swap_total = swap_in_delta_kib(state.swap_in_total_kib, guest)
        reported, hinted = self.reported_kib(guest), self.hinted_kib(guest)
        bursts, _ = (state.bursts or Bursts(host.taken_at_s)).observe(guest, used)
        paging = (state.paging or Paging(host.taken_at_s)).observe(
            host.taken_at_s, guest, used, p.slo_pct_per_min, p.paging_half_life_s, p.min_reserve_kib
        )
        next_state = FreePageState(swap_total, reported, hinted, bursts, paging)
        keep = max(int(used * p.reserve_pct / 100), p.min_reserve_kib, bursts.margin_kib(p.burst_factor))
        keep += round(paging.room_kib)
        need = min(guest.max_kib, used + keep)
        if guest.actual_kib < need:
            return need, next_state, f"short of use + reserve {need // 1024} MiB: given back"
        if bursts.warming_up(host.taken_at_s, p.warmup_s):
            left_min = (p.warmup_s - (host.taken_at_s - bursts.first_seen_s)) / 60
            return guest.actual_kib, next_state, f"warm-up: {left_min:.0f} min left"  # bursts seen before any reclaim
        idle_pct = 0.0 if swapped > 0 else p.idle_anon_pct
        squeezed = int(used * (1 - idle_pct / 100)) + keep
        skipped = max(reported, hinted)  # the same free memory, seen by either
        if skipped > 0 and guest.actual_kib - skipped - squeezed < p.min_gain_kib:
            # nothing worth taking: reporting or hinting has the free memory
            how = "free page reporting" if reported >= hinted else "the migration's free page hints"
            return guest.actual_kib, next_state, f"{how} already return its free memory; gain below min_gain"
        target = min(guest.max_kib, max(squeezed, guest.actual_kib - p.max_reclaim_step_kib))
        return target, next_state, f"use {used // 1024} MiB + reserve {keep // 1024} MiB"
