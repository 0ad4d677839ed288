"""Guest memory, for every guest at once: numpy arrays of state advanced in bulk.

One guest's RAM (``ram_kib``, the boot size) is split as the Linux guest sees it::

    ram = reserved + balloon + kernel + anon + cache + free
          '-- never in MemTotal     '-- the pool the guest allocates from

* ``reserved``: firmware and struct pages, never in MemTotal (a 512 MiB guest shows
  MemTotal 470 MiB: real-guest.md); ``kernel``: slab and the like, always used.
* ``anon``: the resident part of the working set, which follows the trace's demand;
  ``swap`` holds the part that did not fit.
* ``cache``: page cache, grown by file reads, reclaimed first under pressure.
* ``balloon``: pages the balloon driver holds (``actual`` = ram - balloon).

The host's view is ``touched``: guest pages backed by host RAM. Allocating a page that
was never touched (or was discarded) costs the host a page; freeing one inside the guest
does not give it back, unless free page reporting returns it; a page the balloon takes
is discarded (``sim.memory.host`` turns this into host RAM use).

Which free page an allocation or the balloon takes is last freed, first taken, as
measured on a real Linux 6.1 guest under QEMU (the Rss of QEMU's RAM mapping across
balloon cycles; tests/realguest/test_balloon_page_order.py repeats it in CI, and the
buddy allocator's per-CPU lists and free lists are LIFO): pages the guest freed since
the balloon last deflated, then the pages that deflate gave back (``deflated_free``: still
unbacked), then older touched free pages (``older_touched``), then never-touched ones.
So a balloon cycled up and down by the same amount re-takes its own pages and gains
the host nothing after the first inflate, and a guest's next allocation after a
deflate costs the host fresh pages even while it holds touched free ones.

Part of the free memory sits on the per-CPU free lists (``pcp``): pages freed by a
deflate, the workload or its exit land there first, up to the cap the guest's kernel
sets (``sim.memory.kernel.pcp_cap_pages``: ~27 MiB on the 1024 MiB test guest), and
allocations and inflates take them first (Linux 6.1 mm/page_alloc.c). MemFree and
MemAvailable do not count them (``mem_free``): after a deflate the real test guest
showed 33-44 MiB less MemAvailable than its free pages gave (issue 16).

Pressure is resolved as Linux would, in order: reclaim page cache, swap anonymous
memory out (both to keep free memory at the high watermarks, kswapd's aim), let
allocations go on down to the min watermarks (``oom_floor``: the real test guest ran
out with 47.6 MiB free, not the 70 MiB MemAvailable keeps back), then - with
DEFLATE_ON_OOM - take pages back from the balloon in 1 MiB steps
(VIRTIO_BALLOON_OOM_NR_PAGES = 256), and only then OOM-kill. The kill takes the
workload (the largest process): its resident memory and its swap are freed (they stay
backed on the host, free), the kernel and page cache stay. The workload restarts at once
and at the next interval allocates what the trace says it uses, which may kill it again:
each kill counts, and the demand it could not hold in the interval it was killed is
``unserved_kib`` (a guest that stays broken keeps being charged). Swapped working-set
pages are touched again and swapped back in (thrashing when there is no room).

A guest boots with the trace's first demand resident and only its minimum page cache:
nothing is assumed; the replay's warm-up fills the cache from the trace's reads and
writes.

Dropping page cache is not free: a guest re-reads the hot file data it lost (Linux
counts these re-reads as major faults; mm/workingset.c detects them as refaults). The
trace's disk reads are what the real guest read from disk; we assume data read in the
last ``cache_reuse_s`` (an exponentially decaying window, ``hot_cache``) is read again
if evicted. Eviction takes the cold part of the cache first, as Linux reclaims the
inactive list first; the hot part it takes becomes ``refault_debt``, re-read with the
time constant of swapped pages being touched and cached again where there is room.
This is pessimistic for anyone who drops cache, and the same for every policy.

All sizes are KiB held as float64 for bulk arithmetic; snapshots round them to int.
Counters (swap in/out, faults, OOM kills) are cumulative since boot, as the guest
reports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from sim import compiled
from sim.memory import fleet_kernel
from sim.memory.kernel import DEBIAN_6_1_PC, GuestKernel, GuestReserve, guest_reserve
from sim.virtio.backing import RamBacking
from sim.virtio.balloon_spec import BALLOON_PAGE_KIB, PAGE_REPORTING_CAPACITY, PAGE_REPORTING_DELAY_S, PAGEBLOCK_ORDER
from sim.virtio.device import STAT_ARRAY_NAMES, StatArrays
from sim.virtio.driver import DEFLATE_KIB_S, INFLATE_KIB_S, OUT_OF_PUFF_RETRY_S, BalloonDriver, FleetDriver

Array = npt.NDArray[np.float64]
T = TypeVar("T", Array, float)
OOM_STEP_KIB = 256 * 4  # VIRTIO_BALLOON_OOM_NR_PAGES x 4 KiB, per OOM notification
EPSILON_KIB = 1.0
# Where two fields sit in the kernel's state (``Fleet._land_compiled`` checks them).
_OOM_DEFLATES = fleet_kernel.KernelState._fields.index("oom_deflates")
_KERNEL_BALLOON = fleet_kernel.KernelState._fields.index("balloon")
REPORT_BLOCK_KIB = 4 << PAGEBLOCK_ORDER  # free page reporting's order-9 blocks: 2 MiB
# ``fleet_kernel.advance``'s scalars for one interval length: move, report passes, report, land.
KernelScalars = tuple[
    tuple[float, float, float, float], int, tuple[float, float, float], tuple[float, float, float, float, float]
]


_BOOT = DEBIAN_6_1_PC


class GuestModelParams(BaseModel):
    """Constants of the guest memory model, with where each comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # Issue 16: measured on the test image (Debian 6.1 cloud, QEMU 'pc'): sim.memory.kernel.BootMeasurement.
    reserved_fixed_kib: int = Field(_BOOT.reserved_fixed_kib, ge=0, description="RAM outside MemTotal, fixed part")
    reserved_pct: float = Field(_BOOT.reserved_pct, ge=0, lt=50, description="... plus struct pages etc.")
    kernel_fixed_kib: int = Field(_BOOT.kernel_fixed_kib, ge=0, description="kernel memory in use after boot")
    kernel_pct: float = Field(_BOOT.kernel_pct, ge=0, lt=50, description="... plus hash tables sized by RAM")
    min_free_pct: float | None = Field(
        None,
        ge=0,
        lt=50,
        description="free memory the kernel keeps, % of RAM; default: the guest kernel's own rules per size",
    )
    cache_min_pct: float = Field(1.0, ge=0, lt=50, description="page cache reclaim never goes below this")
    swap_touch_s: float = Field(60.0, gt=0, description="mean time before a swapped working-set page is touched")
    cache_reuse_s: float = Field(
        3600.0, gt=0, description="file data read within about this long is hot: it will be read again if evicted"
    )
    report_residue_pct: float = Field(10.0, ge=0, le=100, description="free memory not in reportable 2 MiB blocks")


@dataclass(frozen=True, slots=True)
class GuestSpec:
    """How one simulated guest is built."""

    uuid: str
    name: str
    ram_kib: int
    swap_kib: int = 512 * 1024
    deflate_on_oom: bool = False
    reporting: bool = False
    floor_kib: int = 0
    weight: float = 1.0
    backing: RamBacking = field(default_factory=RamBacking)
    free_page_hint: bool = False
    stats_phase_s: float = 0.0  # when its stats timer first fires (real guests' run each in its own phase)


def reserve_for(params: GuestModelParams, ram_kib: Array, kernel: GuestKernel | None = None) -> GuestReserve:
    """The reserve each guest keeps: ``params.min_free_pct`` of its RAM when the model
    sets one flat share (a calibrated fleet), else ``kernel``'s own rules for each guest's
    size (``sim.memory.kernel.guest_reserve``; default: the test image's Debian 6.1, THP on)."""
    own = guest_reserve([int(r) for r in ram_kib], kernel)
    if params.min_free_pct is not None:
        flat = ram_kib * params.min_free_pct / 100
        # The floor and the lists follow the kernel's rules: the floor in the same
        # proportion to the reserve as the kernel's own.
        floor = flat * own.oom_floor_kib / own.totalreserve_kib
        return GuestReserve(flat, floor, flat.copy(), own.pcp_cap_kib)
    return own


def bulk_release_fraction(backing: RamBacking, *, inhibited: bool = False) -> float:
    """Share of ballooned (touched) pages the host releases, in closed form for Linux's
    requests of 256 contiguous 4 KiB PFNs (the protocol model's rule, ``sim.virtio.backing``):
    a host page is freed only if one request covers it, so host pages of up to 1 MiB
    are freed whole and larger ones (2 MiB hugetlbfs) never."""
    if inhibited or not backing.frees():
        return 0.0
    return 1.0 if backing.page_bytes <= 256 * 4096 else 0.0


def _clip(a: Array, lo: float | Array, hi: float | Array) -> Array:
    """``np.clip`` as the two ufuncs numpy documents it to be (``minimum(maximum(a,
    lo), hi)``), without its Python dispatch wrappers: ``Fleet.advance`` clips ~9 times a
    tick, and at 50 guests the wrappers cost more than the arithmetic (issue 13 profile)."""
    return np.minimum(np.maximum(a, lo), hi)


@dataclass(frozen=True, slots=True)
class FixedRow:
    """One guest's sizes that never change once its Fleet is built, as Python floats:
    the protocol path reads them on every 256-PFN request, where an ``.item`` per array
    cost more than the arithmetic. Sums are taken in the order the array code takes
    them (left to right), so every double is the one that code computes."""

    ram_kib: float
    base_kib: float  # reserved + kernel
    usable_kib: float  # ram - reserved - kernel
    min_free_kib: float
    cache_min_kib: float


def take_in_order(amount: T, layers: list[T], minimum: Callable[[T, T], T]) -> list[T]:
    """Take ``amount`` from ``layers``, the first layer first: what each one gave. One
    rule for arrays (``np.minimum``) and one guest's scalars (``min``)."""
    taken = []
    for layer in layers:
        part = minimum(amount, layer)
        taken.append(part)
        amount = amount - part
    return taken


class Fleet:
    """Memory state of every guest, one array element per guest."""

    def __init__(
        self,
        specs: list[GuestSpec],
        params: GuestModelParams,
        initial_demand_kib: Array,
        initial_read_kib_s: Array | None = None,
        reserve: GuestReserve | None = None,
    ) -> None:
        self.specs = specs
        self.params = p = params
        f = np.float64
        self.ram = np.array([s.ram_kib for s in specs], dtype=f)
        self.swap_size = np.array([s.swap_kib for s in specs], dtype=f)
        self.deflate_on_oom = np.array([s.deflate_on_oom for s in specs], dtype=bool)
        self.reporting = np.array([s.reporting for s in specs], dtype=bool)
        self.reserved = p.reserved_fixed_kib + self.ram * p.reserved_pct / 100
        self.kernel = p.kernel_fixed_kib + self.ram * p.kernel_pct / 100
        # Issue 16: the free memory the kernel keeps, per guest size (``reserve``, by
        # default the 6.1 rules of sim.memory.kernel), unless the model sets one flat share.
        r = reserve or reserve_for(p, self.ram)
        self.min_free, self.oom_floor, self.wmark_low = r.totalreserve_kib, r.oom_floor_kib, r.wmark_low_kib
        self.pcp_cap = r.pcp_cap_kib
        self.cache_min = self.ram * p.cache_min_pct / 100
        self.driver: FleetDriver = BalloonDriver(len(specs), self.deflate_on_oom)
        self.release_frac = np.array([bulk_release_fraction(s.backing) for s in specs])
        self.balloon_resident = np.zeros_like(self.ram)  # ballooned pages the host did not release
        # Nothing is invented: the guest starts with the trace's first demand resident and
        # only the minimum page cache; the cache fills from the trace's own reads and
        # writes (the replay simulates a warm-up span before it scores, ``sim.evaluation.replay``).
        self.anon = np.minimum(initial_demand_kib, self._capacity() - self.min_free - self.cache_min)
        self.swap = np.zeros_like(self.ram)
        self.cache = self.cache_min.copy()
        # Everything in use has been touched; free memory has not.
        self.touched = self.reserved + self.kernel + self.anon + self.cache
        self.deflated_free = np.zeros_like(self.ram)  # free, unbacked, handed back by the balloon
        # Free pages on the per-CPU lists (part of ``free``, not of MemFree: ``pcp_kib``).
        self.pcp = np.zeros_like(self.ram)
        self.older_touched = np.zeros_like(self.ram)  # touched free pages freed before that
        self.reported_free = np.zeros_like(self.ram)  # free, unbacked, returned by page reporting
        # The minimum cache is hot if the guest reads at all at its first rate (passed in
        # by the replay, its first trace sample; without it nothing is hot yet).
        io = np.zeros_like(self.ram) if initial_read_kib_s is None else initial_read_kib_s
        self.hot_cache = np.minimum(self.cache, io * p.cache_reuse_s)  # part of cache
        self.refault_debt = np.zeros_like(self.ram)  # hot data evicted, not yet read again
        self.own_refault_debt = np.zeros_like(self.ram)  # the part the guest's own growth evicted, unballooned
        # This interval's harm, per guest: demand the workload could not hold (killed in
        # the interval: down until it restarts at the next), and whether the guest could
        # not hold its demand at all (killed, or thrashing: swapped pages it touched found
        # no room and pushed others out).
        self.unserved_kib = np.zeros_like(self.ram)
        self.degraded = np.zeros(len(specs), dtype=bool)
        self.reaping = np.zeros(len(specs), dtype=bool)  # killed workloads whose memory is not freed yet
        self.host_swapped = np.zeros_like(self.ram)  # guest pages the host swapped out (sim.memory.host)
        # Cumulative counters, as the guest reports them (KiB or counts).
        self.swap_in = np.zeros_like(self.ram)
        self.swap_out = np.zeros_like(self.ram)
        self.major_faults = np.zeros_like(self.ram)
        self.minor_faults = np.zeros_like(self.ram)
        self.oom_kills = np.zeros_like(self.ram)
        self.oom_deflates = np.zeros_like(self.ram)
        self.refault_kib = np.zeros_like(self.ram)  # hot file data read again after eviction
        # ... of which evicted by the guest's own reclaim while its balloon was empty: the
        # workload's own paging, which it does on a host with no overcommit too (as the
        # demand cap of sim.memory.workload leaves what a guest cannot hold unballooned out).
        self.own_refault_kib = np.zeros_like(self.ram)
        self.host_swap_in = np.zeros_like(self.ram)  # host-swapped guest pages touched again (KiB)
        # The bulk driver's fleets land each interval through the compiled kernel (the
        # numpy methods below are its reference); the protocol model's driver never does.
        self.compiled = compiled.AVAILABLE
        self._fixed_rows: dict[int, FixedRow] = {}  # made per guest on first use (``fixed_row``)
        # What the compiled path's stats samples read (``_advance_compiled``): one block, a row per stat.
        self._sample_rows = np.zeros((len(STAT_ARRAY_NAMES), len(specs)))
        self._sample = StatArrays.of_block(self._sample_rows)
        self._scalars_by_dt: dict[float, KernelScalars] = {}
        self._landed: Array | None = None  # ``landed``, from the last compiled advance
        self._idle_driver: tuple[Array, npt.NDArray[np.bool_], Array, Array] | None = None  # see ``_land_state``

    # -- what the guest shows ------------------------------------------------------

    @property
    def balloon(self) -> Array:
        return self.driver.balloon_kib

    def actual(self) -> Array:
        return self.ram - self.driver.balloon_kib

    def _capacity(self) -> Array:
        """Memory the guest can allocate to anon and cache: its pool less the kernel,
        the balloon and the blocks free page hinting holds."""
        return self.ram - self.reserved - self.kernel - self.driver.balloon_kib - self.driver.held_kib

    def free(self) -> Array:
        return np.maximum(self._capacity() - self.anon - self.cache, 0.0)

    def mem_free(self) -> Array:
        """MemFree: NR_FREE_PAGES, the buddy allocator's free pages. Pages on the per-CPU
        lists are free but not counted there (mm/page_alloc.c: rmqueue_bulk() takes them
        off NR_FREE_PAGES when it fills a list, free_unref_page_commit() adds a freed page
        to a list without counting it, free_pcppages_bulk() counts it when the list gives
        it back), so MemFree and MemAvailable leave them out."""
        return np.maximum(self.free() - self.pcp, 0.0)

    def mem_total(self) -> Array:
        """MemTotal: the driver's adjust_managed_page_count() takes ballooned pages out
        of it unless DEFLATE_ON_OOM (Linux commit 997e120843e8)."""
        return self.ram - self.reserved - self.driver.managed_removed_kib

    def mem_available(self) -> Array:
        """MemAvailable as si_mem_available() (mm/page_alloc.c, 6.1) estimates it: free
        less totalreserve_pages, plus the page cache less min(half of it, the low watermarks)."""
        return self._mem_available(self.mem_free())

    def _mem_available(self, free: Array) -> Array:
        """``mem_available`` from ``mem_free`` already computed."""
        return np.maximum(free - self.min_free + self.cache - np.minimum(self.cache / 2, self.wmark_low), 0.0)

    def stats(self) -> StatArrays:
        """What each guest's stats would report now, by ``GuestStats`` field."""
        free = self.mem_free()  # once: MemAvailable starts from it
        return StatArrays(
            swap_in_kib=self.swap_in,
            swap_out_kib=self.swap_out,
            major_faults=self.major_faults,
            minor_faults=self.minor_faults,
            mem_free_kib=free,
            mem_total_kib=self.mem_total(),
            mem_available_kib=self._mem_available(free),
            disk_caches_kib=self.cache,
            oom_kills=self.oom_kills,
        )

    # -- time passes ---------------------------------------------------------------

    def advance(
        self,
        dt_s: float,
        demand_kib: Array,
        read_kib_s: Array,
        between: Callable[[Callable[[], StatArrays]], None] | None = None,
    ) -> None:
        """Move every guest ``dt_s`` forward under its working-set demand and file reads.

        The balloons move first: they follow targets set at the previous instant and
        finish long before this one (at ~1 GiB/s). ``between`` is then handed that state's
        stats (computed on demand), the state every stats sample taken during the interval
        saw; the workload and the pressure it causes land at the end of the interval."""
        if self.compiled and type(self.driver) is BalloonDriver:
            self._advance_compiled(dt_s, demand_kib, read_kib_s)
            if between is not None:
                between(lambda: self._sample)
            return
        self._landed = None
        self._move_balloon(dt_s)
        self._report_free(dt_s)
        if between is not None:
            between(self.stats)
        if not (self.compiled and self._land_compiled(dt_s, demand_kib, read_kib_s)):
            self.land_workload(dt_s, demand_kib, read_kib_s)

    def _advance_compiled(self, dt_s: float, demand_kib: Array, read_kib_s: Array) -> None:
        """``advance`` through the compiled kernel, in one call (``fleet_kernel.advance``):
        the stats the interval's samples read are left in ``_sample``."""
        driver = self.driver
        assert isinstance(driver, BalloonDriver)
        self.unserved_kib = np.empty_like(self.ram)
        self.degraded = np.empty(len(self.ram), dtype=bool)
        self._landed = np.empty((4, len(self.ram)))
        move, passes, report, land = self._kernel_scalars(dt_s)
        fleet_kernel.advance(
            self._kernel_state(),
            dt_s,
            move,
            passes,
            report,
            self.wmark_low,
            driver.deflate_on_oom_negotiated,
            self._sample_rows,
            np.ascontiguousarray(demand_kib, dtype=np.float64),
            np.ascontiguousarray(read_kib_s, dtype=np.float64),
            land,
            self.unserved_kib,
            self.degraded,
            self._landed,
        )

    def _land_compiled(self, dt_s: float, demand_kib: Array, read_kib_s: Array) -> bool:
        """``land_workload`` through the compiled ``fleet_kernel.land`` for a driver that
        moves its balloons on its own clock (the protocol model's); False where the
        reference must run instead, with the driver's own shrinker and OOM notifier.

        The kernel releases no hint blocks, and deflates on OOM as the bulk driver
        would: from ``balloon_kib``, in one step. So it stands in where no block is held
        and it gives back on OOM exactly what the notifier would: nothing. Where every
        DEFLATE_ON_OOM balloon is empty, neither can give anything; where some is not,
        the arrays are kept first and put back if the kernel deflated (``balloon_kib``
        or ``oom_deflates`` moved). A balloon whose pages still await the host's ack
        (the notifier has some, ``balloon_kib`` none) is the reference's alone: its
        notifier counts them in before it gives any back (``LinuxBalloonDriver.oom_notify``)."""
        d, oom = self.driver, self.deflate_on_oom
        if d.held_kib.any() or not np.isfinite(d.balloon_kib).all():
            return False
        ballooned = d.balloon_kib != 0
        if (oom & ~ballooned & (d.notifier_kib > 0)).any():
            return False
        state = self._land_state()
        before = [a.copy() for a in state] if (oom & ballooned).any() else None
        unserved, degraded = np.empty_like(self.ram), np.empty(len(self.ram), dtype=bool)
        demand = np.ascontiguousarray(demand_kib, dtype=np.float64)
        read = np.ascontiguousarray(read_kib_s, dtype=np.float64)
        fleet_kernel.land_state(state, demand, read, dt_s, *self._kernel_scalars(dt_s)[3], unserved, degraded)
        if before is not None and not all(
            np.array_equal(state[k], before[k]) for k in (_OOM_DEFLATES, _KERNEL_BALLOON)
        ):
            for now, was in zip(state, before, strict=True):
                now[...] = was
            return False
        self.unserved_kib, self.degraded = unserved, degraded
        return True

    def _land_state(self) -> tuple[npt.NDArray[Any], ...]:
        """``_kernel_state`` for a driver other than the bulk one: idle stand-ins for
        the bulk driver's own fields, which ``land`` touches only to deflate on OOM
        (and then ``_land_compiled`` puts everything back)."""
        n = len(self.ram)
        if self._idle_driver is None:
            self._idle_driver = (np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n), np.zeros(n))
        return self._state_with(*self._idle_driver)

    def land_workload(self, dt_s: float, demand_kib: Array, read_kib_s: Array) -> None:
        """The interval's workload and the pressure it causes, at its end. The reference:
        ``sim.memory.fleet_kernel`` does the same guest by guest, compiled."""
        self._reap_victims()
        self._follow_demand(demand_kib)
        self._grow_cache(dt_s, read_kib_s)
        killed = self._relieve_pressure()
        thrashing = self._swap_in(dt_s)
        self._refault(dt_s)
        self.touched = self._clip_touched()
        self._settle_free_layers()
        self.unserved_kib = np.where(killed, demand_kib, 0.0)
        self.degraded = killed | thrashing

    def _kernel_scalars(self, dt_s: float) -> KernelScalars:
        """``fleet_kernel.advance``'s scalars for an interval of ``dt_s``, worked out once
        per interval length (a replay has one or two; a few ``exp`` a tick added up)."""
        found = self._scalars_by_dt.get(dt_s)
        if found is None:
            if len(self._scalars_by_dt) > 64:  # irregular intervals: keep the cache small
                self._scalars_by_dt.clear()
            found = (
                self._move_scalars(dt_s),
                self._report_passes(dt_s),
                self._report_scalars(),
                self._land_scalars(dt_s),
            )
            self._scalars_by_dt[dt_s] = found
        return found

    def _land_scalars(self, dt_s: float) -> tuple[float, float, float, float, float]:
        """``fleet_kernel.land``'s scalars: the ones the reference computes with
        ``np.exp``/``math.exp`` computed the same way."""
        p = self.params
        return (
            math.exp(-dt_s / p.cache_reuse_s),
            float(1.0 - np.exp(-dt_s / p.swap_touch_s)),
            1.0 - math.exp(-dt_s / p.swap_touch_s),
            float(OOM_STEP_KIB),
            EPSILON_KIB,
        )

    def _kernel_state(self) -> tuple[npt.NDArray[Any], ...]:
        """``fleet_kernel.KernelState``'s arrays, in its order, as the plain tuple
        ``fleet_kernel.advance`` takes."""
        d = self.driver
        assert isinstance(d, BalloonDriver)
        return self._state_with(d.num_pages_kib, d.waiting_for_config, d.puff_clock_s, d.puff_retries)

    def _state_with(
        self, num_pages_kib: Array, waiting_for_config: npt.NDArray[np.bool_], puff_clock_s: Array, puff_retries: Array
    ) -> tuple[npt.NDArray[Any], ...]:
        """The kernel's view of the Fleet and its driver, given the bulk driver's own fields."""
        d = self.driver
        return (
            self.ram,
            self.reserved,
            self.kernel,
            self.min_free,
            self.oom_floor,
            self.cache_min,
            self.swap_size,
            self.deflate_on_oom,
            self.anon,
            self.swap,
            self.cache,
            self.hot_cache,
            self.touched,
            self.balloon_resident,
            self.older_touched,
            self.deflated_free,
            self.reported_free,
            self.pcp,
            self.pcp_cap,
            self.refault_debt,
            self.own_refault_debt,
            self.reaping,
            self.swap_in,
            self.swap_out,
            self.major_faults,
            self.minor_faults,
            self.oom_kills,
            self.oom_deflates,
            self.refault_kib,
            self.own_refault_kib,
            d.balloon_kib,
            d.held_kib,
            num_pages_kib,
            waiting_for_config,
            puff_clock_s,
            puff_retries,
            self.release_frac,
            self.reporting & ~d.reports_itself,
        )

    def _allocate(self, amount: Array) -> None:
        """New pages come from the free list, last freed first; every one that is not a
        touched free page costs the host a fresh page."""
        fresh, deflated, older = take_in_order(amount, self._free_layers(), np.minimum)
        self.deflated_free -= deflated
        self.older_touched -= older
        self.touched += amount - fresh - older
        self.minor_faults += amount / 4
        self._take_pcp(amount)

    def _take_pcp(self, amount_kib: Array) -> None:
        """An allocation (or an inflate's) takes its pages from the per-CPU list first
        (mm/page_alloc.c rmqueue(): order-0 pages come from rmqueue_pcplist())."""
        self.pcp = np.maximum(self.pcp - amount_kib, 0.0)

    def _fill_pcp(self, freed_kib: Array) -> None:
        """Freed pages go to the per-CPU lists (free_unref_page_commit()), which give the
        excess back to the buddy lists: they hold at most ``pcp_cap``
        (``sim.memory.kernel.pcp_cap_pages``)."""
        self.pcp = np.minimum(self.pcp + freed_kib, self.pcp_cap)

    def _free_layers(self) -> list[Array]:
        """The free list from its head: touched pages freed since the last deflate, the
        deflated pages, older touched pages (never-touched ones lie below all three)."""
        touched_free = self._touched_free()
        return [np.maximum(touched_free - self.older_touched, 0.0), self.deflated_free, self.older_touched]

    def _settle_free_layers(self) -> None:
        """Keep the layers inside what is free: reclaim, reporting and the workload move
        pages without going through ``_allocate``. The per-CPU lists stay inside the free
        memory above the reserve: the buddy lists keep the watermarks (kswapd), and an
        allocation short of them drains the lists first (mm/page_alloc.c
        __alloc_pages_direct_reclaim(): drain_all_pages())."""
        touched_free = self._touched_free()
        self.older_touched = np.minimum(self.older_touched, touched_free)
        untouched_free = np.maximum(self.free() - touched_free, 0.0)
        self.deflated_free = _clip(self.deflated_free, 0.0, untouched_free)
        # Reported pages go back to the tail of the free lists (mm/page_reporting.c puts
        # them back with FPI_TO_TAIL), so allocations take never-touched pages first: the
        # reported ones are the last of the untouched free pages to go.
        self.reported_free = _clip(self.reported_free, 0.0, untouched_free - self.deflated_free)
        self.pcp = _clip(self.pcp, 0.0, np.maximum(self.free() - self.min_free, 0.0))

    def mark_reported(self, i: int | slice, kib: float | Array) -> None:
        """The host discarded ``kib`` of guest ``i``'s touched free pages, reported free."""
        self.touched[i] -= kib
        self.reported_free[i] += kib

    def cold_kib(self) -> Array:
        """Touched guest pages the guest does not use: free ones, cold page cache and
        ballooned pages the host still backs (the host swaps these first, ``sim.memory.host``)."""
        cold = self._touched_free() + np.maximum(self.cache - self.hot_cache, 0.0) + self.balloon_resident
        return np.minimum(cold, self.touched)

    def landed(self) -> tuple[Array, tuple[Array, Array, Array]]:
        """``mem_available()`` and ``saved_split()``, as the scorecard reads them after an
        interval: from the compiled kernel, which worked them out as the interval landed,
        when the last ``advance`` ran it; the Fleet must not have changed since (a target
        set between only moves ``num_pages``, which neither reads). Otherwise worked out
        now (compiled where the Fleet is: ``fleet_kernel.landed_state``)."""
        landed = self._landed
        if landed is None:
            if not self.compiled:
                return self.mem_available(), self.saved_split()
            # The protocol model's balloons move between advances: worked out now, compiled.
            landed = np.empty((4, len(self.ram)))
            fleet_kernel.landed_state(self._land_state(), self.wmark_low, landed)
        available, ballooned, unbacked, reported = landed
        return available, (ballooned, unbacked, reported)

    def saved_split(self) -> tuple[Array, Array, Array]:
        """Host memory not backing each guest, by where it comes from (the rest of
        ``ram - touched`` was never touched since boot): ballooned now (released by the
        host), unbacked after a deflate and not touched since, returned by reporting."""
        ballooned = np.maximum(self.driver.balloon_kib - self.balloon_resident, 0.0)
        saved = np.maximum(self.ram - self.touched, 0.0)
        ballooned = np.minimum(ballooned, saved)
        unbacked = np.minimum(self.deflated_free, saved - ballooned)
        reported = np.minimum(self.reported_free, saved - ballooned - unbacked)
        return ballooned, unbacked, reported

    def _touched_free(self) -> Array:
        """Free guest pages that are still backed by host RAM."""
        in_use = self.reserved + self.kernel + self.anon + self.cache + self.balloon_resident
        return np.maximum(self.touched - in_use, 0.0)

    def spare_kib(self) -> Array:
        """What a __GFP_NORETRY allocation can get: free above the low watermark, plus
        page cache above its minimum."""
        return np.maximum(self.free() - self.min_free, 0.0) + np.maximum(self.cache - self.cache_min, 0.0)

    def _move_balloon(self, dt_s: float) -> None:
        """The bulk driver moves the balloons (compiled: ``fleet_kernel.move_balloons``);
        the protocol model moves them on the World clock instead (its ``advance`` leaves
        them be) and reports each request through ``balloon_moved``."""
        before = self.driver.balloon_kib.copy()
        self.driver.advance(dt_s, self.spare_kib())
        delta = self.driver.balloon_kib - before
        if delta.any():
            self.balloon_moved(delta, self.release_frac)

    def fixed_row(self, i: int) -> FixedRow:
        """Guest ``i``'s fixed sizes as floats (``FixedRow``), read once and kept."""
        row = self._fixed_rows.get(i)
        if row is None:
            ram, reserved, kernel = self.ram.item(i), self.reserved.item(i), self.kernel.item(i)
            row = FixedRow(
                ram, reserved + kernel, ram - reserved - kernel, self.min_free.item(i), self.cache_min.item(i)
            )
            self._fixed_rows[i] = row
        return row

    @staticmethod
    def _move_scalars(dt_s: float) -> tuple[float, float, float, float]:
        """``fleet_kernel.move_balloons``' scalars: the bulk driver's rates over ``dt_s``."""
        return INFLATE_KIB_S * dt_s, DEFLATE_KIB_S * dt_s, OUT_OF_PUFF_RETRY_S, float(BALLOON_PAGE_KIB)

    def balloon_moved_one(self, i: int, delta_kib: float, release_frac: float) -> None:
        """``balloon_moved`` for guest ``i`` alone, in scalars: the protocol path calls it
        once per 256-PFN request, where numpy over every guest would dominate. ``.item``
        reads give the same doubles as numpy scalars at a fraction of the cost."""
        row = self.fixed_row(i)
        balloon_kib = self.driver.balloon_kib.item(i)
        before = balloon_kib - delta_kib
        anon, cache, touched = self.anon.item(i), self.cache.item(i), self.touched.item(i)
        resident = self.balloon_resident.item(i)
        in_use = row.base_kib + anon + cache
        touched_free = max(touched - in_use - resident, 0.0)
        deflated_free, older = self.deflated_free.item(i), self.older_touched.item(i)
        if delta_kib > 0:
            capacity = (row.usable_kib - self.driver.held_kib.item(i)) - before
            free_before = max(capacity - anon - cache, 0.0)
            from_free = min(delta_kib, max(free_before - row.min_free_kib, 0.0))
            from_cache = delta_kib - from_free
            self._evict_cache_one(i, from_cache)
            layers = [max(touched_free - older, 0.0), deflated_free, older]
            fresh_taken, deflated_taken, older_taken = take_in_order(from_free, layers, min)
            self.deflated_free[i] = deflated_free - deflated_taken
            self.older_touched[i] = older - older_taken
            self.pcp[i] = max(self.pcp.item(i) - from_free, 0.0)  # Fleet._take_pcp
            taken_touched = from_cache + fresh_taken + older_taken
            touched -= release_frac * taken_touched
            resident += (1.0 - release_frac) * taken_touched
        elif delta_kib < 0 and before > 0:
            back_resident = resident * min(-delta_kib / before, 1.0)
            resident -= back_resident
            self.older_touched[i] = touched_free
            self.deflated_free[i] = deflated_free - delta_kib - back_resident
            self.pcp[i] = min(self.pcp.item(i) - delta_kib, self.pcp_cap.item(i))  # Fleet._fill_pcp
        self.balloon_resident[i] = resident
        if delta_kib > 0:
            limit = (row.ram_kib - balloon_kib) + resident
            self.touched[i] = min(max(touched, 0.0), limit)

    def balloon_moved(self, delta_kib: Array, release_frac: Array) -> None:
        """Account a balloon change that already happened (``driver.balloon_kib`` holds
        the new size): inflation takes free pages first, last freed first, then page
        cache; the host releases ``release_frac`` of the touched pages taken, the rest
        stay resident in the balloon. Deflated pages come back to the head of the free
        list; the resident ones still touched."""
        inflated = np.maximum(delta_kib, 0.0)
        before = self.driver.balloon_kib - delta_kib
        free_before = np.maximum(self._capacity() + delta_kib - self.anon - self.cache, 0.0)
        layers = self._free_layers()
        from_free = np.minimum(inflated, np.maximum(free_before - self.min_free, 0.0))
        from_cache = inflated - from_free
        self._evict_cache(from_cache)
        fresh_taken, deflated_taken, older_taken = take_in_order(from_free, layers, np.minimum)
        self.deflated_free -= deflated_taken
        self.older_touched -= older_taken
        taken_touched = from_cache + fresh_taken + older_taken
        self.touched -= release_frac * taken_touched
        self.balloon_resident += (1.0 - release_frac) * taken_touched
        self._take_pcp(from_free)  # balloon_page_alloc() is an order-0 allocation
        deflated = np.maximum(-delta_kib, 0.0)
        share = np.divide(deflated, before, out=np.zeros_like(before), where=before > 0)
        self._deflated(deflated, self.balloon_resident * np.minimum(share, 1.0))
        self._fill_pcp(deflated)  # release_pages_balloon() frees each page: put_page()
        # Only an inflate can push touched pages past the limit; a deflate (the OOM
        # notifier's, amid an allocation) only raises it. Rows as ``balloon_moved_one``.
        self.touched = np.where(delta_kib > 0, self._clip_touched(), self.touched)

    def _deflated(self, deflated_kib: Array, back_resident_kib: Array) -> None:
        """Pages a deflate gave back go to the head of the free list, above every free
        page there; those the host had not released come back still touched."""
        self.older_touched = np.where(deflated_kib > 0, self._touched_free(), self.older_touched)
        self.deflated_free += deflated_kib - back_resident_kib
        self.balloon_resident -= back_resident_kib

    def _clip_touched(self) -> Array:
        """Touched pages cannot exceed the guest's pages outside the balloon plus the
        ballooned pages the host still backs."""
        return _clip(self.touched, 0.0, self.ram - self.driver.balloon_kib + self.balloon_resident)

    def _follow_demand(self, demand: Array) -> None:
        """The working set follows the trace, also after an OOM kill: the killed workload
        restarted at once and allocates what the trace says it uses (and may be killed
        again: each kill counts)."""
        working_set = self.anon + self.swap
        grow = np.maximum(demand - working_set, 0.0)
        self._allocate(grow)
        self.anon += grow
        shrink = _clip(1.0 - demand / np.maximum(working_set, 1.0), 0.0, 1.0)
        freed = self.anon * shrink
        self.anon -= freed
        self.swap -= self.swap * shrink
        self._fill_pcp(freed)  # munmap frees through free_unref_page_list()

    def _grow_cache(self, dt_s: float, read_kib_s: Array) -> None:
        """File reads fill free memory above the low watermark and are hot; what was hot
        cools over ``cache_reuse_s``. Every read is hot, also one that found no free room:
        it replaced cold cache (Linux's LRU), so a guest squeezed to its watermark still
        holds hot data a further squeeze would evict."""
        read = read_kib_s * dt_s
        room = np.maximum(self.free() - self.min_free, 0.0)
        grow = np.minimum(read, room)
        self._allocate(grow)
        self.cache += grow
        cooled = self.hot_cache * math.exp(-dt_s / self.params.cache_reuse_s)
        self.hot_cache = np.minimum(self.cache, cooled + read)

    def _evict_cache(self, amount_kib: Array, *, by_reclaim: bool = False) -> None:
        """Take page cache away (balloon or reclaim). Linux reclaims the inactive (cold)
        list first, so hot data goes only once the cold is gone; the hot data taken is
        owed back as refaults (mm/workingset.c's refault detection is the idea). What the
        guest's own reclaim takes while its balloon is empty is its workload's doing, not
        a policy's (``own_refault_debt``; see ``own_refault_kib``)."""
        if not amount_kib.any():
            return
        hot_lost = _clip(amount_kib - (self.cache - self.hot_cache), 0.0, self.hot_cache)
        self.cache -= amount_kib
        self.hot_cache -= hot_lost
        self.refault_debt += hot_lost
        if by_reclaim:
            unballooned = (self.driver.balloon_kib <= 0) & (self.driver.held_kib <= 0)
            self.own_refault_debt += np.where(unballooned, hot_lost, 0.0)

    def _evict_cache_one(self, i: int, amount_kib: float) -> None:
        """``_evict_cache`` for guest ``i`` alone, in scalars (the protocol path's rate)."""
        if not amount_kib:  # as ``_evict_cache``: nothing taken, nothing to move
            return
        cache, hot = self.cache.item(i), self.hot_cache.item(i)
        hot_lost = min(max(amount_kib - (cache - hot), 0.0), hot)
        self.cache[i] = cache - amount_kib
        self.hot_cache[i] = hot - hot_lost
        self.refault_debt[i] = self.refault_debt.item(i) + hot_lost

    def _relieve_pressure(self) -> npt.NDArray[np.bool_]:
        """Reclaim, swap, auto-deflate, then OOM-kill; returns which guests killed."""
        over = self.anon + self.cache + self.min_free - self._capacity()
        from_cache = _clip(over, 0.0, np.maximum(self.cache - self.cache_min, 0.0))
        self._evict_cache(from_cache, by_reclaim=True)
        over -= from_cache
        # Reclaim also runs the balloon's shrinker: free page hinting blocks go back whole.
        if self.driver.held_kib.any():
            over -= self.driver.release_held(np.maximum(over, 0.0))
        to_swap = _clip(over, 0.0, np.maximum(self.swap_size - self.swap, 0.0))
        self.anon -= to_swap
        self.swap += to_swap
        self.swap_out += to_swap
        over -= to_swap
        # Reclaim keeps free at the high watermarks; with nothing left to reclaim,
        # allocations go on down to the min watermarks before the OOM path (``oom_floor``).
        over -= self.min_free - self.oom_floor
        over = np.where(over > EPSILON_KIB, over, 0.0)  # float dust is not pressure
        steps = np.where(self.deflate_on_oom & (over > 0), np.ceil(over / OOM_STEP_KIB), 0.0)
        given = self.driver.deflate_on_oom(steps * OOM_STEP_KIB)
        if not self.driver.accounts_deflates:
            self._deflated(given, np.zeros_like(given))
            # Freed as any deflate's; the allocation that ran short takes them (``_settle_free_layers``).
            self._fill_pcp(given)
        self.oom_deflates += np.ceil(given / OOM_STEP_KIB)
        over -= given
        return self._oom_kill(over)

    def _oom_kill(self, over: Array) -> npt.NDArray[np.bool_]:
        """The OOM killer takes the workload (the largest process) where ``over`` > 0: it
        got what fitted, the guest is exhausted, and its swap is freed. Its resident
        memory goes when it is reaped, after the stats the guest sends next (the 6.1
        kernel's oom_reaper and exit_mmap() free it asynchronously, mm/oom_kill.c: the
        real test guest's next sample still showed it in use, issue 16), so a policy sees
        the exhaustion before the collapse, as a real daemon does. The rest of the guest
        (kernel, page cache) stays; the freed pages stay touched on the host (free but
        backed), first in line for the restart, which the next interval's
        ``_follow_demand`` makes."""
        killed = over > 0
        if killed.any():
            self.oom_kills += killed
            self.anon = np.where(killed, np.maximum(self.anon - over, 0.0), self.anon)
            self.swap = np.where(killed, 0.0, self.swap)
            self.reaping |= killed
        return killed

    def _reap_victims(self) -> None:
        """Free the memory of the workloads killed in the previous interval (``_oom_kill``)."""
        if self.reaping.any():
            # exit_mmap() frees the victim's pages through the per-CPU lists too (``_fill_pcp``)
            self.pcp = np.where(self.reaping, np.minimum(self.pcp + self.anon, self.pcp_cap), self.pcp)
            self.anon = np.where(self.reaping, 0.0, self.anon)
            self.reaping = np.zeros_like(self.reaping)

    def _swap_in(self, dt_s: float) -> npt.NDArray[np.bool_]:
        """Swapped working-set pages are touched within ``swap_touch_s`` on average; with
        room they come back, without it they push others out (thrashing: returned)."""
        touched = self.swap * (1.0 - np.exp(-dt_s / self.params.swap_touch_s))
        self.swap_in += touched
        self.major_faults += touched / 4
        room = np.maximum(self._capacity() - self.min_free - self.cache_min - self.anon, 0.0)
        back = np.minimum(touched, room)
        self.swap_out += touched - back  # thrash: each page in pushes one out
        self._allocate(back)
        self.anon += back
        self.swap -= back
        trim = self.cache - np.maximum(self._capacity() - self.anon, self.cache_min)
        self._evict_cache(np.maximum(trim, 0.0), by_reclaim=True)
        return np.asarray(touched - back > EPSILON_KIB, dtype=bool)

    def _refault(self, dt_s: float) -> None:
        """Evicted hot file data is read again as swapped pages are touched (within
        ``swap_touch_s`` on average): major faults, and back into the page cache as a
        trace read would be, hot again. The working set came back first (``_swap_in``);
        a re-read with no room left above the low watermark is read once and dropped,
        like a trace read with no room: keeping it owed would charge it every tick."""
        if not self.refault_debt.any():
            return
        reread = self.refault_debt * (1.0 - math.exp(-dt_s / self.params.swap_touch_s))
        self.refault_debt -= reread
        self.refault_kib += reread
        own = self.own_refault_debt * (1.0 - math.exp(-dt_s / self.params.swap_touch_s))
        self.own_refault_debt -= own
        self.own_refault_kib += own
        self.major_faults += reread / 4  # 4 KiB pages
        back = np.minimum(reread, np.maximum(self.free() - self.min_free, 0.0))
        self._allocate(back)
        self.cache += back
        self.hot_cache += back

    @staticmethod
    def _report_passes(dt_s: float) -> int:
        return max(int(np.ceil(dt_s / PAGE_REPORTING_DELAY_S)) - 1, 0)

    def _report_scalars(self) -> tuple[float, float, float]:
        """``fleet_kernel.report_free``'s scalars after ``passes``."""
        return float(PAGE_REPORTING_CAPACITY), float(REPORT_BLOCK_KIB), self.params.report_residue_pct

    def reportable_blocks(self) -> Array:
        """Free 2 MiB blocks (order 9) not yet reported, per guest: touched free memory
        less the fragmented residue, and none while the zone is below its low watermark
        plus 32 blocks (mm/page_reporting.c's zone gate). Compiled where the Fleet is
        (``fleet_kernel.reportable_blocks``), this numpy its reference."""
        if self.compiled:
            out = np.empty(len(self.ram))
            fleet_kernel.reportable_blocks(self._land_state(), *self._report_scalars(), out)
            return out
        free = self.free()
        gate = free >= self.min_free + PAGE_REPORTING_CAPACITY * REPORT_BLOCK_KIB
        unreported = self._touched_free() - free * self.params.report_residue_pct / 100
        return np.where(gate, np.floor(np.maximum(unreported, 0.0) / REPORT_BLOCK_KIB), 0.0)

    def _report_free(self, dt_s: float) -> None:
        """Free page reporting in closed form (Linux mm/page_reporting.c, the protocol
        model's ``page_reporting_process``): blocks that were free at the last instant are
        reported in passes 2 s apart, the first 2 s after it, so ``ceil(dt/2) - 1`` passes
        fall inside the interval; a pass makes ceil(n / (32*16)) report calls of up to 32
        blocks; the host discards what is reported (compiled: ``fleet_kernel.report_free``)."""
        bulk = self.reporting & ~self.driver.reports_itself
        if not bulk.any():
            return
        for _ in range(self._report_passes(dt_s)):
            n = np.where(bulk, self.reportable_blocks(), 0.0)
            if not n.any():
                return
            calls = np.ceil(n / (PAGE_REPORTING_CAPACITY * 16))
            self.mark_reported(slice(None), np.minimum(n, calls * PAGE_REPORTING_CAPACITY) * REPORT_BLOCK_KIB)
