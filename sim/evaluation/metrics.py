"""What a replay measured: the scorecard, and a timeline for plots.

Definitions (all over the replayed span, every guest):

* **reclaimed by ballooning** (``reclaimed_*``, the headline): what the policy's balloons
  took that the host has not had to back since, **ballooned** plus **unbacked** (below).
  GiB·h integrates it over time; % is its mean over provisioned RAM. Free page reporting
  is kept out of it: it is the guest kernel's feature (VIRTIO_BALLOON_F_REPORTING, Linux
  mm/page_reporting.c), which returns free pages whether a policy runs or not (the
  no-ballooning reference gets it too), so counting it would credit the policy with what
  the guest did. A balloon that takes never-touched pages counts them as ballooned (it
  keeps the guest off them, but the host had them already): across policies,
  ``sim.evaluation.compare`` also gives the saving beyond the no-ballooning reference.
* **host memory not backed** (``saved_*``, "memory saved" to ``tune`` and ``plan``): guest
  memory the host does not have to back, i.e. provisioned RAM minus what the guests cost
  it (touched pages; balloon and reported pages are not touched), GiB·h and % as above. It
  includes memory never touched since boot, which no policy saved: on an unpressed host a
  policy that never sets a target shows most of provisioned RAM here and 0 reclaimed. Split
  by where it comes from (the four add up to it): **ballooned** (held by a balloon now and
  released by the host), **unbacked** (given back by a deflate, not touched since),
  **reported** (returned by free page reporting, not reused since), **untouched** (the
  rest: never touched since boot).
* **unserved**: demand the workloads could not hold, integrated (GiB·h): a workload
  OOM-killed in an interval is down until it restarts at the next (``sim.memory.guest``).
  **degraded**: guest-seconds in which a guest was killed or thrashing (its own swap, or
  the host's swap of its working set).
* **host above 100 %**: seconds, and the excess integrated (GiB·h); the host swaps and
  charges the guests (``sim.memory.host``): **host swap-in**, MiB per guest-hour, also counted
  in the major faults and in each guest's paging.
* **per-guest paging SLO**: each guest's swap-in, page-cache refaults and host swap-in,
  as % of its own mean working set (mean demand) per minute, against ``slo_pct_per_min``
  (Google's far-memory SLO, 0.2: it bounds the pages the *system* took that come back):
  the worst guest, and the guests over it. Refaults of cache the guest's own growth
  evicted while its balloon was empty are its workload's, which it pages on a dedicated
  host too: they are in the refault figure, not against the SLO (as ``sim.memory.workload``'s
  demand cap leaves out what a guest cannot hold unballooned).
* **warm-up**: the span simulated before scoring began; every figure here (counters
  included) is over the scored span only.
* **host short**: what the host lacks even if every balloon took all it safely can, as
  the daemon estimates it from the same snapshots (``overcommitd.shortfall``: the guests'
  irreducible need plus the host's own use, beyond its RAM): seconds short, the peak
  (GiB) and the shortfall integrated (GiB·h). Where it is above 0 no policy can hold.
* **host use**: host RAM in use (base + guests + QEMU overhead) as % of host RAM; over
  100 % means the host itself would swap.
* **swap-in, major faults**: per guest-hour, from the guests' own cumulative counters
  (major faults are swap-in faults and page-cache refaults).
* **page-cache refaults**: hot file data the guests read again because it was evicted
  (ballooned or reclaimed away), MiB per guest-hour (``sim.memory.guest``).
* **OOM kills**: guest OOM kills, every one (a restarted workload killed again counts again).
* **below floor**: guest-seconds with ``actual`` under the guest's floor as the guard
  enforces it (the replay's SLA floor, the config's ``[guests.<name>]`` floor, or the
  guard's global minimum); the guard keeps this at 0, an unguarded baseline may not.
* **balloon operations**: targets set; **out-of-puff retries**: 200 ms driver retries
  against an unreachable target (guest CPU burnt); **auto-deflate events**: 1 MiB
  DEFLATE_ON_OOM steps.
* **recovery**: after a demand jump (an increase of at least 10 % of the guest's RAM and
  128 MiB between two ticks), the time until the guest again has MemAvailable of at
  least 5 % of its RAM and swaps nothing in; 0 when it never lacked; a guest still not
  recovered at the end counts with the time it waited so far.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

import sim.compiled
from sim.evaluation import score_kernel

GIB_KIB = 1024.0 * 1024.0
MIB_KIB = 1024.0
JUMP_PCT = 10.0
JUMP_MIN_KIB = 128 * 1024.0
RECOVERED_AVAILABLE_PCT = 5.0
TIMELINE_POINTS = 2000


@dataclass(frozen=True, slots=True)
class Scorecard:
    policy: str
    guests: int
    hours: float
    provisioned_gib: float
    host_gib: float
    reclaimed_gib_h: float
    reclaimed_pct: float
    saved_gib_h: float
    saved_pct: float
    host_peak_pct: float
    host_p95_pct: float
    swap_in_mib_per_guest_h: float
    refault_mib_per_guest_h: float
    major_faults_per_guest_h: float
    oom_kills: int
    below_floor_guest_s: float
    balloon_ops: int
    out_of_puff_retries: int
    auto_deflate_events: int
    demand_jumps: int
    recovery_p50_s: float
    recovery_p95_s: float
    unserved_gib_h: float
    degraded_guest_s: float
    host_over_100_s: float
    host_over_100_gib_h: float
    host_swap_in_mib_per_guest_h: float
    slo_pct_per_min: float
    worst_guest_paging_pct_per_min: float
    guests_over_slo: int
    saved_ballooned_gib_h: float
    saved_unbacked_gib_h: float
    saved_reported_gib_h: float
    saved_untouched_gib_h: float
    warmup_h: float
    io_columns: str
    host_short_s: float
    host_short_peak_gib: float
    host_short_gib_h: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def violations(card: Scorecard) -> dict[str, float]:
    """What keeps a replay from holding, by constraint, with the amount over; empty when
    it holds. The one definition of "holds" (``overcommitd plan``, the better baseline of
    ``sim.evaluation.compare``, ``tune``): no OOM kill, the host never above 100 % of its RAM, every
    guest within its paging SLO, no guest-second below floor."""
    over = {
        "oom-kills": float(card.oom_kills),
        "host-over-100": card.host_over_100_s,
        "guest-slo": float(card.guests_over_slo),
        "below-floor": card.below_floor_guest_s,
    }
    return {name: amount for name, amount in over.items() if amount > 0}


@dataclass(slots=True)
class Timeline:
    """Sampled series for plots: ``t_s`` and host use, and per guest (columns) demand,
    target, actual and MemAvailable, all in KiB."""

    t_s: list[float] = field(default_factory=list)
    host_used_kib: list[float] = field(default_factory=list)
    demand_kib: list[npt.NDArray[np.float64]] = field(default_factory=list)
    target_kib: list[npt.NDArray[np.float64]] = field(default_factory=list)
    actual_kib: list[npt.NDArray[np.float64]] = field(default_factory=list)
    available_kib: list[npt.NDArray[np.float64]] = field(default_factory=list)
    swap_in_kib: list[npt.NDArray[np.float64]] = field(default_factory=list)  # cumulative, per guest


class GuestTick(NamedTuple):
    """Per-guest state at one scored tick, KiB arrays (``degraded`` a bool array). A named
    tuple, not a frozen dataclass: the replay builds one a tick, and a frozen dataclass's
    field-by-field ``object.__setattr__`` cost more than twice as much (~8 us at 11 fields)."""

    touched_kib: npt.NDArray[np.float64]
    actual_kib: npt.NDArray[np.float64]
    target_kib: npt.NDArray[np.float64]
    demand_kib: npt.NDArray[np.float64]
    available_kib: npt.NDArray[np.float64]
    swap_in_kib: npt.NDArray[np.float64]
    unserved_kib: npt.NDArray[np.float64]
    degraded: npt.NDArray[np.bool_]
    ballooned_kib: npt.NDArray[np.float64]
    unbacked_kib: npt.NDArray[np.float64]
    reported_kib: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class RunCounters:
    """Fleet totals of the guests' cumulative counters over the scored span (KiB or
    counts): fields, not string keys, so a misspelt counter is a mypy/AttributeError."""

    swap_in_kib: float
    refault_kib: float
    own_refault_kib: float
    host_swap_in_kib: float
    major_faults: float
    oom_kills: float
    puff_retries: float
    oom_deflates: float

    @classmethod
    def zero(cls) -> RunCounters:
        return cls(*(0.0 for _ in fields(cls)))


@dataclass(frozen=True, slots=True)
class RunFacts:
    """What the replay knows at the end, beside the per-tick record: counters over the
    scored span (fleet totals), each guest's paging over it (KiB: swap-in, page-cache
    refaults and host swap-in), and how the replay was set up."""

    counters: RunCounters
    paged_kib: npt.NDArray[np.float64]
    balloon_ops: int
    slo_pct_per_min: float
    warmup_s: float = 0.0
    io_columns: str = "none"


class Recorder:
    """Accumulates the scorecard tick by tick, in bulk over guests: with numba, one compiled
    call a tick (``sim.evaluation.score_kernel``); the numpy methods are the reference."""

    def __init__(
        self,
        ram_kib: npt.NDArray[np.float64],
        floor_kib: npt.NDArray[np.float64],
        n_ticks: int,
        *,
        compiled: bool | None = None,
    ) -> None:
        n = len(ram_kib)
        self.ram = ram_kib
        self.floor = floor_kib
        self.compiled = sim.compiled.AVAILABLE if compiled is None else compiled and sim.compiled.AVAILABLE
        # Per-tick constants, computed once with the very operations ``record`` used.
        self._ram_total_kib = self.ram.sum()
        self._jump_kib = self.ram * JUMP_PCT / 100
        self._recovered_kib = self.ram * RECOVERED_AVAILABLE_PCT / 100
        self.host_used_pct = np.empty(n_ticks)
        self._acc = np.zeros(score_kernel.N_TOTALS)  # running totals, slots named in score_kernel
        self._state = np.zeros((score_kernel.N_ROWS, n))  # per guest, rows named in score_kernel
        self._state[score_kernel.FLOOR] = floor_kib
        self._state[score_kernel.JUMP] = self._jump_kib
        self._state[score_kernel.RECOVERED] = self._recovered_kib
        self.demand_kib_s = self._state[score_kernel.DEMAND_KIB_S]
        self.prev_demand = self._state[score_kernel.PREV_DEMAND]  # read from the second tick on
        self.prev_swap_in = self._state[score_kernel.PREV_SWAP_IN]
        self.jump_started_s = self._state[score_kernel.JUMP_STARTED_S]
        self.jump_started_s[:] = np.nan
        self.over_100_s = 0.0
        self.over_100_kib_s = 0.0
        self.ticks = 0
        self.stride = max(1, n_ticks // TIMELINE_POINTS)
        self.timeline = Timeline()
        self.recoveries_s: list[float] = []
        self.last_s = 0.0  # the last scored instant: a jump still unrecovered then counts until it
        self.jumps = 0
        self.short_s = 0.0
        self.short_kib_s = 0.0
        self.short_peak_kib = 0.0

    def _total(self, slot: int) -> float:
        return float(self._acc[slot])

    @property
    def saved_kib_s(self) -> float:
        return self._total(score_kernel.SAVED)

    @property
    def split_kib_s(self) -> tuple[float, float, float]:
        """Ballooned, unbacked, reported."""
        split = self._acc[score_kernel.BALLOONED : score_kernel.REPORTED + 1]
        return float(split[0]), float(split[1]), float(split[2])

    @property
    def unserved_kib_s(self) -> float:
        return self._total(score_kernel.UNSERVED)

    @property
    def degraded_s(self) -> float:
        return self._total(score_kernel.DEGRADED)

    @property
    def below_floor_s(self) -> float:
        return self._total(score_kernel.BELOW_FLOOR)

    def record_shortfall(self, dt_s: float, short_kib: float) -> None:
        """One scored tick's host shortfall (``overcommitd.shortfall``), KiB."""
        if short_kib > 0:
            self.short_s += dt_s
            self.short_kib_s += short_kib * dt_s
            self.short_peak_kib = max(self.short_peak_kib, short_kib)

    def record(self, now_s: float, dt_s: float, *, host_used_kib: float, host_total_kib: float, g: GuestTick) -> None:
        self.last_s = now_s
        self.host_used_pct[self.ticks] = 100.0 * host_used_kib / host_total_kib
        if self.compiled and _all_float64(g):
            self._record_compiled(now_s, dt_s, g)
        else:
            self._record_numpy(dt_s, g)
            self._track_recovery_numpy(now_s, g.demand_kib, g.available_kib, g.swap_in_kib)
        if host_used_kib > host_total_kib:
            self.over_100_s += dt_s
            self.over_100_kib_s += (host_used_kib - host_total_kib) * dt_s
        if self.ticks % self.stride == 0:
            self._sample(now_s, host_used_kib, g)
        self.ticks += 1

    def _record_compiled(self, now_s: float, dt_s: float, g: GuestTick) -> None:
        recovered, jumped = score_kernel.record_tick(
            self._acc,
            self._state,
            g.touched_kib,
            g.ballooned_kib,
            g.unbacked_kib,
            g.reported_kib,
            g.unserved_kib,
            g.degraded,
            g.demand_kib,
            g.actual_kib,
            g.available_kib,
            g.swap_in_kib,
            float(self._ram_total_kib),
            JUMP_MIN_KIB,
            now_s,
            dt_s,
            self.ticks > 0,
        )
        self.jumps += jumped
        if recovered:
            self.recoveries_s.extend(self._state[score_kernel.RECOVERED_S, :recovered].tolist())

    def _record_numpy(self, dt_s: float, g: GuestTick) -> None:
        """The reference of ``score_kernel.record_tick``'s totals."""
        acc = self._acc
        acc[score_kernel.SAVED] += float(self._ram_total_kib - g.touched_kib.sum()) * dt_s
        split = (g.ballooned_kib.sum(), g.unbacked_kib.sum(), g.reported_kib.sum())
        acc[score_kernel.BALLOONED : score_kernel.REPORTED + 1] += np.array(split, dtype=np.float64) * dt_s
        acc[score_kernel.UNSERVED] += float(g.unserved_kib.sum()) * dt_s
        acc[score_kernel.DEGRADED] += float(np.count_nonzero(g.degraded)) * dt_s
        self.demand_kib_s += g.demand_kib * dt_s
        acc[score_kernel.BELOW_FLOOR] += float(np.count_nonzero(g.actual_kib < self.floor)) * dt_s

    def _sample(self, now_s: float, host_used_kib: float, g: GuestTick) -> None:
        tl = self.timeline
        tl.t_s.append(now_s)
        tl.host_used_kib.append(host_used_kib)
        tl.demand_kib.append(g.demand_kib.copy())
        tl.target_kib.append(g.target_kib.copy())
        tl.actual_kib.append(g.actual_kib.copy())
        tl.available_kib.append(g.available_kib.copy())
        tl.swap_in_kib.append(g.swap_in_kib.copy())

    def _track_recovery_numpy(
        self,
        now_s: float,
        demand: npt.NDArray[np.float64],
        available: npt.NDArray[np.float64],
        swap_in: npt.NDArray[np.float64],
    ) -> None:
        """The reference of ``score_kernel.record_tick``'s demand jumps and recoveries."""
        if self.ticks > 0:
            rise = demand - self.prev_demand
            jumped = (rise >= self._jump_kib) & (rise >= JUMP_MIN_KIB) & np.isnan(self.jump_started_s)
            if jumped.any():
                self.jumps += int(jumped.sum())
                self.jump_started_s[jumped] = now_s
        self.prev_demand[:] = demand
        ok = (available >= self._recovered_kib) & (swap_in <= self.prev_swap_in)
        self.prev_swap_in[:] = swap_in
        done = ok & ~np.isnan(self.jump_started_s)
        if done.any():
            self.recoveries_s.extend((now_s - self.jump_started_s[done]).tolist())
            self.jump_started_s[done] = np.nan

    def paging_pct_per_min(self, paged_kib: npt.NDArray[np.float64], duration_s: float) -> npt.NDArray[np.float64]:
        """Each guest's paging (KiB over the span) as % of its own mean working set
        (mean demand) per minute: the unit of Google's far-memory SLO."""
        minutes = duration_s / 60.0
        mean_wss = self.demand_kib_s / max(duration_s, 1e-9)
        return np.asarray(100.0 * paged_kib / minutes / np.maximum(mean_wss, MIB_KIB), dtype=np.float64)

    def _pct_of_provisioned(self, kib_s: float, duration_s: float) -> float:
        """``kib_s`` (KiB integrated over the span) as its mean % of provisioned RAM."""
        return 100.0 * kib_s / duration_s / float(self.ram.sum())

    def scorecard(self, policy: str, *, duration_s: float, host_total_kib: float, facts: RunFacts) -> Scorecard:
        n = len(self.ram)
        guest_h = n * duration_s / 3600.0
        used = self.host_used_pct[: self.ticks]
        # A guest that never recovered counts with the time it waited so far (a lower bound),
        # never left out: dropping it would make the slowest policy look fastest.
        pending = ~np.isnan(self.jump_started_s)
        waits = self.recoveries_s + (self.last_s - self.jump_started_s[pending]).tolist()
        rec = np.array(waits) if waits else np.zeros(1)
        counters = facts.counters
        paging = self.paging_pct_per_min(facts.paged_kib, duration_s)
        gib_h = GIB_KIB * 3600.0
        split = self.split_kib_s
        reclaimed_kib_s = split[0] + split[1]  # ballooned + unbacked: reported is the guest's (module docstring)
        ballooned, unbacked, reported = (v / gib_h for v in split)
        saved = self.saved_kib_s / gib_h
        return Scorecard(
            policy=policy,
            guests=n,
            hours=duration_s / 3600.0,
            provisioned_gib=float(self.ram.sum() / GIB_KIB),
            host_gib=host_total_kib / GIB_KIB,
            reclaimed_gib_h=reclaimed_kib_s / gib_h,
            reclaimed_pct=self._pct_of_provisioned(reclaimed_kib_s, duration_s),
            saved_gib_h=saved,
            saved_pct=self._pct_of_provisioned(self.saved_kib_s, duration_s),
            host_peak_pct=float(used.max()) if len(used) else 0.0,
            host_p95_pct=float(np.percentile(used, 95)) if len(used) else 0.0,
            swap_in_mib_per_guest_h=counters.swap_in_kib / MIB_KIB / guest_h,
            refault_mib_per_guest_h=counters.refault_kib / MIB_KIB / guest_h,
            major_faults_per_guest_h=counters.major_faults / guest_h,
            oom_kills=int(counters.oom_kills),
            below_floor_guest_s=self.below_floor_s,
            balloon_ops=facts.balloon_ops,
            out_of_puff_retries=int(counters.puff_retries),
            auto_deflate_events=int(counters.oom_deflates),
            demand_jumps=self.jumps,
            recovery_p50_s=float(np.percentile(rec, 50)),
            recovery_p95_s=float(np.percentile(rec, 95)),
            unserved_gib_h=self.unserved_kib_s / gib_h,
            degraded_guest_s=self.degraded_s,
            host_over_100_s=self.over_100_s,
            host_over_100_gib_h=self.over_100_kib_s / gib_h,
            host_swap_in_mib_per_guest_h=counters.host_swap_in_kib / MIB_KIB / guest_h,
            slo_pct_per_min=facts.slo_pct_per_min,
            worst_guest_paging_pct_per_min=float(paging.max()) if n else 0.0,
            guests_over_slo=int(np.count_nonzero(paging > facts.slo_pct_per_min)),
            saved_ballooned_gib_h=ballooned,
            saved_unbacked_gib_h=unbacked,
            saved_reported_gib_h=reported,
            saved_untouched_gib_h=saved - ballooned - unbacked - reported,
            warmup_h=facts.warmup_s / 3600.0,
            io_columns=facts.io_columns,
            host_short_s=self.short_s,
            host_short_peak_gib=self.short_peak_kib / GIB_KIB,
            host_short_gib_h=self.short_kib_s / gib_h,
        )


def _all_float64(g: GuestTick) -> bool:
    """Whether the compiled path takes this tick: its sums follow numpy's for float64 only
    (spelt out field by field: a loop over the fields costs several times more a tick)."""
    dtypes = (
        g.touched_kib.dtype,
        g.actual_kib.dtype,
        g.demand_kib.dtype,
        g.available_kib.dtype,
        g.swap_in_kib.dtype,
        g.unserved_kib.dtype,
        g.ballooned_kib.dtype,
        g.unbacked_kib.dtype,
        g.reported_kib.dtype,
        g.degraded.dtype,
    )
    return dtypes == _KERNEL_DTYPES


_KERNEL_DTYPES = (np.dtype(np.float64),) * 9 + (np.dtype(np.bool_),)
