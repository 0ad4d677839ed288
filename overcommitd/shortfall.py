"""Host short by N GiB: what the host lacks even if every balloon took all it safely can.

Ballooning moves memory a guest does not use to where it is needed; it cannot conjure
memory. When the guests' working sets and the host's own use exceed the host's RAM, no
policy can hold: the host swaps or a guest is OOM-killed whatever the balloons do. An
operator must hear that plainly (the daemon's log, ``overcommitd_host_short_bytes``, the
MQTT ``host/shortfall`` topic, ``overcommitd status``; the replay's scorecard and
``overcommitd plan``), rather than read it as a policy failing.

The estimate (:func:`estimate`), all in KiB::

    short = max(0, host_own + sum(need of every guest) - MemTotal)

* a guest's **need** is what no balloon may take from it: the larger of the memory its
  workload uses and its floor as the guard enforces it (``guard.floors_kib``: the SLA
  floor, the guard's ``min_guest_kib``). The memory it uses is ``actual -
  MemAvailable`` (``GuestStats.available_kib``): page cache and free memory are what a
  balloon can take, everything else - anonymous memory, the kernel, the part of the cache
  that must stay - is not. The same formula holds with DEFLATE_ON_OOM (MemTotal does not
  shrink, but ballooned pages are allocated, so they are not in MemAvailable either).
  When in doubt, a guest needs what it has: one without usable stats (missing, stale or
  impossible, by the guard's own ``stats_problem_codes``), one that is not running, or one that
  no balloon will move (excluded, paused by command) counts at ``actual``;
* the host's **own use** is what it uses beyond the guests' memory: host use, with the ZFS
  ARC above its minimum counted as available (``HostSnapshot.available_kib(count_arc=
  True)``: the host drops it when pressed), minus the guests' ``actual``; never below
  ``host_own_min_kib`` (what the caller knows the host keeps for itself) nor 0.

A consequence: while the host backs every guest at its current size with room to spare,
and no guest is below its floor, the estimate is 0 (balloons only ever take away); it
turns positive when the guests' memory is more than the host has behind it, and then
says how much of that no balloon can take back.

Limits: apart from "a guest without usable stats needs what it has", every
approximation errs toward *not short*, so the daemon does not cry wolf.

* Host own use is a lower bound: a guest page never touched is in ``actual`` but costs
  the host nothing, so on a host whose guests have not touched all their memory, the
  difference under-counts QEMU's own memory and the host's services.
  ``host_own_min_kib`` closes the gap: the daemon passes ``[host] reserve_kib`` plus
  ``guest_overhead_kib`` per guest, the replay its simulated host's base and QEMU
  overhead.
* A guest's need is what it uses now: memory it has swapped out (its own swap, or the
  host's swap of its pages) is not seen, nor demand it could not allocate. A squeezed or
  thrashing guest looks smaller than its working set.
* KSM merging is in host use as the kernel counts it (merged pages once), not in the
  guests' need; the host's own swap is not counted as room.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from overcommitd.config import GuardConfig
from overcommitd.guard import GuardOutcome, floors_kib, stats_problem_codes
from overcommitd.guard_kernels import NUMPY, GuardKernels
from overcommitd.model import GuestSnapshot, HostSnapshot
from overcommitd.table import BoolArray, FloatArray, GuestTable, IntArray

log = logging.getLogger(__name__)

_GIB_KIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Shortfall:
    """One estimate and the terms it came from (KiB); ``short_kib`` is 0 when the host has room."""

    short_kib: int
    need_kib: int  # the guests' irreducible need, summed
    host_own_kib: int  # the host's own use, as estimated
    mem_total_kib: int
    guests_at_size: int  # guests counted at their current size (no usable stats, not ballooned)

    @property
    def short_gib(self) -> float:
        return self.short_kib / _GIB_KIB

    def text(self) -> str:
        return short_text(self.short_kib)


def short_text(short_kib: float) -> str:
    """``host short by 3.2 GiB`` (the phrase operators see everywhere), or ``host has room``."""
    return f"host short by {short_kib / _GIB_KIB:.1f} GiB" if short_kib > 0 else "host has room"


def needs_kib(
    now_s: float,
    table: GuestTable,
    rules: GuardConfig,
    held: BoolArray,
    kernels: GuardKernels = NUMPY,
    verdict: GuardOutcome | None = None,
) -> tuple[IntArray, BoolArray]:
    """What no balloon may take from each guest (its workload's use or its floor, the
    larger), and which guests count at their current size: not running, stats the guard
    would not trust (``stats_problem_codes``), or ``held`` (excluded, paused: no balloon
    will move them). A ``verdict`` of the control step on this table at ``now_s`` lends
    its stats judgement and floors instead of working them out again."""
    return kernels.needs(*_needs_columns(now_s, table, rules, held, kernels, verdict))


def _needs_columns(
    now_s: float,
    table: GuestTable,
    rules: GuardConfig,
    held: BoolArray,
    kernels: GuardKernels,
    verdict: GuardOutcome | None,
) -> tuple[IntArray, FloatArray, IntArray, BoolArray, BoolArray, IntArray]:
    """``GuardKernels.needs``'s arguments (``needs_kib``)."""
    if verdict is not None and verdict.now_s == now_s and (verdict.rules is rules or verdict.rules == rules):
        problem, floor = verdict.stats_problem, verdict.floor_kib
    else:
        problem, floor = stats_problem_codes(now_s, table, rules, kernels), floors_kib(table, rules)
    return table.actual_kib, table.stats.available_kib(), floor, held, table.running, problem


def estimate_table(
    host: HostSnapshot,
    table: GuestTable,
    rules: GuardConfig,
    *,
    held: BoolArray,
    host_own_min_kib: int = 0,
    kernels: GuardKernels = NUMPY,
    verdict: GuardOutcome | None = None,
) -> Shortfall:
    """What the host lacks (module docstring), over columns: the table carries the config's
    floors (``loop.table_overrides``), ``held`` marks the rows no balloon will move. Stats
    are judged fresh or stale at ``host.taken_at_s``, as the control step does; a
    ``verdict`` of the step on this table at that instant lends its judgement."""
    columns = _needs_columns(host.taken_at_s, table, rules, held, kernels, verdict)
    need_kib, actual_kib, at_size = kernels.need_totals(*columns)
    own_kib = max(host.used_kib_counting_arc(True) - actual_kib, host_own_min_kib, 0)
    short_kib = max(own_kib + need_kib - host.mem_total_kib, 0)
    return Shortfall(short_kib, need_kib, own_kib, host.mem_total_kib, at_size)


def estimate(
    host: HostSnapshot,
    guests: Sequence[GuestSnapshot],
    rules: GuardConfig,
    *,
    held: Collection[str] = (),
    host_own_min_kib: int = 0,
) -> Shortfall:
    """``estimate_table`` on snapshots; ``held`` are the uuids no balloon will move."""
    table = GuestTable.of(guests)
    held_rows = np.array([u in held for u in table.uuid], dtype=bool)
    return estimate_table(host, table, rules, held=held_rows, host_own_min_kib=host_own_min_kib)


# A change of the shortfall is news when it moves by this much since last said: 10 % of
# it, and at least 256 MiB (the guard's default inflation step: less is within one tick's
# balloon movement). Chosen here, not borrowed.
NEWS_FRACTION = 0.10
NEWS_MIN_KIB = 256 * 1024


class ShortfallLog:
    """Logs when the host becomes short, when the shortfall moves by a meaningful step
    (``NEWS_FRACTION`` of it, at least ``NEWS_MIN_KIB``), and when it recovers; never once
    per tick."""

    def __init__(self) -> None:
        self.said_kib = 0  # the shortfall last logged; 0: the host had room

    def update(self, s: Shortfall) -> str | None:
        """Log this tick's estimate if it is news; returns the line logged, or None."""
        was = self.said_kib
        if s.short_kib == 0 and was == 0:
            return None
        if s.short_kib == 0:
            line, event = f"host has room again (was short by {was / _GIB_KIB:.1f} GiB)", "host-short-recovered"
        elif was == 0:
            line, event = f"{s.text()}: no balloon can help", "host-short"
        elif abs(s.short_kib - was) >= max(NEWS_FRACTION * was, NEWS_MIN_KIB):
            line, event = f"{s.text()} (was {was / _GIB_KIB:.1f} GiB): no balloon can help", "host-short"
        else:
            return None
        self.said_kib = s.short_kib
        (log.info if event == "host-short-recovered" else log.warning)(
            "%s; guests need %.1f GiB, the host's own use %.1f GiB, RAM %.1f GiB",
            line,
            s.need_kib / _GIB_KIB,
            s.host_own_kib / _GIB_KIB,
            s.mem_total_kib / _GIB_KIB,
            extra={"event": event, "short_kib": s.short_kib, "guests_at_size": s.guests_at_size},
        )
        return line
