"""``share``: split the host's memory among its guests so the host can never be over-full.

``trim`` releases every guest to its whole maximum between squeezes: a guest can touch
all of it, so at high overcommit a few guests bursting at once push the host past its
RAM. ``share`` instead gives each guest a *target* and keeps the sum of the targets
within what the host can back, so however the guests burst, what they can touch fits.

Each step, per guest with stats:

* **need** = use (``actual - MemAvailable``) + a burst margin + paging room. The margin
  is the largest of ``min_headroom_kib``, ``headroom_pct`` % of its maximum and
  ``burst_factor`` x the largest rise of use the guest has shown between two samples
  (``policies.signals.Bursts``: the guest's own history, never lowered, and the whole
  maximum after an OOM kill). Paging room grows by every KiB the guest swapped in or
  refaulted from page cache since the last sample, and halves every
  ``paging_half_life_s`` (a day: the SLO is judged over a day, and a job that re-reads
  its files every few hours must find them still cached): a refault is a page the guest would have kept with that much
  more memory (the kernel's own reading of a refault, mm/workingset.c), so the room
  follows the guest's measured shortage, with no constant fitted to a trace. A guest
  paging at its SLO's rate (``slo_pct_per_min``, Google's far-memory SLO of 0.2 % of
  the working set per minute, Lagar-Cavilla et al., ASPLOS 2019) or faster has its room
  doubled at once (multiplicative increase, as TCP's congestion window): a workload
  restarted after an OOM kill and killed again before a sample shows its use is seen
  only as paging. During
  ``warmup_s`` after a guest is first seen it needs its whole maximum (it is watched,
  as in ``trim``), but gives like any other when the host is short.
* **what the guest must keep** (``hard``): use plus the smaller margin
  (``min_headroom_kib`` / ``headroom_pct``) plus its paging room, at least its floor.
  The paging room is measured working set (pages the guest needed again), not a
  margin for what might come: taking it back when the host is short would only make
  the guest refault it again, against its SLO, so the others give instead.

The **budget** for all targets is a lower bound of what the guests hold in host RAM now
(``actual - MemFree`` each: memory a guest uses or caches was touched) plus the host's
MemAvailable less ``reserve_pct`` % of its RAM. If every guest touched its whole
target, the host would be at most ``100 - reserve_pct`` % full: the bound holds by
construction rather than by watching a trend. (Free pages a guest touched and freed are
not counted, which only errs on the safe side; a balloon inflating takes them first and
the host's MemAvailable grows by as much.) Guests without stats are held and not
counted.

Then:

* **budget above the sum of needs**: the surplus goes to the guests in proportion to
  ``weight x maximum`` (water-filling: a guest never gets above its maximum, the rest
  goes to the others), so each guest has room beyond its need for page cache and
  bursts, as much as the host can back;
* **budget below**: the host is short. Guests give from their need down to ``hard``,
  the lowest ``weight`` first (within one weight, in proportion to what each can give);
  if even that is not enough, every guest is at ``hard`` and the reason says by how
  much the host is short ("host short by N GiB"): no balloon can help then.

A DEFLATE_ON_OOM guest that deflated itself is met (its target is at least its
``actual``): the guest is short, so fighting it would only make it swap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot, Kib
from policies.api import PolicyResult
from policies.signals import Bursts, Paging, auto_deflated, used_kib

MIB = 1024
GIB = 1024 * MIB
# The paging SLO's window: the scorecard judges it over the scored day, and Google's
# far-memory SLO is a rate sustained over time, not per sample (Lagar-Cavilla et al.).
SLO_WINDOW_S = 86400.0


class ShareParams(BaseModel):
    """Knobs of the ``share`` policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    reserve_pct: float = Field(
        3.0, ge=0, lt=100, description="host RAM kept out of the guests' budget: its own caches and a tick's slack"
    )
    warmup_s: float = Field(3600.0, ge=0, description="a new guest needs its whole maximum this long")
    min_headroom_kib: Kib = Field(64 * MIB, ge=0, description="free memory a guest keeps at least")
    headroom_pct: float = Field(5.0, ge=0, le=100, description="... and at least this % of its maximum")
    burst_factor: float = Field(1.25, ge=0, le=10, description="need: this times the largest rise of use seen")
    multiplex: bool = Field(
        True,
        description="book the guests' burst margins as independent (root-sum-square) while the host has "
        "twice its reserve free; the plain sum as the host nears it",
    )
    host_window_s: float = Field(
        3600.0, gt=0, description="the host's own memory is the least seen over one to two of these"
    )
    slo_pct_per_min: float = Field(
        0.2,
        gt=0,
        le=100,
        description="paging (swap-in + refaults) a guest may do, % of its use per minute, before its room doubles",
    )
    # A day: the paging SLO is judged over a day, and hosted workloads re-read their data
    # on daily cycles (cron jobs, backups, batch runs hours apart); room that halved away
    # within an hour was taken again before the next run and refaulted again.
    paging_half_life_s: float = Field(
        86400.0, gt=0, description="room earned by swap-ins and refaults halves this fast"
    )
    count_arc: bool = Field(True, description="count the ZFS ARC above c_min as available host memory")
    auto_deflate_tolerance_kib: Kib = Field(
        2 * MIB, ge=0, description="actual above last target by more = auto-deflate"
    )


@dataclass(frozen=True, slots=True)
class ShareGuestState:
    """What ``share`` has learned of one guest."""

    bursts: Bursts
    paging: Paging  # the room swap-ins and refaults earned, and the SLO budget spent


@dataclass(frozen=True, slots=True)
class Claim:
    """One guest's claim on the budget this step (KiB)."""

    uuid: str
    need_kib: int
    hard_kib: int
    max_kib: int
    weight: float


@dataclass(frozen=True, slots=True)
class HostOther:
    """An upper bound of the host's memory that is not the guests' (its base, QEMU's own
    memory, guests without stats): ``host used - what the guests hold`` over-counts it by
    the free pages guests touched, so the least value seen is the tightest bound. The
    least over the last one-to-two ``window_s`` (two buckets), so a host whose own use
    grows is followed within two windows; a change in the set of guests starts over."""

    guests: tuple[str, ...]  # sorted uuids
    bucket_start_s: float
    current_kib: float
    previous_kib: float = math.inf

    def estimate_kib(self) -> float:
        return min(self.current_kib, self.previous_kib)

    def observe(self, now_s: float, guests: tuple[str, ...], sample_kib: float, window_s: float) -> HostOther:
        if guests != self.guests:
            return HostOther(guests, now_s, sample_kib)
        if now_s - self.bucket_start_s >= window_s:
            return HostOther(guests, now_s, sample_kib, self.current_kib)
        return replace(self, current_kib=min(self.current_kib, sample_kib))


@dataclass(frozen=True, slots=True)
class ShareState:
    """Per guest what ``share`` learned, and the host's own memory."""

    guests: Mapping[str, ShareGuestState]
    host_other: HostOther | None = None


def held_kib(guest: GuestSnapshot, used: int) -> int:
    """A lower bound of the guest memory the host backs: ``actual - MemFree`` (what the
    guest uses or caches was touched), at least its use."""
    free = guest.stats.mem_free_kib if guest.stats is not None else None
    return used if free is None else max(used, guest.actual_kib - min(free, guest.actual_kib))


def multiplexed_kib(claims: Sequence[Claim]) -> float:
    """How much less room the guests' bursts need together than one by one: independent
    bursts add like variances, so the room for all at once is the root of the sum of
    squared margins rather than their sum (statistical multiplexing, as in Kelly's
    effective bandwidths, "Notes on effective bandwidths", 1996)."""
    margins = [float(c.need_kib - c.hard_kib) for c in claims]
    return sum(margins) - math.sqrt(sum(m * m for m in margins))


def fill(budget_kib: float, claims: Sequence[Claim]) -> dict[str, float]:
    """Targets for ``claims`` summing to ``budget_kib`` where possible: above the sum of
    needs, the surplus by ``weight x max`` up to each maximum; below it, the lowest
    weight gives first, down to ``hard``."""
    need_total = sum(c.need_kib for c in claims)
    if budget_kib >= need_total:
        return _share_surplus(budget_kib - need_total, claims)
    return _take_shortage(need_total - budget_kib, claims)


def _share_surplus(surplus_kib: float, claims: Sequence[Claim]) -> dict[str, float]:
    """Water-filling: each guest gets ``rate x weight x max`` above its need, capped at
    its maximum; the guests that reach it leave their part to the others."""
    out = {c.uuid: float(c.need_kib) for c in claims}
    open_claims = [c for c in claims if c.max_kib > c.need_kib]
    open_claims.sort(key=lambda c: (c.max_kib - c.need_kib) / (c.weight * c.max_kib))
    shares_total = sum(c.weight * c.max_kib for c in open_claims)
    for c in open_claims:
        if shares_total <= 0 or surplus_kib <= 0:
            break
        share = c.weight * c.max_kib
        extra = min(float(c.max_kib - c.need_kib), surplus_kib * share / shares_total)
        out[c.uuid] += extra
        surplus_kib -= extra
        shares_total -= share
    return out


def _take_shortage(short_kib: float, claims: Sequence[Claim]) -> dict[str, float]:
    """Take ``short_kib`` from the needs, lowest weight first, down to ``hard``."""
    out = {c.uuid: float(c.need_kib) for c in claims}
    for weight in sorted({c.weight for c in claims}):
        if short_kib <= 0:
            break
        group = [c for c in claims if c.weight == weight]
        can_give = sum(max(0, c.need_kib - c.hard_kib) for c in group)
        if can_give <= 0:
            continue
        fraction = min(1.0, short_kib / can_give)
        for c in group:
            out[c.uuid] -= max(0, c.need_kib - c.hard_kib) * fraction
        short_kib -= can_give * fraction
    return out


class SharePolicy:
    """Targets that sum to what the host can back; weights decide who gives first."""

    name: ClassVar[str] = "share"
    Params = ShareParams

    def __init__(self, params: ShareParams | None = None) -> None:
        self.params = params or ShareParams()

    def initial_state(self) -> ShareState:
        return ShareState({})

    def decide(
        self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: ShareState
    ) -> PolicyResult[ShareState]:
        now_s = host.taken_at_s
        next_state: dict[str, ShareGuestState] = {}
        claims: list[Claim] = []
        held_total_kib = 0
        reasons: dict[str, str] = {}
        for guest in guests:
            used = used_kib(guest)
            previous = state.guests.get(guest.uuid)
            if used is None:
                if previous is not None:
                    next_state[guest.uuid] = previous
                reasons[guest.uuid] = "no stats from the guest yet"
                continue
            gstate = self.observe(now_s, guest, used, previous)
            next_state[guest.uuid] = gstate
            claims.append(self.claim(now_s, guest, used, gstate))
            held_total_kib += held_kib(guest, used)
        reserve_kib = host.mem_total_kib * self.params.reserve_pct / 100
        host_used_kib = host.used_kib_counting_arc(self.params.count_arc)
        sample_kib = host_used_kib - held_total_kib
        members = tuple(sorted(c.uuid for c in claims))
        other = (
            HostOther(members, now_s, sample_kib)
            if state.host_other is None
            else state.host_other.observe(now_s, members, sample_kib, self.params.host_window_s)
        )
        budget_kib = host.mem_total_kib - reserve_kib - other.estimate_kib()
        if self.params.multiplex:
            spare_kib = host.available_kib(count_arc=self.params.count_arc) - reserve_kib
            budget_kib += multiplexed_kib(claims) * min(1.0, max(0.0, spare_kib / max(reserve_kib, 1.0)))
        shares = fill(budget_kib, claims)
        short_kib = sum(c.hard_kib for c in claims) - budget_kib
        targets: dict[str, int] = {}
        by_uuid = {g.uuid: g for g in guests}
        for c in claims:
            guest = by_uuid[c.uuid]
            target = min(c.max_kib, max(guest.floor_kib, math.floor(shares[c.uuid])))
            if auto_deflated(guest, self.params.auto_deflate_tolerance_kib):
                target = max(target, guest.actual_kib)  # the guest is short: meet it
            targets[c.uuid] = target
            reasons[c.uuid] = self.why(c, target, short_kib)
        return PolicyResult(targets, ShareState(next_state, other), {}, reasons)

    def observe(
        self, now_s: float, guest: GuestSnapshot, used: int, previous: ShareGuestState | None
    ) -> ShareGuestState:
        """Learn this sample: bursts, and the paging room swap-ins and refaults earn
        (``policies.signals.Paging``)."""
        if previous is None:
            previous = ShareGuestState(Bursts(now_s), Paging(now_s))
        bursts, _killed = previous.bursts.observe(guest, used)
        paging = previous.paging.observe(
            now_s,
            guest,
            used,
            self.params.slo_pct_per_min,
            self.params.paging_half_life_s,
            self.params.min_headroom_kib,
            SLO_WINDOW_S,
        )
        return ShareGuestState(bursts, paging)

    def claim(self, now_s: float, guest: GuestSnapshot, used: int, gstate: ShareGuestState) -> Claim:
        """The guest's need and what it must keep, within floor and maximum."""
        p = self.params
        small_margin = max(p.min_headroom_kib, guest.max_kib * p.headroom_pct / 100)
        hard = min(guest.max_kib, max(guest.floor_kib, round(used + small_margin + gstate.paging.room_kib)))
        if gstate.bursts.warming_up(now_s, p.warmup_s):
            need = guest.max_kib
        else:
            margin = max(small_margin, gstate.bursts.margin_kib(p.burst_factor))
            need = round(used + margin + gstate.paging.room_kib)
        need = min(guest.max_kib, max(hard, need))
        return Claim(guest.uuid, need, hard, guest.max_kib, guest.weight)

    @staticmethod
    def why(c: Claim, target: int, short_kib: float) -> str:
        """Where the guest stands, in words."""
        text = f"needs {c.need_kib / MIB:.0f} MiB, keeps {c.hard_kib / MIB:.0f} MiB, given {target / MIB:.0f} MiB"
        if short_kib > 0:
            text += f"; host short by {short_kib / GIB:.1f} GiB"
        return text
