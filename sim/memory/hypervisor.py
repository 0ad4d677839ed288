"""``SimHypervisor``: a simulated host behind the same Hypervisor and HostReader
protocols the libvirt backend and ``overcommitd.host`` implement, so the control step
cannot tell a replay from a hypervisor."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from overcommitd.hypervisor import HypervisorError
from overcommitd.model import BalloonFeatures, GuestSnapshot, HostSnapshot
from overcommitd.table import RUNNING, STAT_NAMES, GuestTable, IntArray, StatsColumns, read_only
from sim.virtio.calibration import STATS_WORK_S
from sim.virtio.device import STAT_ARRAY_NAMES, BalloonDevice

if TYPE_CHECKING:
    from sim.memory.balloon_fleet import ProtocolBalloons
from sim.memory.guest import EPSILON_KIB, Array, Fleet, GuestModelParams, GuestSpec, reserve_for
from sim.memory.host import HostModelParams, SimHost, host_swap
from sim.memory.kernel import GuestKernel
from sim.memory.stat_tags import unsent_fields
from sim.virtio.world import World

SimModel = Literal["bulk", "protocol"]

# Issue 16: the daemon sets a guest's target a step after it read the guest's snapshot
# (the policy, the guard, then libvirt's setMemoryFlags; overcommitd.hypervisor.libvirt
# stamps the target when that call returns), so at the next tick, ``interval_s`` after
# this one, the target is a little younger than ``interval_s``. The guard's
# ``settle_s`` compares that age: at ``interval_s == settle_s`` (5 s each in the real-guest
# fidelity test) a balloon short of the last target is "still moving" to the real daemon
# and was "stopped short" (a 600 s back-off) to a replay that set targets at the tick's
# very instant. Measured on the real-guest fidelity runs (2 guests, 1 vCPU each, under
# TCG): the daemon's target lines come 1-44 ms, median 20 ms, after its tick's first line.
DAEMON_STEP_S = 0.02


class SimHypervisor:
    """Guests, their balloon devices and the host, advanced by the replay's clock.

    ``model="bulk"`` moves balloons and polls stats in closed form for all guests at once;
    ``model="protocol"`` gives each guest the byte-level device and driver
    (``sim.memory.balloon_fleet``), run on ``world`` between the replay's ticks. A replay passes
    its own World; without one the hypervisor owns a World and runs it in ``advance``.
    """

    def __init__(
        self,
        specs: list[GuestSpec],
        *,
        host_mem_kib: int,
        initial_demand_kib: Array,
        initial_read_kib_s: Array | None = None,
        stats_period_s: float = 5.0,
        guest_params: GuestModelParams | None = None,
        host_params: HostModelParams | None = None,
        model: SimModel = "bulk",
        world: World | None = None,
        guest_kernel: GuestKernel | None = None,
        daemon_step_s: float = DAEMON_STEP_S,
    ) -> None:
        self.specs = specs
        self.daemon_step_s = daemon_step_s  # from a snapshot read to its target set (DAEMON_STEP_S)
        self.model = model
        params = guest_params or GuestModelParams()
        ram = np.array([s.ram_kib for s in specs], dtype=np.float64)
        reserve = reserve_for(params, ram, guest_kernel)  # issue 16: the kernel's watermarks per size
        self.fleet = Fleet(specs, params, initial_demand_kib, initial_read_kib_s, reserve=reserve)
        self._owns_world = world is None
        self.world = world or World()
        self.device: BalloonDevice | ProtocolBalloons
        if model == "protocol":
            from sim.memory.balloon_fleet import ProtocolBalloons

            self.device = ProtocolBalloons(self.world, self.fleet, specs, stats_period_s)
        else:
            phases = np.array([s.stats_phase_s for s in specs], dtype=np.float64)
            self.device = BalloonDevice(self.fleet.ram, np.full(len(specs), stats_period_s), self.fleet.driver, phases)
        self.host = SimHost(host_mem_kib, host_params or HostModelParams())
        self.index = {s.uuid: i for i, s in enumerate(specs)}
        n = len(specs)
        self._last_target = np.zeros(n, dtype=np.int64)
        self._has_last_target = np.zeros(n, dtype=bool)
        self._target_set_s = np.zeros(n)
        # Columns that never change, built once for ``table``.
        self._uuids = tuple(s.uuid for s in specs)
        self._names = tuple(s.name for s in specs)
        self._max_kib = np.array([s.ram_kib for s in specs], dtype=np.int64)
        self._floor_kib = np.array([s.floor_kib for s in specs], dtype=np.int64)
        self._weight = np.array([s.weight for s in specs], dtype=np.float64)
        self._nan = np.full(n, np.nan)
        self._running = read_only(np.full(n, RUNNING, dtype=np.int8))  # a simulated guest never stops
        self._no_migration = read_only(np.zeros(n, dtype=bool))
        self.target_kib = self.fleet.ram.copy()  # the same, as an array; RAM where never set
        self.targets_set = 0
        # Issue 16: the stats a guest sends depend on its kernel (sim.memory.stat_tags); 6.1 has no tag 10+.
        unsent = unsent_fields((guest_kernel or GuestKernel()).version)
        # Where each table stat column comes from: its row of the device's stats, None if never sent.
        self._stat_rows = [
            STAT_ARRAY_NAMES.index(name) if name in STAT_ARRAY_NAMES and name not in unsent else None
            for name in STAT_NAMES
        ]
        self.now_s = 0.0
        self.fleet_demand_kib = initial_demand_kib  # the demand the guests hold since the last advance
        self._features = [
            BalloonFeatures(deflate_on_oom=s.deflate_on_oom, reporting=s.reporting, free_page_hint=s.free_page_hint)
            for s in specs
        ]
        if not isinstance(self.device, BalloonDevice):
            # The protocol path knows what the driver actually negotiated (e.g. Linux drops
            # PAGE_POISON without init_on_free): report that, as libvirt would expose it.
            self._features = [BalloonFeatures.from_bits(g.driver.features) for g in self.device.guests]
        self._feature_bits = np.array([f.to_bits() for f in self._features], dtype=np.int64)
        if isinstance(self.device, BalloonDevice):
            self.device.take_sample(self.world.now_s, self.fleet.stats())

    def advance(self, now_s: float, demand_kib: Array, read_kib_s: Array) -> None:
        """Let the guests and the host run from the previous instant to ``now_s``."""
        dt_s = now_s - self.now_s
        if dt_s < 0:
            raise ValueError(f"now_s(={now_s}) is before the simulator's clock (={self.now_s})")
        if self._owns_world:
            self.world.run(until_s=now_s)
        if dt_s > 0:
            device = self.device
            if isinstance(device, BalloonDevice):
                self.fleet.advance(dt_s, demand_kib, read_kib_s, between=functools.partial(device.poll_stats, now_s))
            else:
                self.fleet.advance(dt_s, demand_kib, read_kib_s)
                device.after_advance()
            used_kib = self.host_used_kib()
            self._host_swap(dt_s, used_kib)
            if self.host.arc is not None:  # the ARC moves the host's use
                self.host.advance_arc(dt_s, read_kib_s, self.fleet.refault_kib, self.fleet.touched)
                used_kib = self.host_used_kib()
            self.host.advance(dt_s, used_kib)
        self.now_s = now_s
        self.fleet_demand_kib = demand_kib
        if not isinstance(self.device, BalloonDevice):
            self.device.poll_stats(now_s)

    def sample_instants(self, ends_s: Array) -> Array | None:
        """When, before each of ``ends_s``, each guest's last stats timer fires in the bulk
        device: its sample arrives STATS_WORK_S later (a guest polls every ``period +
        STATS_WORK_S`` from its next arrival; NaN where none comes first). The replay
        lands demand there so the sample a policy reads saw it (issue 16). Shape
        (len(ends_s),) when every guest polls on one schedule, else (len(ends_s),
        guests) with NaN for a guest whose stats are off; None when there is no
        schedule: the protocol model (its own timers) or stats off for all."""
        if not isinstance(self.device, BalloonDevice):
            return None
        nxt, period = self.device.next_arrival_s, self.device.stats_period_s
        on = np.isfinite(nxt) & (period > 0)
        if not on.any():
            return None
        if on.all() and np.ptp(nxt) == 0 and np.ptp(period) == 0:
            nxt, period = nxt[:1], period[:1]  # one schedule: one column
        on = on[: len(nxt)]
        nxt = np.where(on, nxt, 0.0)
        step_s = period + STATS_WORK_S
        n = np.ceil((ends_s[:, None] - nxt) / step_s) - 1  # arrivals strictly before the end (poll_stats)
        at = np.where((n >= 0) & on, nxt + n * step_s - STATS_WORK_S, np.nan)
        return at[:, 0] if len(nxt) == 1 else at

    def _host_swap(self, dt_s: float, used_kib: float) -> None:
        """Charge the host's swapping to the guests whose pages it swaps (``sim.memory.host``):
        faults they pay as major faults, and time they could not hold their demand."""
        f = self.fleet
        excess = used_kib - self.host.mem_total_kib
        if excess <= 0:  # host_swap's own first case, without computing what it would ignore
            f.host_swapped = np.zeros(len(f.touched))  # np.zeros_like's Python wrapper cost more
            return
        cold = f.cold_kib()
        f.host_swapped, faulted = host_swap(excess, cold, f.touched - cold, dt_s, f.params.swap_touch_s)
        if faulted.any():
            f.host_swap_in += faulted
            f.degraded |= faulted > EPSILON_KIB

    def host_used_kib(self) -> float:
        return self.host.used_kib(self.fleet.touched)

    # -- HostReader ------------------------------------------------------------------

    def read(self) -> HostSnapshot:
        return self.host.snapshot(self.now_s, self.host_used_kib())

    # -- Hypervisor ------------------------------------------------------------------

    def snapshot(self) -> Sequence[GuestSnapshot]:
        return self.table().snapshots()

    def target_ages_s(self) -> Array:
        """How long ago each guest's last target was set (NaN: never), as the daemon
        reads it at a tick: ``daemon_step_s`` less than the ticks between (never negative)."""
        return np.where(self._has_last_target, np.maximum(self.now_s - self._target_set_s, 0.0), np.nan)

    def table(self) -> GuestTable:
        """Every guest's snapshot as columns, straight from the Fleet's and the device's
        arrays: no per-guest object. Sizes are truncated to whole KiB as a snapshot's ints."""
        present = self.device.has_stats()
        truncated = np.trunc(self.device.stats.stacked())
        sent = [self._nan if row is None else truncated[row] for row in self._stat_rows]
        if not present.all():
            sent = [np.where(present, v, np.nan) for v in sent]
        # Copies of what ``set_targets`` changes in place: a table is one instant, and the
        # daemon keeps the last one (status, commands) after the next targets are set.
        actual_kib = self.fleet.actual().astype(np.int64)
        return GuestTable(
            uuid=self._uuids,
            name=self._names,
            max_kib=self._max_kib,
            actual_kib=actual_kib,
            current_kib=actual_kib.copy(),
            last_target_kib=self._last_target.copy(),
            has_last_target=self._has_last_target.copy(),
            last_target_age_s=self.target_ages_s(),
            feature_bits=self._feature_bits,
            stats=StatsColumns(np.where(present, self.device.last_update_s, np.nan), dict(zip(STAT_NAMES, sent))),
            stats_period_s=np.array(self.device.stats_period_s, dtype=np.float64),
            floor_kib=self._floor_kib,
            weight=self._weight,
            run_state=self._running,
            migration_pending=self._no_migration,
        )

    def set_targets(self, rows: IntArray, targets_kib: IntArray) -> None:
        """``set_target`` for many guests at once (rows of ``table``), in row order."""
        if len(rows) == 0:
            return
        ram = self._max_kib[rows]
        bad = (targets_kib <= 0) | (targets_kib > ram)
        if bad.any():
            i = int(rows[np.argmax(bad)])
            raise HypervisorError(
                f"guest {self.specs[i].name}: target {int(targets_kib[np.argmax(bad)])} KiB outside 1..{int(self._max_kib[i])}"
            )
        if isinstance(self.device, BalloonDevice):
            self.device.set_targets(rows, targets_kib)
        else:
            for i, t in zip(rows.tolist(), targets_kib.tolist(), strict=True):
                self.device.set_target(i, t)
        self._last_target[rows] = targets_kib
        self._has_last_target[rows] = True
        self._target_set_s[rows] = self.now_s + self.daemon_step_s  # when the daemon's call returns
        self.target_kib[rows] = targets_kib
        self.targets_set += len(rows)

    def set_target(self, uuid: str, target_kib: int) -> None:
        i = self.index.get(uuid)
        if i is None:
            raise HypervisorError(f"no simulated guest with uuid {uuid!r}")
        self.set_targets(np.array([i]), np.array([target_kib], dtype=np.int64))

    @property
    def last_target_kib(self) -> list[int | None]:
        """The target last set per guest, None where never (for tests and scenarios)."""
        return [int(t) if has else None for t, has in zip(self._last_target, self._has_last_target, strict=True)]
