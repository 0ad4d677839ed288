"""What a replay measured: the scorecard, and a timeline for plots.

Definitions (all over the replayed span, every guest):

* **memory saved**: guest memory the host does not have to back, i.e. provisioned RAM
  minus what the guests cost it (touched pages; balloon and reported pages are not
  touched). GiB·h integrates it over time; % is its mean over provisioned RAM.
* **host use**: host RAM in use (base + guests + QEMU overhead) as % of host RAM; over
  100 % means the host itself would swap.
* **swap-in, major faults**: per guest-hour, from the guests' own cumulative counters
  (major faults are swap-in faults and page-cache refaults).
* **page-cache refaults**: hot file data the guests read again because it was evicted
  (ballooned or reclaimed away), MiB per guest-hour (``sim.guest``).
* **OOM kills**: guest OOM kills (an episode of demand the guest cannot hold counts once).
* **below floor**: guest-seconds with ``actual`` under the guest's floor (the SLA floor
  or the guard's global minimum); the guard must keep this at 0.
* **balloon operations**: targets set; **out-of-puff retries**: 200 ms driver retries
  against an unreachable target (guest CPU burnt); **auto-deflate events**: 1 MiB
  DEFLATE_ON_OOM steps.
* **recovery**: after a demand jump (an increase of at least 10 % of the guest's RAM and
  128 MiB between two ticks), the time until the guest again has MemAvailable of at
  least 5 % of its RAM and swaps nothing in; 0 when it never lacked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

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

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


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


class Recorder:
    """Accumulates the scorecard tick by tick, in bulk over guests."""

    def __init__(self, ram_kib: npt.NDArray[np.float64], floor_kib: npt.NDArray[np.float64], n_ticks: int) -> None:
        self.ram = ram_kib
        self.floor = floor_kib
        self.host_used_pct = np.empty(n_ticks)
        self.saved_kib_s = 0.0
        self.below_floor_s = 0.0
        self.ticks = 0
        self.stride = max(1, n_ticks // TIMELINE_POINTS)
        self.timeline = Timeline()
        self.prev_demand: npt.NDArray[np.float64] | None = None
        self.jump_started_s = np.full(len(ram_kib), np.nan)
        self.recoveries_s: list[float] = []
        self.jumps = 0
        self.prev_swap_in = np.zeros(len(ram_kib))

    def record(
        self,
        now_s: float,
        dt_s: float,
        *,
        host_used_kib: float,
        host_total_kib: float,
        touched_kib: npt.NDArray[np.float64],
        actual_kib: npt.NDArray[np.float64],
        target_kib: npt.NDArray[np.float64],
        demand_kib: npt.NDArray[np.float64],
        available_kib: npt.NDArray[np.float64],
        swap_in_kib: npt.NDArray[np.float64],
    ) -> None:
        self.host_used_pct[self.ticks] = 100.0 * host_used_kib / host_total_kib
        self.saved_kib_s += float(self.ram.sum() - touched_kib.sum()) * dt_s
        self.below_floor_s += float(np.count_nonzero(actual_kib < self.floor)) * dt_s
        self._track_recovery(now_s, demand_kib, available_kib, swap_in_kib)
        if self.ticks % self.stride == 0:
            tl = self.timeline
            tl.t_s.append(now_s)
            tl.host_used_kib.append(host_used_kib)
            tl.demand_kib.append(demand_kib.copy())
            tl.target_kib.append(target_kib.copy())
            tl.actual_kib.append(actual_kib.copy())
            tl.available_kib.append(available_kib.copy())
            tl.swap_in_kib.append(swap_in_kib.copy())
        self.ticks += 1

    def _track_recovery(
        self,
        now_s: float,
        demand: npt.NDArray[np.float64],
        available: npt.NDArray[np.float64],
        swap_in: npt.NDArray[np.float64],
    ) -> None:
        if self.prev_demand is not None:
            rise = demand - self.prev_demand
            jumped = (rise >= self.ram * JUMP_PCT / 100) & (rise >= JUMP_MIN_KIB) & np.isnan(self.jump_started_s)
            self.jumps += int(jumped.sum())
            self.jump_started_s[jumped] = now_s
        self.prev_demand = demand.copy()
        ok = (available >= self.ram * RECOVERED_AVAILABLE_PCT / 100) & (swap_in <= self.prev_swap_in)
        self.prev_swap_in = swap_in.copy()
        done = ok & ~np.isnan(self.jump_started_s)
        self.recoveries_s.extend((now_s - self.jump_started_s[done]).tolist())
        self.jump_started_s[done] = np.nan

    def scorecard(
        self, policy: str, *, duration_s: float, host_total_kib: float, counters: dict[str, float], balloon_ops: int
    ) -> Scorecard:
        n = len(self.ram)
        guest_h = n * duration_s / 3600.0
        used = self.host_used_pct[: self.ticks]
        rec = np.array(self.recoveries_s) if self.recoveries_s else np.zeros(1)
        return Scorecard(
            policy=policy,
            guests=n,
            hours=duration_s / 3600.0,
            provisioned_gib=float(self.ram.sum() / GIB_KIB),
            host_gib=host_total_kib / GIB_KIB,
            saved_gib_h=self.saved_kib_s / GIB_KIB / 3600.0,
            saved_pct=100.0 * self.saved_kib_s / duration_s / float(self.ram.sum()),
            host_peak_pct=float(used.max()) if len(used) else 0.0,
            host_p95_pct=float(np.percentile(used, 95)) if len(used) else 0.0,
            swap_in_mib_per_guest_h=counters["swap_in_kib"] / MIB_KIB / guest_h,
            refault_mib_per_guest_h=counters["refault_kib"] / MIB_KIB / guest_h,
            major_faults_per_guest_h=counters["major_faults"] / guest_h,
            oom_kills=int(counters["oom_kills"]),
            below_floor_guest_s=self.below_floor_s,
            balloon_ops=balloon_ops,
            out_of_puff_retries=int(counters["puff_retries"]),
            auto_deflate_events=int(counters["oom_deflates"]),
            demand_jumps=self.jumps,
            recovery_p50_s=float(np.percentile(rec, 50)),
            recovery_p95_s=float(np.percentile(rec, 95)),
        )
