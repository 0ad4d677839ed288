"""``trim``: reclaim what a guest has touched but does not use in short squeezes, then
give the memory back, so between squeezes every guest has its whole size for a burst.

Why release? A page the balloon takes is discarded on the host; when the balloon
deflates, the page returns to the guest *free and unbacked*: the host pays for it again
only when the guest touches it. So what a squeeze reclaims (page cache, memory a burst
touched and freed) stays reclaimed after the release, until the guest reads or allocates
that much again (its next allocations land on exactly those pages: a real guest takes
free pages last freed, first taken, see ``sim.memory.guest``), while the guest gets its
headroom back. Holding the balloon inflated
(``pid``, ``sla-floor``) reclaims a little more, but a guest without DEFLATE_ON_OOM whose
use leaps above what the balloon left it is OOM-killed before any control loop can
react: bitbrains-rnd has guests idling at 1 % of their RAM that leap to 50-95 % within
one 5-minute sample, after days of quiet. A trimmed guest is exposed only while a
squeeze lasts. This is Senpai's idea (prior-art.md: apply pressure, watch the cost,
back off) applied from the host, with the balloon as the pressure.

Per guest, a small state machine, one step per tick:

* **watched** (target: the maximum) for ``warmup_s`` after a guest is first seen (also
  after a restart of the daemon, which keeps no state): its bursts are seen before
  anything is taken from it.
* **released** (target: the maximum). A squeeze starts when ``trim_interval_s`` has
  passed since the last one (a quarter of it while the host's MemAvailable is below
  ``host_available_target_pct``) and the estimated gain is at least min_gain (``min_gain_pct`` % of
  the guest's maximum, at least ``min_gain_kib``: scaled to the guest, so a 512 MiB
  guest is trimmed too) and ``min_gain_pct_of_depth`` % of how far the balloon would inflate (the balloon
  takes free pages before page cache, so a squeeze spends most of its time on pages the
  host does not back). The gain is what
  the guest has touched since the last release and could give up: its page-cache
  growth (the disk_caches stat) beyond the hot cache it keeps, plus how far its use
  fell from the peak it showed meanwhile (memory a burst touched and freed).
* **squeezing** (target: ``keep``; the guard paces the inflation). ``keep`` is the
  guest's use plus a margin - the largest of ``min_headroom_kib``, ``headroom_pct`` %
  of its maximum and ``burst_factor`` x the largest rise of use it has shown between
  two samples - plus the hot cache it keeps. A guest that bursts keeps room for its
  bursts even mid-squeeze. The squeeze ends, released at once, when ``actual`` stops
  falling (it reached ``keep``, or the guard holds it), or at the first sign of harm:
  any swap-in, an auto-deflate, an OOM kill, or use rising between two samples by
  ``abort_rise_pct`` % of the room it had left. Only a squeeze that reached ``keep``
  counts as a trim; one cut short is tried again after the interval.

What a squeeze costs is measured, not assumed: page-cache refaults (major faults that
are not swap-ins, x 4 KiB) between one release and the next squeeze are hot file data
the squeeze evicted. The guest keeps that much cache at its next squeeze (a running
maximum that halves when a squeeze costs nothing), so a guest that reads its files
again is not trimmed into re-reading them.

Under host pressure a released guest gets twice its ``keep`` rather than its maximum.
A DEFLATE_ON_OOM guest is not released at all (``hold_deflate_on_oom``): it follows
``keep`` like a set-point, because a burst beyond its margin makes it swap (at most its
swap space) and then deflate itself, never OOM-kill; the burst it showed then widens
its margin.

After an OOM kill the guest's burst margin becomes its whole maximum: it is never
squeezed again. Guests without stats are held.

Every step says why (``decide_guest_why``): warm-up left, time to the next squeeze, gain
or room below min_gain, an OOM kill seen, a squeeze under way or how it ended.

The policy runs over columns (``decide_batch``): every guest's state machine advances in
a fixed number of numpy operations per tick, its state one array per field
(``TrimState``), its reasons worded only when read (``policies.api.RowReasons``).
``decide_guest`` and ``decide`` are that same code on a one-row or a built table; the
per-guest version it replaced is kept as the oracle of the tests
(``tests/trim_reference.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot, Kib
from overcommitd.table import BoolArray, FloatArray, GuestTable
from policies.api import BatchResult, PolicyResult, RowReasons, result_of
from policies.signals import OOM_COLLAPSE_PCT, OOM_EXHAUSTED_PCT, PAGE_KIB, Bursts, used_kib_columns

MIB = 1024


def _mib(kib: float) -> str:
    return f"{kib / MIB:.0f} MiB"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class TrimParams(BaseModel):
    """Knobs of the ``trim`` policy."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    trim_interval_s: float = Field(6 * 3600.0, gt=0, description="time between a guest's squeezes")
    warmup_s: float = Field(3600.0, ge=0, description="watch a new guest this long before its first squeeze")
    min_gain_pct: float = Field(
        3.0, ge=0, le=100, description="squeeze only when it would reclaim at least this % of the guest's maximum"
    )
    min_gain_kib: Kib = Field(32 * MIB, ge=0, description="... and at least this (the floor of min_gain_pct)")
    min_headroom_kib: Kib = Field(
        64 * MIB, ge=0, description="free memory a squeezed guest keeps at least (the floor of headroom_pct)"
    )
    headroom_pct: float = Field(5.0, ge=0, le=100, description="... and at least this % of its maximum")
    burst_factor: float = Field(1.25, ge=0, le=10, description="... and this times its largest rise of use")
    min_gain_pct_of_depth: float = Field(
        10.0, ge=0, le=100, description="... and at least this % of how far it would inflate the balloon"
    )
    abort_rise_pct: float = Field(
        25.0, gt=0, le=100, description="use rising by this % of the room it had left ends a squeeze"
    )
    host_available_target_pct: float = Field(10.0, ge=0, le=100, description="host MemAvailable below this is pressure")
    count_arc: bool = Field(True, description="count the ZFS ARC above c_min as available host memory")
    auto_deflate_tolerance_kib: Kib = Field(
        2 * MIB, ge=0, description="actual above last target by more = auto-deflate"
    )
    hold_deflate_on_oom: bool = Field(
        True, description="keep DEFLATE_ON_OOM guests at keep instead of releasing them: they cannot be OOM-killed"
    )


@dataclass(frozen=True, slots=True)
class TrimGuestState:
    """One guest's trim cycle and what it has learned (a row of ``TrimState``)."""

    bursts: Bursts | None = None  # set at the first sample
    squeezing: bool = False
    actual_kib: int = 0  # last sample, to see a squeeze stall
    released_s: float = float("-inf")
    cache_at_release_kib: int = 0
    peak_used_kib: int = 0  # highest use since the last release
    refault_base: int | None = None  # major faults less swap-in pages, at the last release
    keep_cache_kib: int = 0  # hot page cache a squeeze leaves alone
    swap_in_total_kib: int | None = None


_INITIAL = TrimGuestState()


def _nan(value: float | None) -> float:
    return np.nan if value is None else value


def _column(values: Sequence[float]) -> FloatArray:
    return np.array(values, dtype=np.float64)


def _int(value: float) -> int | None:
    return None if np.isnan(value) else int(value)


@dataclass(frozen=True, slots=True, eq=False)
class TrimState:
    """Every guest's ``TrimGuestState``, one column per field, row for row with
    ``uuids``; NaN for None, ``first_seen_s`` NaN for a guest not sampled yet (its burst
    columns then hold a fresh ``Bursts``'s values). KiB as float64: exact below 2**53."""

    uuids: tuple[str, ...]
    first_seen_s: FloatArray
    used_kib: FloatArray
    largest_rise_kib: FloatArray
    oom_kills_total: FloatArray
    exhausted: BoolArray
    squeezing: BoolArray
    actual_kib: FloatArray
    released_s: FloatArray
    cache_at_release_kib: FloatArray
    peak_used_kib: FloatArray
    refault_base: FloatArray
    keep_cache_kib: FloatArray
    swap_in_total_kib: FloatArray

    @classmethod
    def of(cls, uuids: tuple[str, ...], rows: Sequence[TrimGuestState]) -> TrimState:
        """The columns of these per-guest states."""
        bursts = [s.bursts or Bursts(np.nan) for s in rows]
        return cls(
            uuids,
            _column([b.first_seen_s for b in bursts]),
            _column([_nan(b.used_kib) for b in bursts]),
            _column([b.largest_rise_kib for b in bursts]),
            _column([_nan(b.oom_kills_total) for b in bursts]),
            np.array([b.exhausted for b in bursts], dtype=bool),
            np.array([s.squeezing for s in rows], dtype=bool),
            _column([s.actual_kib for s in rows]),
            _column([s.released_s for s in rows]),
            _column([s.cache_at_release_kib for s in rows]),
            _column([s.peak_used_kib for s in rows]),
            _column([_nan(s.refault_base) for s in rows]),
            _column([s.keep_cache_kib for s in rows]),
            _column([_nan(s.swap_in_total_kib) for s in rows]),
        )

    def row(self, i: int) -> TrimGuestState:
        """Row ``i`` as a ``TrimGuestState``."""
        first = float(self.first_seen_s[i])
        bursts = None
        if not np.isnan(first):
            kills = _int(float(self.oom_kills_total[i]))
            used = _int(float(self.used_kib[i]))
            bursts = Bursts(first, used, int(self.largest_rise_kib[i]), kills, bool(self.exhausted[i]))
        return TrimGuestState(
            bursts,
            bool(self.squeezing[i]),
            int(self.actual_kib[i]),
            float(self.released_s[i]),
            int(self.cache_at_release_kib[i]),
            int(self.peak_used_kib[i]),
            _int(float(self.refault_base[i])),
            int(self.keep_cache_kib[i]),
            _int(float(self.swap_in_total_kib[i])),
        )

    @property
    def guests(self) -> Mapping[str, TrimGuestState]:
        """Each guest's state (a view, for logs and tests)."""
        return {u: self.row(i) for i, u in enumerate(self.uuids)}

    def aligned(self, uuids: tuple[str, ...]) -> TrimState:
        """The states of these guests in this order (fresh for a guest not seen); guests
        that left are dropped."""
        if uuids == self.uuids:
            return self
        index = {u: i for i, u in enumerate(self.uuids)}
        at = np.array([index.get(u, -1) for u in uuids], dtype=np.int64)
        fresh = TrimState.of(("",), [_INITIAL])
        merged = {}
        for f in fields(self):
            if f.name == "uuids":
                continue
            column, initial = getattr(self, f.name), getattr(fresh, f.name)
            values = column[np.maximum(at, 0)] if len(column) else np.repeat(initial, len(uuids))
            merged[f.name] = np.where(at >= 0, values, initial[0])
        return TrimState(uuids, **merged)

    def replace_rows(self, where: BoolArray, new: TrimState) -> TrimState:
        """``new`` where ``where``, this state elsewhere (same rows)."""
        merged = {
            f.name: np.where(where, getattr(new, f.name), getattr(self, f.name))
            for f in fields(self)
            if f.name != "uuids"
        }
        return TrimState(self.uuids, **merged)


def _empty_state() -> TrimState:
    return TrimState.of((), [])


_RELEASED_WHY = (
    "deflate-on-oom guest held at keep",
    "host under pressure: released to twice keep",
    "released to its maximum",
)
_ENDED_WHY = (
    "squeeze ended early (swap-in, auto-deflate, OOM kill or rising use)",
    "squeeze done",
    "squeeze stalled short of keep",
)
# Reason kinds (``RowReasons``): rows of one kind differ only in their numbers.
NO_STATS, WARMUP_MIN, WARMUP_S, SQUEEZING, STARTED, ENDED, NOT_DUE = 0, 1, 2, 3, 4, 5, 14
_NOT_DUE_OOM, _NOT_DUE_MIN, _NOT_DUE_S, _NOT_DUE_ROOM, _NOT_DUE_GAIN = range(5)


def _word(kind: int, a: float, b: float) -> str:
    """The sentence of a reason kind, with its numbers ``a`` and ``b``."""
    if kind == NO_STATS:
        return "no stats from the guest yet"
    if kind in (WARMUP_MIN, WARMUP_S):
        return f"warm-up: {_minutes(a)} left"
    if kind == SQUEEZING:
        return f"squeezing to keep {_mib(a)}"
    if kind == STARTED:
        return f"squeeze started: keep {_mib(a)}"
    if kind < NOT_DUE:
        why, where = divmod(kind - ENDED, 3)
        return f"{_ENDED_WHY[why]}: {_RELEASED_WHY[where]}"
    code, where = divmod(kind - NOT_DUE, 3)
    if code == _NOT_DUE_OOM:
        not_due = "OOM kill seen: never squeezed again"
    elif code in (_NOT_DUE_MIN, _NOT_DUE_S):
        not_due = f"next squeeze in {_minutes(a)}"
    elif code == _NOT_DUE_ROOM:
        not_due = f"room above keep {_mib(a)} below min_gain {_mib(b)}"
    else:
        not_due = f"gain {_mib(a)} below min_gain {_mib(b)}"
    return f"{not_due}; {_RELEASED_WHY[where]}"


@dataclass(frozen=True, slots=True, eq=False)
class _Sample:
    """What this tick's sample teaches, every row (``TrimPolicy.observe``)."""

    ok: BoolArray  # the guest sent stats with MemAvailable (or MemFree): decided
    used: FloatArray
    observed: TrimState  # the state with this sample learned
    harmed: BoolArray
    caches: FloatArray  # disk caches, 0 where unsent
    refaults: FloatArray  # major faults less swap-in pages; NaN where unsent


class TrimPolicy:
    """Squeeze, then release: reclaim touched-but-idle memory, keep burst room."""

    name: ClassVar[str] = "trim"
    Params = TrimParams

    def __init__(self, params: TrimParams | None = None) -> None:
        self.params = params or TrimParams()

    def initial_state(self) -> TrimState:
        return _empty_state()

    def initial_guest_state(self, guest: GuestSnapshot) -> TrimGuestState:
        return TrimGuestState()

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: TrimState) -> PolicyResult[TrimState]:
        table = GuestTable.of(guests)
        return result_of(table, self.decide_batch(host, table, state))

    def decide_guest(
        self, host: HostSnapshot, guest: GuestSnapshot, state: TrimGuestState
    ) -> tuple[int | None, TrimGuestState]:
        target_kib, state, _why = self.decide_guest_why(host, guest, state)
        return target_kib, state

    def decide_guest_why(
        self, host: HostSnapshot, guest: GuestSnapshot, state: TrimGuestState
    ) -> tuple[int | None, TrimGuestState, str | None]:
        """One guest's step: ``decide_batch`` on a one-row table."""
        out = self.decide_batch(host, GuestTable.of([guest]), TrimState.of((guest.uuid,), [state]))
        target = float(out.targets_kib[0])
        return None if np.isnan(target) else int(target), out.state.row(0), out.reasons.get(0)

    def min_gain_kib(self, guest: GuestSnapshot) -> int:
        """The least a squeeze must reclaim: ``min_gain_pct`` % of the guest's maximum,
        at least ``min_gain_kib`` (absolute defaults did nothing on small guests)."""
        return max(self.params.min_gain_kib, round(guest.max_kib * self.params.min_gain_pct / 100))

    def host_pressed(self, host: HostSnapshot) -> bool:
        """MemAvailable (with the ZFS ARC above c_min, unless ``count_arc`` is off) below target."""
        available_pct = 100 * host.available_kib(count_arc=self.params.count_arc) / host.mem_total_kib
        return available_pct < self.params.host_available_target_pct

    def observe(self, guests: GuestTable, s: TrimState, now_s: float) -> _Sample:
        """Learn from this sample, every row: the burst margin, the peak, and whether the
        guest was harmed (swap-in, auto-deflate, OOM kill, a rise mid-squeeze) since the
        last (``signals.Bursts.observe``, ``swap_in_delta_kib``, ``auto_deflated``)."""
        p, stats = self.params, guests.stats
        used = used_kib_columns(guests)
        ok = ~np.isnan(used)
        used = np.where(ok, used, 0.0)
        actual = guests.actual_kib.astype(np.float64)
        seen = ~np.isnan(s.first_seen_s)
        last_used = s.used_kib  # NaN: no sample yet
        has_last = ~np.isnan(last_used)
        rise = np.where(has_last, used - last_used, 0.0)
        kills = stats["oom_kills"]
        has_kills = ~np.isnan(kills)
        by_counter = has_kills & ~np.isnan(s.oom_kills_total) & (kills > s.oom_kills_total)
        # without the counter (Linux < 6.12): exhausted at the last sample, use collapsed since
        inferred = s.exhausted & has_last & ((last_used - used) * 100 >= actual * OOM_COLLAPSE_PCT)
        killed = np.where(has_kills, by_counter, inferred)
        largest = np.where(killed, guests.max_kib, np.maximum(s.largest_rise_kib, rise))
        swap = stats["swap_in_kib"]
        has_swap = ~np.isnan(swap)
        counted = has_swap & ~np.isnan(s.swap_in_total_kib) & (swap >= s.swap_in_total_kib)
        swapped = np.where(counted, swap - s.swap_in_total_kib, 0.0)
        deflated = (
            guests.deflate_on_oom
            & guests.has_last_target
            & (guests.actual_kib > guests.last_target_kib + p.auto_deflate_tolerance_kib)
        )
        # a rise is alarming in proportion to the room the guest had left for it
        room = np.where(has_last, np.maximum(0.0, actual - last_used), 0.0)
        rising = rise > room * p.abort_rise_pct / 100
        harmed = (swapped > 0) | killed | deflated | (s.squeezing & rising)
        observed = TrimState(
            s.uuids,
            np.where(seen, s.first_seen_s, now_s),
            used,
            largest,
            np.where(has_kills, kills, s.oom_kills_total),
            stats.available_kib() * 100 < actual * OOM_EXHAUSTED_PCT,
            s.squeezing,
            s.actual_kib,
            s.released_s,
            s.cache_at_release_kib,
            np.maximum(s.peak_used_kib, used),
            s.refault_base,
            s.keep_cache_kib,
            np.where(has_swap, swap, s.swap_in_total_kib),
        )
        caches = stats["disk_caches_kib"]
        swap0 = np.where(has_swap, swap, 0.0)
        refaults = stats["major_faults"] - np.floor_divide(swap0, PAGE_KIB)  # NaN where unsent
        return _Sample(
            ok, used, s.replace_rows(ok, observed), harmed, np.where(np.isnan(caches), 0.0, caches), refaults
        )

    def keep_kib(self, guest: GuestSnapshot, used: int, state: TrimGuestState) -> int:
        """What a squeeze leaves one guest (``keep_columns`` on one row)."""
        s = TrimState.of((guest.uuid,), [state])
        keep = self.keep_columns(GuestTable.of([guest]), _column([used]), s.largest_rise_kib, s.keep_cache_kib)
        return int(keep[0])

    def keep_columns(
        self, guests: GuestTable, used: FloatArray, largest: FloatArray, keep_cache: FloatArray
    ) -> FloatArray:
        """What a squeeze leaves each guest: use, burst room, hot cache; within bounds."""
        p = self.params
        max_kib = guests.max_kib.astype(np.float64)
        margin = np.maximum(
            np.maximum(p.min_headroom_kib, max_kib * p.headroom_pct / 100), np.round(largest * p.burst_factor)
        )
        keep = np.round(used + margin + keep_cache)
        return np.minimum(max_kib, np.maximum(guests.floor_kib, keep))

    def released(self, guests: GuestTable, keep: FloatArray, pressed: bool) -> tuple[FloatArray, FloatArray]:
        """Each guest's target once released, and which ``_RELEASED_WHY`` says so."""
        held = guests.deflate_on_oom & self.params.hold_deflate_on_oom
        if pressed:
            target, where = np.minimum(guests.max_kib, 2 * keep), 1
        else:
            target, where = guests.max_kib.astype(np.float64), 2
        return np.where(held, keep, target), np.where(held, 0, where)

    def decide_batch(self, host: HostSnapshot, guests: GuestTable, state: TrimState) -> BatchResult[TrimState]:
        """Every guest's step of the state machine (module docstring), over columns."""
        p, now_s = self.params, host.taken_at_s
        old = state.aligned(guests.uuid)
        sample = self.observe(guests, old, now_s)
        s, used, ok = sample.observed, sample.used, sample.ok
        actual, max_kib = guests.actual_kib.astype(np.float64), guests.max_kib.astype(np.float64)
        pressed = self.host_pressed(host)
        left_s = p.warmup_s - (now_s - s.first_seen_s)
        warm = now_s - s.first_seen_s < p.warmup_s
        keep = self.keep_columns(guests, used, s.largest_rise_kib, s.keep_cache_kib)
        min_gain = np.maximum(p.min_gain_kib, np.round(max_kib * p.min_gain_pct / 100))
        released, where = self.released(guests, keep, pressed)

        # squeezing: ends when actual stops falling (reached keep, or the guard holds it) or on harm
        ends = s.squeezing & (sample.harmed | (actual >= s.actual_kib))
        done = ends & ~sample.harmed & (actual - keep < min_gain)
        ended_why = np.where(sample.harmed, 0, np.where(done, 1, 2))

        # released: why no squeeze starts now (-1: one is due)
        interval_s = p.trim_interval_s / 4 if pressed else p.trim_interval_s
        wait_s = interval_s - (now_s - s.released_s)
        depth = actual - keep
        cache_growth = np.maximum(0.0, sample.caches - np.maximum(s.cache_at_release_kib, s.keep_cache_kib))
        gain = cache_growth + np.maximum(0.0, s.peak_used_kib - used)
        need = np.maximum(min_gain, np.round(depth * p.min_gain_pct_of_depth / 100))
        not_due = np.where(
            s.largest_rise_kib >= max_kib,
            _NOT_DUE_OOM,
            np.where(
                wait_s > 0,
                np.where(wait_s >= 60, _NOT_DUE_MIN, _NOT_DUE_S),
                np.where(depth < min_gain, _NOT_DUE_ROOM, np.where(gain < need, _NOT_DUE_GAIN, -1)),
            ),
        )
        starts = ~s.squeezing & (not_due < 0)
        refaulted = np.where(
            np.isnan(s.refault_base) | np.isnan(sample.refaults),
            0.0,
            np.maximum(0.0, sample.refaults - s.refault_base) * PAGE_KIB,
        )
        keep_cache = np.where(starts, np.maximum(refaulted, np.floor_divide(s.keep_cache_kib, 2)), s.keep_cache_kib)
        started_keep = self.keep_columns(guests, used, s.largest_rise_kib, keep_cache)

        go = ok & ~warm
        squeezing_on = go & s.squeezing & ~ends
        ends, done, starts = go & ends, go & done, go & starts
        new = TrimState(
            s.uuids,
            s.first_seen_s,
            s.used_kib,
            s.largest_rise_kib,
            s.oom_kills_total,
            s.exhausted,
            np.where(ends, False, s.squeezing | starts),
            np.where(squeezing_on | starts, actual, s.actual_kib),
            np.where(ends, now_s, s.released_s),
            np.where(done, sample.caches, s.cache_at_release_kib),
            np.where(done, used, s.peak_used_kib),
            np.where(done, sample.refaults, s.refault_base),
            keep_cache,
            s.swap_in_total_kib,
        )
        new = s.replace_rows(go, new)
        target = np.where(
            s.squeezing,
            np.where(ends, released, keep),
            np.where(starts, started_keep, released),
        )
        target = np.where(ok, np.where(warm, max_kib, target), np.nan)
        kind = np.where(
            s.squeezing,
            np.where(ends, ENDED + 3 * ended_why + where, SQUEEZING),
            np.where(starts, STARTED, NOT_DUE + 3 * np.maximum(not_due, 0) + where),
        )
        kind = np.where(ok, np.where(warm, np.where(left_s >= 60, WARMUP_MIN, WARMUP_S), kind), NO_STATS)
        a = np.select(
            [kind <= WARMUP_S, kind == SQUEEZING, kind == STARTED, not_due == _NOT_DUE_ROOM, not_due == _NOT_DUE_GAIN],
            [left_s, keep, started_keep, np.maximum(0.0, depth), gain],
            wait_s,
        )
        b = np.where(not_due == _NOT_DUE_ROOM, min_gain, need)
        kind = kind.astype(np.int64)
        reasons = RowReasons(kind, lambda i: _word(int(kind[i]), float(a[i]), float(b[i])))
        return BatchResult(target, new, reasons=reasons)
