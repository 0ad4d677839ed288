"""Replay real memory traces through the daemon's own control step on a simulated host.

On a virtual clock (``sim.virtio.world.World``), every ``interval_s``: the simulated guests
and host advance in bulk to now under their trace demand, the control step reads the
same snapshots the daemon would, the policy and the guard decide, and the targets are
set on the simulated balloons. ``overcommitd.loop.step`` is the very function the
daemon calls.

A replay first simulates ``warmup_h`` of the traces before the scored span (the hours
before ``start_h``, wrapping to the traces' end when they start earlier) and scores
only what follows: guests boot from the trace's first demand with no invented page
cache, and the warm-up is where their page cache fills from the trace's own reads and
writes and the policy reaches its working state. The default, 24 h, is one daily cycle
of the workloads (Bitbrains and Google jobs are diurnal) and 24 times the guest model's
``cache_reuse_s`` (1 h), so the hot cache - what a squeeze makes the guest read again -
is in its steady state and every policy starts from its own daily rhythm. The *total*
cache keeps growing for longer on quiet guests (of the 50 bundled Bitbrains VMs, 28 %
read and write as much as their free memory within 24 h; the median takes 82 h): the
default errs on the side of less cache to reclaim, never more than the trace put there;
``warmup_h`` is settable for a longer run-in.

The upstream baselines (``mom``, ``proxmox``) run as their projects run them: with only
their own limits, clamped to the guest's maximum and the hypervisor's minimum, not
through overcommitd's guard (its step caps, dead band and back-offs changed about a
third of MOM's wishes). ``guard_baselines`` runs them guarded instead. This unguarded
mode exists only here, as a yardstick: the daemon (``overcommitd.runner``) has no way
to skip the guard for any policy.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import uuid as uuid_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from overcommitd.config import DaemonConfig
from overcommitd.guard import GuardOutcome, floors_kib
from overcommitd.loop import LoopState, StepOutcome, step_table, table_overrides
from overcommitd.model import Clamp, ClampReason, Decision, GuestSnapshot, HostSnapshot
from overcommitd.shortfall import estimate_table
from overcommitd.table import GuestTable
from policies.api import Policy, decide_batch
from sim.compiled import compiled_policy
from sim.evaluation.guard_kernels import KERNELS
from sim.evaluation.metrics import GuestTick, Recorder, RunCounters, RunFacts, Scorecard, Timeline
from sim.memory import traces as trace_io
from sim.memory.guest import Array, GuestModelParams, GuestSpec
from sim.memory.host import HostModelParams
from sim.memory.hypervisor import SimHypervisor, SimModel
from sim.memory.kernel import GuestKernel
from sim.memory.trace_loader import load_all
from sim.memory.workload import Workload
from sim.virtio.world import World

BLOCK_TICKS = 4096
log = logging.getLogger(__name__)

UPSTREAM_BASELINES = ("mom", "proxmox")
# QEMU's balloon command rejects a target <= 0 (qmp_balloon, system/balloon.c); libvirt
# sets sizes in KiB, so 1 KiB is the smallest target the hypervisor takes.
HYPERVISOR_MIN_KIB = 1
DEFAULT_SLO_PCT_PER_MIN = 0.2  # Google's far-memory promotion SLO (Lagar-Cavilla et al., ASPLOS 2019)


class ReplaySpec(BaseModel):
    """What to replay and on what simulated host."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    traces: tuple[Path, ...] = Field(default_factory=lambda: tuple(trace_io.bundled()))
    guests: int | None = Field(None, gt=0, description="guests to simulate; default one per trace")
    hours: float | None = Field(72.0, gt=0, description="replayed span; None: the longest trace")
    start_h: float = Field(0.0, ge=0, description="where in the traces the scored span starts (hours from their start)")
    warmup_h: float = Field(24.0, ge=0, description="simulated before start_h and not scored (page cache fills)")
    interval_s: float = Field(10.0, gt=0, description="control interval")
    stats_period_s: float = Field(5.0, ge=0, description="guest stats polling period; 0: off")
    stats_phase_s: tuple[tuple[str, float], ...] = Field(
        (),
        description="(guest, seconds): when each named guest's stats timer first fires, trace names or shell "
        "patterns, the first match wins (real guests' timers run each in its own phase); others at 0",
    )
    # oVirt's cluster memory overcommit presets are 100/150/200 % (prior-art.md §5.5).
    overcommit: float = Field(1.5, gt=0, description="provisioned guest RAM / host RAM for guests")
    deflate_on_oom_share: float = Field(0.25, ge=0, le=1, description="share of guests with DEFLATE_ON_OOM")
    deflate_on_oom_guests: tuple[str, ...] | None = Field(
        None, description="the guests with DEFLATE_ON_OOM, trace names or shell patterns (instead of the share)"
    )
    reporting_share: float = Field(0.25, ge=0, le=1, description="share of guests with free page reporting")
    floor_pct: float = Field(0.0, ge=0, le=100, description="SLA floor of every guest, % of its RAM")
    slo_pct_per_min: float = Field(
        DEFAULT_SLO_PCT_PER_MIN, gt=0, description="per-guest paging SLO, % of its own working set per minute"
    )
    guard_baselines: bool = Field(False, description="run mom and proxmox through the guard (default: as upstream)")
    guest_swap_kib: int = Field(512 * 1024, ge=0, description="swap space in each guest")
    machine_kib: int = Field(trace_io.DEFAULT_MACHINE_KIB, gt=0, description="Google 2019 scale: one machine")
    seed: int = 0
    model: SimModel = Field(
        "bulk", description="bulk: closed-form balloons; protocol: byte-level device and driver per guest"
    )
    guest_model: GuestModelParams = GuestModelParams()
    guest_kernel: GuestKernel = GuestKernel()  # issue 16: which stat tags the guests send
    host_model: HostModelParams = HostModelParams()


@dataclass(slots=True)
class ReplayResult:
    scorecard: Scorecard
    timeline: Timeline
    guest_names: list[str] = field(default_factory=list)


def load_traces(spec: ReplaySpec) -> list[trace_io.Trace]:
    """Every guest in the spec's traces; one warning line if the loader had to interpret
    anything (gaps, duplicates, bad values), so no replay hides it."""
    loaded = load_all(list(spec.traces), machine_kib=spec.machine_kib)
    noted = [t for t in loaded if t.notes]
    if noted:
        log.warning(
            "%d of %d traced guests needed interpreting (e.g. %s: %s); `overcommitd trace info` lists every note",
            len(noted),
            len(loaded),
            noted[0].name,
            noted[0].notes[0],
        )
    return loaded


def build_guests(spec: ReplaySpec, loaded: Sequence[trace_io.Trace]) -> tuple[list[GuestSpec], Workload]:
    """One GuestSpec per guest, features drawn with the seed, and its workload."""
    n = spec.guests or len(loaded)
    start_s = (spec.start_h - spec.warmup_h) * 3600.0
    workload = Workload.assign(list(loaded), n, spec.guest_model, start_s=start_s, guest_kernel=spec.guest_kernel)
    rng = np.random.default_rng(spec.seed)
    draw = rng.random((n, 2))
    specs = [
        GuestSpec(
            uuid=str(uuid_module.UUID(int=int(rng.integers(2**63)) << 64 | i)),
            name=f"g{i:03d}-{_short_name(t)}",
            ram_kib=t.size_kib,
            swap_kib=spec.guest_swap_kib,
            deflate_on_oom=has_deflate_on_oom(spec, _short_name(t), float(draw[i, 0])),
            reporting=bool(draw[i, 1] < spec.reporting_share),
            floor_kib=int(t.size_kib * spec.floor_pct / 100),
            stats_phase_s=stats_phase_s(spec, _short_name(t)),
        )
        for i, t in enumerate(workload.traces)
    ]
    return specs, workload


def has_deflate_on_oom(spec: ReplaySpec, name: str, draw: float) -> bool:
    """Whether the guest replaying trace ``name`` has DEFLATE_ON_OOM: named by the spec's
    patterns when it has them (a replay compared with real guests), else drawn."""
    if spec.deflate_on_oom_guests is not None:
        return any(fnmatch.fnmatchcase(name, p) for p in spec.deflate_on_oom_guests)
    return draw < spec.deflate_on_oom_share


def stats_phase_s(spec: ReplaySpec, name: str) -> float:
    """When the stats timer of the guest replaying trace ``name`` first fires: the first
    of the spec's (pattern, seconds) that matches it, else 0."""
    return next((s for p, s in spec.stats_phase_s if fnmatch.fnmatchcase(name, p)), 0.0)


def _short_name(trace: trace_io.Trace) -> str:
    """The trace's own name without its folder; a Google 2019 file's time range dropped
    (``0-461643000000-631583000000`` is instance 0). A recorded guest keeps its name."""
    short = trace.name.rsplit("/", 1)[-1]
    return short.split("-")[0] if trace.source == "google2019" else short


def replay(
    spec: ReplaySpec,
    policy: Policy[Any],
    cfg: DaemonConfig,
    *,
    loaded: Sequence[trace_io.Trace] | None = None,
    progress: Callable[[int], object] | None = None,
) -> ReplayResult:
    """Run one policy over the spec (warm-up, then the scored span); ``progress`` is
    called with ticks done, warm-up included."""
    loaded = loaded if loaded is not None else load_traces(spec)
    specs, workload = build_guests(spec, loaded)
    duration_s = spec.hours * 3600.0 if spec.hours else max(t.duration_s for t in workload.traces)
    n_ticks = int(duration_s // spec.interval_s)
    n_warm = int(spec.warmup_h * 3600.0 // spec.interval_s)
    ram = np.array([s.ram_kib for s in specs], dtype=np.float64)
    host_kib = int(ram.sum() / spec.overcommit) + spec.host_model.base_kib
    first_demand, first_io = workload.block(np.zeros(1))
    world = World()
    hv = SimHypervisor(
        specs,
        host_mem_kib=host_kib,
        initial_demand_kib=first_demand[0],
        initial_read_kib_s=first_io[0],
        stats_period_s=spec.stats_period_s,
        guest_params=spec.guest_model,
        host_params=spec.host_model,
        model=spec.model,
        world=world,
        guest_kernel=spec.guest_kernel,
    )
    recorder = Recorder(ram, guard_floors(hv.table(), cfg), n_ticks)
    run = _Run(spec, policy, cfg, hv, workload, recorder, progress, n_warm, n_warm + n_ticks)
    world.every(spec.interval_s, run.tick, first_s=spec.interval_s)
    world.run(until_s=(n_warm + n_ticks) * spec.interval_s)
    start, end = run.at_scoring or _Counters.of(hv), _Counters.of(hv)
    facts = RunFacts(
        counters=end.minus(start).totals(),
        paged_kib=end.minus(start).paged_kib(),
        balloon_ops=hv.targets_set - start.targets_set,
        slo_pct_per_min=spec.slo_pct_per_min,
        warmup_s=n_warm * spec.interval_s,
        io_columns=workload.io_columns,
    )
    card = recorder.scorecard(policy.name, duration_s=n_ticks * spec.interval_s, host_total_kib=host_kib, facts=facts)
    return ReplayResult(card, recorder.timeline, [s.name for s in specs])


def guard_floors(guests: GuestTable | Sequence[GuestSnapshot], cfg: DaemonConfig) -> Array:
    """Each guest's floor as the guard enforces it: the replay's SLA floor or the
    config's ``[guests.<name>]`` floor (the larger, as the control step applies it),
    and never below the guard's ``min_guest_kib``."""
    table = guests if isinstance(guests, GuestTable) else GuestTable.of(guests)
    overridden, _ = table_overrides(table, cfg)
    return np.asarray(floors_kib(overridden, cfg.guard), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class _Counters:
    """The fleet's cumulative counters at one instant, per guest (KiB or counts), named
    like ``RunCounters``'s fields."""

    swap_in_kib: Array
    refault_kib: Array
    own_refault_kib: Array
    host_swap_in_kib: Array
    major_faults: Array
    oom_kills: Array
    puff_retries: Array
    oom_deflates: Array
    targets_set: int

    @classmethod
    def of(cls, hv: SimHypervisor) -> _Counters:
        f = hv.fleet

        def arr(values: Array) -> Array:
            return np.array(values, dtype=np.float64)

        return cls(
            swap_in_kib=arr(f.swap_in),
            refault_kib=arr(f.refault_kib),
            own_refault_kib=arr(f.own_refault_kib),
            host_swap_in_kib=arr(f.host_swap_in),
            major_faults=arr(f.major_faults + f.host_swap_in / 4),  # host swap-in: 4 KiB page faults
            oom_kills=arr(f.oom_kills),
            puff_retries=arr(f.driver.puff_retries),
            oom_deflates=arr(f.oom_deflates),
            targets_set=hv.targets_set,
        )

    def minus(self, earlier: _Counters) -> _Counters:
        diffs = {f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(RunCounters)}
        return _Counters(**diffs, targets_set=self.targets_set - earlier.targets_set)

    def totals(self) -> RunCounters:
        return RunCounters(**{f.name: float(getattr(self, f.name).sum()) for f in fields(RunCounters)})

    def paged_kib(self) -> Array:
        """What each guest paged in because of overcommit: its swap-in, page-cache
        refaults (less those its own growth caused with an empty balloon: the workload's,
        which it does on a dedicated host too) and host swap-in."""
        return self.swap_in_kib + self.refault_kib - self.own_refault_kib + self.host_swap_in_kib


def unguarded_step(
    host: HostSnapshot,
    table: GuestTable,
    policy: Policy[Any],
    state: LoopState[Any],
    cfg: DaemonConfig,
) -> StepOutcome[Any]:
    """A baseline's step as its own project runs it: the config's overrides and
    exclusions apply, the wish is clamped only to [hypervisor minimum, guest maximum].
    Replay-only (the yardstick); the daemon always runs ``overcommitd.loop.step``."""
    table, excluded = table_overrides(table, cfg)
    eligible = table.running & ~excluded
    rows = np.flatnonzero(eligible)
    sub = table if len(rows) == len(table) else table.take(rows)
    try:
        result = decide_batch(policy, host, sub, state.policy_state)
    except Exception as e:  # noqa: BLE001 - as the loop: a policy that raises holds every guest
        none = np.zeros(len(table), dtype=bool)
        return StepOutcome(table, np.zeros(len(table), dtype=np.int64), none, state, tuple, f"{type(e).__name__}: {e}")
    wish = np.full(len(table), np.nan)
    wish[rows] = result.targets_kib
    has_wish = ~np.isnan(wish)
    wish_kib = np.trunc(np.where(has_wish, wish, 0.0)).clip(-(2**62), 2**62).astype(np.int64)
    target = np.minimum(np.maximum(wish_kib, HYPERVISOR_MIN_KIB), table.max_kib)

    def explain() -> tuple[Decision, ...]:
        decisions = []
        for i in np.flatnonzero(has_wish).tolist():
            w, t = int(wish_kib[i]), int(target[i])
            clamps = () if t == w else (Clamp(ClampReason.MAXIMUM, w, t, "hypervisor range"),)
            decisions.append(Decision(table.uuid[i], table.name[i], t, w, clamps))
        return tuple(decisions)

    return StepOutcome(table, target, has_wish, LoopState(result.state, state.guard), explain)


Inputs = tuple[float, Array, Array]  # (at, demand KiB, file I/O KiB/s) per guest
SampleInputs = tuple[float | Array, Array, Array]  # ... at one instant, or at each guest's own


@dataclass(frozen=True, slots=True)
class _Landing:
    """One tick's trace inputs: at the tick's last stats sample (None: no sample in it or
    no known schedule) and at its end."""

    sample: SampleInputs | None
    end: Inputs


def land_demand(hv: SimHypervisor, inputs: _Landing, start_s: float) -> Array:
    """Issue 16: a trace sample's demand lands during the tick it belongs to, and the
    stats a policy reads at the tick's end saw it. The guests run to the tick's last stats
    sample and take the demand of that instant there (unless it is what they already
    hold), then run to the end and take the end's. Before, the demand of the tick's start
    landed at its end, after the stats were polled: the simulated policy reacted one tick
    late. Returns the demand in force at the end."""
    if inputs.sample is not None:
        at_s, demand, io = inputs.sample
        if isinstance(at_s, float):
            if start_s < at_s < inputs.end[0] and not np.array_equal(demand, hv.fleet_demand_kib):
                hv.advance(at_s, demand, io)
        else:  # each guest's stats in their own phase: each one's demand lands at its own sample
            for t_s in np.unique(at_s[np.isfinite(at_s)]).tolist():
                landing = np.where(at_s == t_s, demand, hv.fleet_demand_kib)
                if start_s < t_s < inputs.end[0] and not np.array_equal(landing, hv.fleet_demand_kib):
                    hv.advance(t_s, landing, io)
    end_s, demand, io = inputs.end
    hv.advance(end_s, demand, io)
    return demand


class _Run:
    """The per-tick work of one replay: advance, step, apply, record."""

    def __init__(
        self,
        spec: ReplaySpec,
        policy: Policy[Any],
        cfg: DaemonConfig,
        hv: SimHypervisor,
        workload: Workload,
        recorder: Recorder,
        progress: Callable[[int], object] | None,
        n_warm: int = 0,
        n_total: int = BLOCK_TICKS,
    ) -> None:
        self.spec, self.policy, self.cfg, self.hv = spec, compiled_policy(policy), cfg, hv
        self.workload, self.recorder, self.progress = workload, recorder, progress
        self.n_warm = n_warm
        self.n_total = n_total  # ticks in the run, warm-up included
        self.at_scoring: _Counters | None = None  # counters when scoring began
        self.unguarded = not spec.guard_baselines and policy.name in UPSTREAM_BASELINES
        self.state: LoopState[Any] = LoopState.initial(policy)
        self.k = 0
        self._block_start = -BLOCK_TICKS  # no block loaded yet
        self._ends: tuple[Array, Array, Array] = (np.empty(0), np.empty((0, 0)), np.empty((0, 0)))
        self._samples: tuple[Array, Array, Array] | None = None
        self._end_s: list[float] = []  # the block's tick ends, as floats
        self._sample_at: list[float | Array | None] = []  # ``_sample_instants``

    def _inputs(self, k: int) -> _Landing:
        """The demand and reads of tick ``k`` and where they land (``land_demand``)."""
        if not self._block_start <= k < self._block_start + len(self._ends[0]):
            self._load_block(k)
        i = k - self._block_start
        at_end = (self._end_s[i], self._ends[1][i], self._ends[2][i])
        at = self._sample_at[i]
        if at is None or self._samples is None:
            return _Landing(None, at_end)
        return _Landing((at, self._samples[1][i], self._samples[2][i]), at_end)

    def _load_block(self, k: int) -> None:
        """The inputs of up to ``BLOCK_TICKS`` ticks from ``k``, no further than the run goes."""
        self._block_start = k
        size = max(min(BLOCK_TICKS, self.n_total - k), 1)
        ends = (k + 1 + np.arange(size, dtype=np.float64)) * self.spec.interval_s
        samples = self.hv.sample_instants(ends)
        if samples is None or samples.ndim == 1:  # one schedule: peaks and reads at the same instants
            peaks, reads = self.workload.landings(
                float(ends[0] - self.spec.interval_s), self._landing_instants(ends, samples)
            )
            end_reads, sample_reads = reads[1::2], reads[0::2]
        else:
            _, end_reads = self.workload.block(ends)
            sample_reads = self._reads_at(samples)
            peaks = self._peaks(ends, samples)
        self._ends = (ends, peaks[1::2], end_reads)
        self._samples = None if samples is None else (samples, peaks[0::2], sample_reads)
        self._end_s = ends.tolist()
        self._sample_at = self._sample_instants(samples, size)

    @staticmethod
    def _sample_instants(samples: Array | None, size: int) -> list[float | Array | None]:
        """Each tick's sample instant as ``_Landing`` takes it: a float (one schedule for
        all), the tick's row (each guest's own; NaN: none), or None where no guest samples
        inside the tick. Worked out once a block: per tick, the checks cost as much as the
        rest of ``_inputs``."""
        if samples is None:
            return [None] * size
        if samples.ndim == 1:
            return [t if math.isfinite(t) else None for t in samples.tolist()]
        any_finite: list[bool] = np.logical_or.reduce(np.isfinite(samples), axis=1).tolist()
        return [row if finite else None for row, finite in zip(samples, any_finite, strict=True)]

    def _reads_at(self, samples: Array) -> Array:
        """Each guest's file reads at its own sample instants (``samples``: ticks x guests)."""
        out = np.empty_like(samples)
        for g in range(samples.shape[1]):
            out[:, g] = self.workload.block(np.nan_to_num(samples[:, g], nan=0.0))[1][:, g]
        return out

    def _landing_instants(self, ends: Array, samples: Array | None) -> Array:
        """Where each tick's demand lands, two rows a tick: at its stats sample (its start
        when none falls inside it) and at its end. With each guest's own sample instants
        (ticks x guests), each guest's own rows."""
        starts = ends - self.spec.interval_s
        sample_at = starts if samples is None else np.nan_to_num(samples)
        if sample_at.ndim == 2:  # each guest's own instants
            starts, ends = starts[:, None], ends[:, None]
        inside = (starts < sample_at) & (sample_at < ends)
        at = np.stack(np.broadcast_arrays(np.where(inside, sample_at, starts), ends), axis=1)
        return at.reshape(2 * len(at), *at.shape[2:])

    def _peaks(self, ends: Array, samples: Array | None) -> Array:
        """The demand each guest lands at each of ``_landing_instants``: the peak of its
        trace since the landing before (``Workload.peaks``). A tick without a sample
        inside it lands all at its end."""
        return self.workload.peaks(float(ends[0] - self.spec.interval_s), self._landing_instants(ends, samples))

    def tick(self) -> None:
        hv, k = self.hv, self.k
        if k == self.n_warm:
            self.at_scoring = _Counters.of(hv)
        now_s = (k + 1) * self.spec.interval_s
        demand = land_demand(hv, self._inputs(k), now_s - self.spec.interval_s)
        host, table = hv.read(), hv.table()
        if self.unguarded:
            outcome = unguarded_step(host, table, self.policy, self.state, self.cfg)
        else:
            outcome = step_table(now_s, host, table, self.policy, self.state, self.cfg, kernels=KERNELS)
        self.state = outcome.state
        rows = np.flatnonzero(outcome.has_target)
        hv.set_targets(rows, outcome.target_kib[rows])
        if k >= self.n_warm:
            self._record(now_s - self.n_warm * self.spec.interval_s, demand)
            self.recorder.record_shortfall(self.spec.interval_s, self._host_short_kib(host, table, outcome.verdict))
        self.k += 1
        if self.progress is not None and self.k % 256 == 0:
            self.progress(256)

    def _host_short_kib(self, host: HostSnapshot, table: GuestTable, verdict: GuardOutcome | None) -> int:
        """The daemon's own shortfall estimate (``overcommitd.shortfall``) on this tick's
        table, with the step's ``verdict`` on its stats. The simulated host's base and QEMU
        overhead are known here, as an operator knows a host's: they bound its own use from below."""
        with_floors, held = table_overrides(table, self.cfg)
        hm = self.spec.host_model
        own_kib = hm.base_kib + hm.qemu_overhead_kib * len(table)
        estimate = estimate_table(
            host, with_floors, self.cfg.guard, held=held, host_own_min_kib=own_kib, kernels=KERNELS, verdict=verdict
        )
        return estimate.short_kib

    def _record(self, scored_s: float, demand: Array) -> None:
        hv, f = self.hv, self.hv.fleet
        available, (ballooned, unbacked, reported) = f.landed()
        tick = GuestTick(
            touched_kib=f.touched,
            actual_kib=f.actual(),
            target_kib=hv.target_kib,
            demand_kib=demand,
            available_kib=available,
            swap_in_kib=f.swap_in,
            unserved_kib=f.unserved_kib,
            degraded=f.degraded,
            ballooned_kib=ballooned,
            unbacked_kib=unbacked,
            reported_kib=reported,
        )
        used = hv.host_used_kib()
        self.recorder.record(
            scored_s, self.spec.interval_s, host_used_kib=used, host_total_kib=hv.host.mem_total_kib, g=tick
        )
