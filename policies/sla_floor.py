"""``sla-floor``: give each guest its use plus a reserve, never less than its SLA floor,
and never fight a DEFLATE_ON_OOM guest that deflated itself.

The floor is the larger of the guest's own floor (``GuestSnapshot.floor_kib``: the
domain's metadata, already raised by any ``[guests.<name>] floor_kib`` in the config)
and ``floor_pct`` % of its maximum. No target this policy returns is below it.

Each step, for a guest with stats:

* ``need = use + max(reserve_pct % of use, min_reserve_kib, burst_factor x the largest
  rise of use the guest has shown between two samples)`` with ``use = actual -
  MemAvailable``. ``actual``, not MemTotal, is the base: a DEFLATE_ON_OOM guest reports an
  unchanged MemTotal while inflated (Linux commit 997e120843e8), so MemTotal would count
  the balloon as use;
* a guest that pages gets room back: ``need`` grows by the room its swap-ins and
  page-cache refaults earned (``policies.signals.Paging``, as ``share``): every KiB it
  paged, halving every ``paging_half_life_s``, doubled at once while it pages faster
  than its SLO (``slo_pct_per_min`` of its use per minute);
* the target is ``need`` within ``[floor, maximum]``, taken at most
  ``max_reclaim_step_kib`` per step (given back at once);
* a DEFLATE_ON_OOM guest whose ``actual`` is above the target we last set (by more than
  ``auto_deflate_tolerance_kib``) has deflated itself under OOM pressure, 1 MiB per OOM
  event (VIRTIO_BALLOON_OOM_NR_PAGES = 256 pages, drivers/virtio/virtio_balloon.c). That
  is pressure, not a driver fault: the target is raised to meet ``actual`` plus
  ``deflate_margin_kib``, and no target below ``actual`` is asked for ``cooldown_s``
  afterwards (the guard has the same rule; this policy also stops *wishing* for it, so
  its state does not pull the guest back down the moment the guard lets go).

A guest is watched for ``warmup_s`` before anything is taken from it, so its bursts are
seen first; after an OOM kill its burst margin becomes its whole maximum and it is not
squeezed again (``policies.signals.Bursts``: on 50 bitbrains-rnd VMs over a week, without
this the same guests were killed at every burst, 400 kills; with it 16, each VM once).

Guests without stats get their floor if they are below it, and are otherwise held.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot, Kib
from policies.api import PerGuestPolicy
from policies.signals import Bursts, Paging, auto_deflated, used_kib

MIB = 1024


class SlaFloorParams(BaseModel):
    """Knobs of the ``sla-floor`` policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    floor_pct: float = Field(0.0, ge=0, le=100, description="floor as % of the guest's maximum, if higher")
    reserve_pct: float = Field(20.0, ge=0, le=1000, description="memory kept above use, % of use (Hyper-V's buffer)")
    min_reserve_kib: Kib = Field(256 * MIB, ge=0, description="memory kept above use, at least")
    max_reclaim_step_kib: Kib = Field(128 * MIB, gt=0, description="most taken from a guest per step")
    # 2 MiB: two OOM events' worth of auto-deflate (1 MiB each), as the guard's default.
    auto_deflate_tolerance_kib: Kib = Field(2 * MIB, ge=0, description="actual above our target by more = auto-deflate")
    deflate_margin_kib: Kib = Field(64 * MIB, ge=0, description="given on top of actual after an auto-deflate")
    cooldown_s: float = Field(600.0, ge=0, description="no inflation for this long after an auto-deflate")
    burst_factor: float = Field(1.25, ge=0, le=10, description="room kept for this times the largest rise of use seen")
    warmup_s: float = Field(3600.0, ge=0, description="a new guest is watched this long before anything is taken")
    slo_pct_per_min: float = Field(
        0.2, gt=0, le=100, description="paging (swap-in + refaults), % of use per minute, before the room doubles"
    )
    paging_half_life_s: float = Field(3600.0, gt=0, description="room earned by swap-ins and refaults halves this fast")


@dataclass(frozen=True, slots=True)
class SlaGuestState:
    no_inflate_until_s: float = float("-inf")
    auto_deflates: int = 0  # how many times the guest deflated itself, for the record
    bursts: Bursts | None = None  # set at the first sample with stats
    paging: Paging | None = None  # room earned by paging, set at the first sample with stats


class SlaFloorPolicy(PerGuestPolicy[SlaGuestState]):
    """Use plus reserve, floored; backs off after an auto-deflate."""

    name = "sla-floor"
    Params = SlaFloorParams

    def __init__(self, params: SlaFloorParams | None = None) -> None:
        self.params = params or SlaFloorParams()

    def initial_guest_state(self, guest: GuestSnapshot) -> SlaGuestState:
        return SlaGuestState()

    def floor_kib(self, guest: GuestSnapshot) -> int:
        return min(guest.max_kib, max(guest.floor_kib, int(guest.max_kib * self.params.floor_pct / 100)))

    def decide_guest(
        self, host: HostSnapshot, guest: GuestSnapshot, state: SlaGuestState
    ) -> tuple[int | None, SlaGuestState]:
        target_kib, state, _why = self.decide_guest_why(host, guest, state)
        return target_kib, state

    def decide_guest_why(
        self, host: HostSnapshot, guest: GuestSnapshot, state: SlaGuestState
    ) -> tuple[int | None, SlaGuestState, str | None]:
        p, now_s, floor = self.params, host.taken_at_s, self.floor_kib(guest)
        used = used_kib(guest)
        if used is not None:
            paging = (state.paging or Paging(now_s)).observe(
                now_s, guest, used, p.slo_pct_per_min, p.paging_half_life_s, p.min_reserve_kib
            )
            state = replace(state, bursts=(state.bursts or Bursts(now_s)).observe(guest, used)[0], paging=paging)
        if auto_deflated(guest, p.auto_deflate_tolerance_kib):
            state = replace(state, no_inflate_until_s=now_s + p.cooldown_s, auto_deflates=state.auto_deflates + 1)
            target = min(guest.max_kib, max(floor, guest.actual_kib + p.deflate_margin_kib))
            return target, state, f"auto-deflated: met, no reclaim for {p.cooldown_s:.0f} s"
        if used is None or state.bursts is None:
            return (floor if guest.actual_kib < floor else None), state, "no stats from the guest yet"
        paging_kib = round(state.paging.room_kib) if state.paging is not None else 0
        reserve = max(int(used * p.reserve_pct / 100), p.min_reserve_kib, state.bursts.margin_kib(p.burst_factor))
        reserve += paging_kib
        target = max(used + reserve, guest.actual_kib - p.max_reclaim_step_kib)
        why = f"use {used // 1024} MiB + reserve {reserve // 1024} MiB"
        if now_s < state.no_inflate_until_s:
            target = max(target, guest.actual_kib)
            why = f"back-off after an auto-deflate: {state.no_inflate_until_s - now_s:.0f} s left"
        elif state.bursts.warming_up(now_s, p.warmup_s):
            target = max(target, guest.actual_kib)
            why = f"warm-up: {(p.warmup_s - (now_s - state.bursts.first_seen_s)) / 60:.0f} min left"
        return min(guest.max_kib, max(floor, target)), state, why
