"""``proxmox``: Proxmox VE's auto-ballooning, reproduced as a baseline.

Algorithm from proxmox/pve-manager ``PVE/AutoBalloon.pm`` (``compute_alg1``) and its
caller in ``PVE/Service/pvestatd.pm``; re-expressed here in Python, not translated. In
Proxmox's unit, bytes, so its worked examples come out to the byte. Per step (pvestatd
runs it every 10 s):

* ``goal = MemTotal x target_pct / 100 - memused`` with ``memused = MemTotal -
  MemAvailable`` (pve-common ProcFSTools); ``target_pct`` is the node option
  ``ballooning-target``, default 80;
* candidates: every guest with a running balloon, a minimum and ``shares != 0``;
  *pressured* guests have MemFree (pve-qemu's ``free_mem``) at most 25 % of their minimum,
  or sit below it; the rest are *comfortable*;
* ``goal > 10 MiB``: offer it to pressured guests, and if that placed nothing, to all;
  ``goal < -10 MiB``: take it from comfortable guests, and if that took nothing, from all;
  in between nothing moves (dead band);
* placing (water-filling): ``desired = min + (sum(balloon - min) + rest) x shares /
  sum(shares)`` clamped to ``[min, maxmem]``; each guest moves at most ``maxchange``
  (100 MiB) from where it is toward ``desired``; repeat until the rest is placed or
  nothing moves. A guest above its desired share shrinks even in a grow round, which is
  Proxmox's behaviour (prior-art.md §9: it can oscillate).

The ZFS ARC: Proxmox does not count it as free. pvestatd's ``auto_ballooning``
(pve-manager 14a22df, PVE/Service/pvestatd.pm) takes ``memused`` from pve-common's
``read_meminfo`` (f665029, src/PVE/ProcFSTools.pm), which is MemTotal - MemAvailable;
``read_meminfo`` has also read ``arcsize``/``arcmin``/``arcmax`` from arcstats since
"fix #1454" (b21af8f, 2023), but only for the node's graphs, never for the goal. So the
baseline leaves ``count_arc`` off; turning it on shows what Proxmox would do if it did.

Same inputs as our policies: ``balloon`` = ``actual``, ``maxmem`` = ``max_kib``, the
minimum (Proxmox's ``balloon`` option) is the guest's SLA floor, or ``default_min_kib``
when it has none (Proxmox skips a guest with no minimum, and a baseline that skips every
guest would compare nothing), ``shares = 1000 x weight`` (default 1000, qemu-server).

Over columns (``decide_batch``): each round of the water-filling is a few numpy
operations over every candidate at once (within a round no VM sees another's new size,
as in AutoBalloon.pm, so the round vectorizes exactly); ``compute_alg1`` on ``PveVm``s
and the per-guest ``decide`` are the same code. VMs are told apart by row, where
AutoBalloon.pm keys them by vmid: a host never has two guests with one uuid. The
per-VM version it replaced is the tests' oracle (``tests/proxmox_reference.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot, Kib
from overcommitd.table import BoolArray, FloatArray, GuestTable, IntArray
from policies.api import BatchResult, PolicyResult, result_of

MIB_B = 1024 * 1024
DEFAULT_SHARES = 1000  # qemu-server: `shares` default 1000, range 0..50000


class ProxmoxParams(BaseModel):
    """Proxmox's knobs, defaults from pve-manager (AutoBalloon.pm, pvestatd.pm)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    target_pct: float = Field(80.0, ge=0, le=100, description="node ballooning-target: host use to aim for, %")
    max_change_kib: Kib = Field(100 * 1024, gt=0, description="most a guest moves per round ($maxchange, 100 MiB)")
    dead_band_kib: Kib = Field(10 * 1024, ge=0, description="goals within +/- this do nothing (10 MiB)")
    pressured_free_fraction: float = Field(0.25, ge=0, le=1, description="MemFree <= this x minimum: pressured")
    default_min_kib: Kib = Field(256 * 1024, gt=0, description="minimum for guests without an SLA floor")
    count_arc: bool = Field(
        False, description="not Proxmox: count the ZFS ARC above c_min as free host memory (an experiment)"
    )


@dataclass(frozen=True, slots=True)
class PveVm:
    """One candidate VM as compute_alg1 sees it, in bytes."""

    vmid: str
    balloon_b: int  # current size (QMP query-balloon `actual`)
    balloon_min_b: int
    maxmem_b: int
    shares: int = DEFAULT_SHARES
    freemem_b: int | None = None  # guest MemFree; None: unknown


@dataclass(frozen=True, slots=True, eq=False)
class PveColumns:
    """The candidates as compute_alg1 sees them, one row each, in bytes; ``freemem_b``
    NaN where unknown."""

    balloon_b: IntArray
    balloon_min_b: IntArray
    maxmem_b: IntArray
    shares: IntArray
    freemem_b: FloatArray

    @classmethod
    def of(cls, vms: Sequence[PveVm]) -> PveColumns:
        i64 = np.int64
        return cls(
            np.array([vm.balloon_b for vm in vms], dtype=i64),
            np.array([vm.balloon_min_b for vm in vms], dtype=i64),
            np.array([vm.maxmem_b for vm in vms], dtype=i64),
            np.array([vm.shares for vm in vms], dtype=i64),
            np.array([np.nan if vm.freemem_b is None else vm.freemem_b for vm in vms], dtype=np.float64),
        )

    def take(self, rows: IntArray) -> PveColumns:
        return PveColumns(
            self.balloon_b[rows], self.balloon_min_b[rows], self.maxmem_b[rows], self.shares[rows], self.freemem_b[rows]
        )


@dataclass(slots=True, eq=False)
class _Placed:
    """The new size of each row placed so far (``size_b``, valid where ``placed``)."""

    size_b: IntArray
    placed: BoolArray


def _place(vms: PveColumns, members: BoolArray, out: _Placed, bytes_b: int, maxchange_b: int) -> int:
    """Water-fill ``bytes_b`` (negative: take) over the rows ``members``; updates ``out``
    and returns what could not be placed. One round: every live VM's desired share of
    what is allocated plus the rest, clamped to [min, maxmem], approached by at most
    ``maxchange_b`` from its current size; a VM that does not move is done."""
    rest, repeat, progress = bytes_b, True, True
    done = np.zeros(len(members), dtype=bool)
    bal, low, high = vms.balloon_b, vms.balloon_min_b, vms.maxmem_b
    while rest and repeat and progress:
        live = members & ~done
        if not live.any():
            break
        current = np.where(out.placed, out.size_b, bal)
        alloc_new = int((current - low)[live].sum()) + rest
        per_share = alloc_new / int(vms.shares[live].sum())  # Python division, as Perl's: exact for ints below 2**53
        desired = low + np.trunc(per_share * vms.shares).astype(np.int64)
        clamped = np.minimum(high, np.maximum(low, desired))
        repeat = bool((live & (clamped != desired)).any())
        grow = (bytes_b > 0) & (clamped > bal)
        shrink = ~grow & (clamped < bal)  # shrinks even in a grow round, as AutoBalloon.pm does
        new = np.where(grow, np.minimum(bal + maxchange_b, clamped), np.maximum(bal - maxchange_b, clamped))
        moves = live & (grow | shrink)
        done |= live & ~moves
        change = np.where(moves, new - current, 0)
        out.size_b = np.where(moves, new, out.size_b)
        out.placed |= moves
        if change.any():
            progress = repeat = True
        else:
            progress = False
        rest -= int(change.sum())
    return rest


def compute_alg1_columns(
    vms: PveColumns, goal_b: int, maxchange_b: int, dead_band_b: int = 10 * MIB_B, pressured_fraction: float = 0.25
) -> _Placed:
    """New sizes in bytes of the rows that move this round (Proxmox's ``compute_alg1``)."""
    free = vms.freemem_b
    comfortable = (
        ~np.isnan(free)
        & (free != 0)
        & (free > vms.balloon_min_b * pressured_fraction)
        & (vms.balloon_b >= vms.balloon_min_b)
    )
    every = np.ones(len(free), dtype=bool)
    out = _Placed(np.zeros(len(free), dtype=np.int64), np.zeros(len(free), dtype=bool))
    if goal_b > dead_band_b:
        rest = _place(vms, ~comfortable, out, goal_b, maxchange_b)
        if rest >= goal_b:
            _place(vms, every, out, rest, maxchange_b)
    elif goal_b < -dead_band_b:
        rest = _place(vms, comfortable, out, goal_b, maxchange_b)
        if rest <= goal_b:
            _place(vms, every, out, rest, maxchange_b)
    return out


def compute_alg1(
    vms: Sequence[PveVm], goal_b: int, maxchange_b: int, dead_band_b: int = 10 * MIB_B, pressured_fraction: float = 0.25
) -> dict[str, int]:
    """New sizes in bytes for the VMs that move this round, by vmid (``compute_alg1_columns``)."""
    out = compute_alg1_columns(PveColumns.of(vms), goal_b, maxchange_b, dead_band_b, pressured_fraction)
    sizes = out.size_b.tolist()
    return {vms[i].vmid: sizes[i] for i in np.flatnonzero(out.placed).tolist()}


class ProxmoxPolicy:
    """Proxmox VE auto-ballooning (pve-manager PVE/AutoBalloon.pm); stateless."""

    name: ClassVar[str] = "proxmox"
    Params = ProxmoxParams

    def __init__(self, params: ProxmoxParams | None = None) -> None:
        self.params = params or ProxmoxParams()

    def initial_state(self) -> None:
        return None

    def candidates(self, guests: GuestTable) -> tuple[BoolArray, PveColumns]:
        """Which rows are candidates (a balloon, ``shares != 0``), and every row in bytes:
        the minimum is the SLA floor, else ``default_min_kib`` (at most the maximum)."""
        shares = np.round(DEFAULT_SHARES * guests.weight).astype(np.int64)
        is_candidate = (guests.actual_kib > 0) & (shares != 0)
        free = np.where(guests.stats.present, guests.stats["mem_free_kib"], np.nan)
        minimum = np.where(
            guests.floor_kib > 0, guests.floor_kib, np.minimum(self.params.default_min_kib, guests.max_kib)
        )
        columns = PveColumns(guests.actual_kib * 1024, minimum * 1024, guests.max_kib * 1024, shares, free * 1024)
        return is_candidate, columns

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: None) -> PolicyResult[None]:
        table = GuestTable.of(guests)
        return result_of(table, self.decide_batch(host, table, state))

    def decide_batch(self, host: HostSnapshot, guests: GuestTable, state: None) -> BatchResult[None]:
        p = self.params
        used_kib = host.used_kib_counting_arc(p.count_arc)
        goal_b = int(host.mem_total_kib * 1024 * p.target_pct / 100 - used_kib * 1024)
        is_candidate, columns = self.candidates(guests)
        rows = np.flatnonzero(is_candidate)
        vms = columns.take(rows)
        out = compute_alg1_columns(
            vms, goal_b, p.max_change_kib * 1024, p.dead_band_kib * 1024, p.pressured_free_fraction
        )
        moved = out.placed & (out.size_b != vms.balloon_b)
        targets = np.full(len(guests), np.nan)
        targets[rows[moved]] = out.size_b[moved] // 1024
        return BatchResult(targets, None)
