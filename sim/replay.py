"""Replay real memory traces through the daemon's own control step on a simulated host.

On a virtual clock (``sim.world.World``), every ``interval_s``: the simulated guests
and host advance in bulk to now under their trace demand, the control step reads the
same snapshots the daemon would, the policy and the guard decide, and the targets are
set on the simulated balloons. ``overcommitd.loop.step`` is the very function the
daemon calls.
"""

from __future__ import annotations

import logging
import uuid as uuid_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from overcommitd.config import DaemonConfig
from overcommitd.guard import floor_kib
from overcommitd.loop import LoopState, apply, step
from policies.api import Policy
from sim import traces as trace_io
from sim.guest import Array, GuestModelParams, GuestSpec
from sim.host import HostModelParams
from sim.hypervisor import SimHypervisor, SimModel
from sim.kernel import GuestKernel
from sim.metrics import Recorder, Scorecard, Timeline
from sim.workload import Workload
from sim.world import World

BLOCK_TICKS = 4096
log = logging.getLogger(__name__)


class ReplaySpec(BaseModel):
    """What to replay and on what simulated host."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    traces: tuple[Path, ...] = Field(default_factory=lambda: tuple(trace_io.bundled()))
    guests: int | None = Field(None, gt=0, description="guests to simulate; default one per trace")
    hours: float | None = Field(72.0, gt=0, description="replayed span; None: the longest trace")
    start_h: float = Field(0.0, ge=0, description="where in the traces the replay starts (hours from their start)")
    interval_s: float = Field(10.0, gt=0, description="control interval")
    stats_period_s: float = Field(5.0, ge=0, description="guest stats polling period; 0: off")
    # oVirt's cluster memory overcommit presets are 100/150/200 % (prior-art.md §5.5); at
    # 200 % the guests' initial use (page cache half full) would not fit the host.
    overcommit: float = Field(1.5, gt=0, description="provisioned guest RAM / host RAM for guests")
    deflate_on_oom_share: float = Field(0.25, ge=0, le=1, description="share of guests with DEFLATE_ON_OOM")
    reporting_share: float = Field(0.25, ge=0, le=1, description="share of guests with free page reporting")
    floor_pct: float = Field(0.0, ge=0, le=100, description="SLA floor of every guest, % of its RAM")
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
    loaded = trace_io.load_all(list(spec.traces), machine_kib=spec.machine_kib)
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
    workload = Workload.assign(list(loaded), n, spec.guest_model, start_s=spec.start_h * 3600.0)
    rng = np.random.default_rng(spec.seed)
    draw = rng.random((n, 2))
    specs = [
        GuestSpec(
            uuid=str(uuid_module.UUID(int=int(rng.integers(2**63)) << 64 | i)),
            name=f"g{i:03d}-{t.name.split('/')[-1].split('-')[0]}",
            ram_kib=t.size_kib,
            swap_kib=spec.guest_swap_kib,
            deflate_on_oom=bool(draw[i, 0] < spec.deflate_on_oom_share),
            reporting=bool(draw[i, 1] < spec.reporting_share),
            floor_kib=int(t.size_kib * spec.floor_pct / 100),
        )
        for i, t in enumerate(workload.traces)
    ]
    return specs, workload


def replay(
    spec: ReplaySpec,
    policy: Policy[Any],
    cfg: DaemonConfig,
    *,
    loaded: Sequence[trace_io.Trace] | None = None,
    progress: Callable[[int], object] | None = None,
) -> ReplayResult:
    """Run one policy over the spec; ``progress`` is called with ticks done."""
    loaded = loaded if loaded is not None else load_traces(spec)
    specs, workload = build_guests(spec, loaded)
    duration_s = spec.hours * 3600.0 if spec.hours else max(t.duration_s for t in workload.traces)
    n_ticks = int(duration_s // spec.interval_s)
    ram = np.array([s.ram_kib for s in specs], dtype=np.float64)
    host_kib = int(ram.sum() / spec.overcommit) + spec.host_model.base_kib
    first_demand, first_reads = workload.block(np.zeros(1))
    world = World()
    hv = SimHypervisor(
        specs,
        host_mem_kib=host_kib,
        initial_demand_kib=first_demand[0],
        initial_read_kib_s=first_reads[0],
        stats_period_s=spec.stats_period_s,
        guest_params=spec.guest_model,
        host_params=spec.host_model,
        model=spec.model,
        world=world,
        guest_kernel=spec.guest_kernel,
    )
    floors = np.array([floor_kib(g, cfg.guard) for g in hv.snapshot()], dtype=np.float64)
    recorder = Recorder(ram, floors, n_ticks)
    run = _Run(spec, policy, cfg, hv, workload, recorder, progress)
    world.every(spec.interval_s, run.tick, first_s=spec.interval_s)
    world.run(until_s=n_ticks * spec.interval_s)
    f = hv.fleet
    counters = {
        "swap_in_kib": float(f.swap_in.sum()),
        "refault_kib": float(f.refault_kib.sum()),
        "major_faults": float(f.major_faults.sum()),
        "oom_kills": float(f.oom_kills.sum()),
        "puff_retries": float(f.driver.puff_retries.sum()),
        "oom_deflates": float(f.oom_deflates.sum()),
    }
    card = recorder.scorecard(
        policy.name,
        duration_s=n_ticks * spec.interval_s,
        host_total_kib=host_kib,
        counters=counters,
        balloon_ops=hv.targets_set,
    )
    return ReplayResult(card, recorder.timeline, [s.name for s in specs])


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
    ) -> None:
        self.spec, self.policy, self.cfg, self.hv = spec, policy, cfg, hv
        self.workload, self.recorder, self.progress = workload, recorder, progress
        self.state: LoopState[Any] = LoopState.initial(policy)
        self.k = 0
        self._block_start = -BLOCK_TICKS  # no block loaded yet
        self._demand = self._reads = np.empty((0, 0))

    def _inputs(self, k: int) -> tuple[Array, Array]:
        """Demand and reads in force during tick ``k`` (from the previous tick's time)."""
        if not self._block_start <= k < self._block_start + BLOCK_TICKS:
            self._block_start = k
            times = (k + np.arange(BLOCK_TICKS, dtype=np.float64)) * self.spec.interval_s
            self._demand, self._reads = self.workload.block(times)
        return self._demand[k - self._block_start], self._reads[k - self._block_start]

    def tick(self) -> None:
        hv, k = self.hv, self.k
        now_s = (k + 1) * self.spec.interval_s
        demand, reads = self._inputs(k)
        hv.advance(now_s, demand, reads)
        outcome = step(now_s, hv.read(), hv.snapshot(), self.policy, self.state, self.cfg)
        self.state = outcome.state
        apply(hv, outcome.decisions)
        f = hv.fleet
        self.recorder.record(
            now_s,
            self.spec.interval_s,
            host_used_kib=hv.host_used_kib(),
            host_total_kib=hv.host.mem_total_kib,
            touched_kib=f.touched,
            actual_kib=f.actual(),
            target_kib=hv.target_kib,
            demand_kib=demand,
            available_kib=f.mem_available(),
            swap_in_kib=f.swap_in,
        )
        self.k += 1
        if self.progress is not None and self.k % 256 == 0:
            self.progress(256)
