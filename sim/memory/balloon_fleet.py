"""The protocol speed for a whole fleet: one byte-level balloon per guest, kept in step
with the bulk ``Fleet``.

Each guest gets a ``GuestBalloon``: a small guest-physical memory window holding its
rings (``sim.virtio.guestmem``), QEMU's device (``sim.virtio.device.VirtioBalloon``), Linux's driver
(``sim.virtio.driver.LinuxBalloonDriver``) and the host's view of its RAM (``sim.virtio.backing``).
They run on the World clock only when something happens: a target (config interrupt,
then 256-PFN requests), a stats poll, an OOM, a report pass. ``FleetMm`` is the guest
kernel's memory manager over the guest's row of the Fleet's arrays, so every request
lands in the same numbers the bulk path advances.

``ProtocolBalloons`` presents the same two seams as the bulk path: the driver seam the
Fleet uses (``balloon_kib``, ``managed_removed_kib``, ``deflate_on_oom``, ...) and the
device seam SimHypervisor uses (``set_target``, ``stats``, ``last_update_s``, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

import sim.virtio.balloon_spec as spec
from sim import compiled
from sim.memory import inflate_runs, protocol_kernel, stats_runs
from sim.memory.guest import Array, FixedRow, Fleet, GuestSpec
from sim.virtio.backing import HostRam
from sim.virtio.device import STAT_ARRAY_NAMES, StatArrays, VirtioBalloon
from sim.virtio.driver import LinuxBalloonDriver
from sim.virtio.guestmem import GuestMemory
from sim.virtio.world import World

WINDOW_BYTES = 128 * 1024  # rings of all five queues (~40 KiB), indirect tables, PFN and stats buffers
FIRST_FREE_PFN = WINDOW_BYTES // 4096  # frames below hold the window: never handed to the balloon
FRESH_RUN_PAGES = 1 << 16  # 256 MiB of frames per descending run (256 KiB of u32)
U32s = npt.NDArray[np.uint32]

# GuestStats field -> (device stat tag, bytes per unit): memory in bytes, counters as counts.
_TAG_OF = {
    "swap_in_kib": (spec.VIRTIO_BALLOON_S_SWAP_IN, 1024),
    "swap_out_kib": (spec.VIRTIO_BALLOON_S_SWAP_OUT, 1024),
    "major_faults": (spec.VIRTIO_BALLOON_S_MAJFLT, 1),
    "minor_faults": (spec.VIRTIO_BALLOON_S_MINFLT, 1),
    "mem_free_kib": (spec.VIRTIO_BALLOON_S_MEMFREE, 1024),
    "mem_total_kib": (spec.VIRTIO_BALLOON_S_MEMTOT, 1024),
    "mem_available_kib": (spec.VIRTIO_BALLOON_S_AVAIL, 1024),
    "disk_caches_kib": (spec.VIRTIO_BALLOON_S_CACHES, 1024),
    "oom_kills": (spec.VIRTIO_BALLOON_S_OOM_KILL, 1),
}

# ``_TAG_OF`` in the row order of a ``StatArrays`` block: the host's copy in one store.
_BLOCK_TAGS = [_TAG_OF[name][0] for name in STAT_ARRAY_NAMES]
_BLOCK_UNITS = np.array([_TAG_OF[name][1] for name in STAT_ARRAY_NAMES], dtype=np.uint64)


# The 16 entries update_balloon_stats() writes, in Linux's order (vm events first):
# (tag, GuestStats field or None for a counter the model keeps at 0, units per KiB).
_STAT_ROW: tuple[tuple[int, str | None, int], ...] = (
    (spec.VIRTIO_BALLOON_S_SWAP_IN, "swap_in_kib", 1024),
    (spec.VIRTIO_BALLOON_S_SWAP_OUT, "swap_out_kib", 1024),
    (spec.VIRTIO_BALLOON_S_MAJFLT, "major_faults", 1),
    (spec.VIRTIO_BALLOON_S_MINFLT, "minor_faults", 1),
    (spec.VIRTIO_BALLOON_S_OOM_KILL, "oom_kills", 1),
    (spec.VIRTIO_BALLOON_S_ALLOC_STALL, None, 1),
    (spec.VIRTIO_BALLOON_S_ASYNC_SCAN, None, 1),
    (spec.VIRTIO_BALLOON_S_DIRECT_SCAN, None, 1),
    (spec.VIRTIO_BALLOON_S_ASYNC_RECLAIM, None, 1),
    (spec.VIRTIO_BALLOON_S_DIRECT_RECLAIM, None, 1),
    (spec.VIRTIO_BALLOON_S_HTLB_PGALLOC, None, 1),
    (spec.VIRTIO_BALLOON_S_HTLB_PGFAIL, None, 1),
    (spec.VIRTIO_BALLOON_S_MEMFREE, "mem_free_kib", 1024),
    (spec.VIRTIO_BALLOON_S_MEMTOT, "mem_total_kib", 1024),
    (spec.VIRTIO_BALLOON_S_AVAIL, "mem_available_kib", 1024),
    (spec.VIRTIO_BALLOON_S_CACHES, "disk_caches_kib", 1024),
)
_STAT_TAGS = tuple(tag for tag, _, _ in _STAT_ROW)
_STATS_BYTES = len(_STAT_ROW) * spec.STAT.size  # one guest's entries
_UNKEPT = [0] * 7  # the 7 counters between oom_kills and mem_free the model keeps at 0
assert [name is None for _, name, _ in _STAT_ROW] == [False] * 5 + [True] * 7 + [False] * 4
_STAT_NAMES = [name for _, name, _ in _STAT_ROW if name is not None]
_STAT_UNITS = np.array([[unit] for _, name, unit in _STAT_ROW if name is not None], dtype=np.float64)
# One ``virtio_balloon_stat`` (le16 tag, le64 val, packed: ``spec.STAT``) as a numpy
# record, so every guest's entries are packed in one call.
_STAT_RECORD = np.dtype([("tag", "<u2"), ("val", "<u8")])
assert _STAT_RECORD.itemsize == spec.STAT.size
_KEPT_AT = [k for k, (_, name, _) in enumerate(_STAT_ROW) if name is not None]  # entries the model fills


def spare_kib(
    row: FixedRow, balloon_kib: float, held_kib: float, anon_kib: float, cache_kib: float, reclaim: bool
) -> float:
    """What one guest can give its balloon: free memory above ``min_free``, plus page
    cache above its floor when the allocation may reclaim (``sim.memory.protocol_kernel``
    computes the same after a request, in the same order)."""
    free = row.usable_kib - balloon_kib - held_kib - anon_kib - cache_kib
    spare = max(free - row.min_free_kib, 0.0)
    return float(spare + (max(cache_kib - row.cache_min_kib, 0.0) if reclaim else 0.0))


class FleetMm:
    """Guest ``i``'s memory manager, over the Fleet's arrays (the ``GuestMm`` protocol)."""

    def __init__(self, fleet: Fleet, balloons: ProtocolBalloons, i: int, ram_pages: int) -> None:
        self.fleet, self.balloons, self.i = fleet, balloons, i
        # ``vm_stats`` as the driver writes it into its buffer (``virtio_balloon_stat``
        # entries back to back), packed once per change of the guests' stats.
        self.packed_stats: Callable[[], bytes] = functools.partial(balloons.packed_stats, i)
        self.row = fleet.fixed_row(i)
        self.ram_pages = ram_pages
        self._next_pfn = ram_pages  # never-used frames are handed out from the top down
        self._run, self._run_top = np.empty(0, dtype=np.uint32), ram_pages - 1  # see ``_fresh``
        self._free_stack: list[U32s] = []  # frames given back, reused first (LIFO)
        self._free_stack_pages = 0  # how many frames it holds
        self._hint_next_pfn = FIRST_FREE_PFN
        self._report_next_pfn = 0
        self.host = HostRam()  # replaced by GuestBalloon with the guest's own
        self._released_seen = 0
        self._spare_kib, self._spare_version = 0.0, -1  # see ``_row_spare_kib``

    def _row_spare_kib(self, reclaim: bool = True) -> float:
        """What the guest can give the balloon now; right after a request's compiled
        accounting, the figure that call returned (the Fleet has not changed since)."""
        if reclaim and self._spare_version == self.balloons.fleet_version:
            return self._spare_kib
        # ``.item`` gives Python floats: the same doubles as numpy scalars, at a tenth the cost.
        f, i = self.fleet, self.i
        balloon, held = self.balloons.balloon_kib.item(i), self.balloons.held_kib.item(i)
        return spare_kib(self.row, balloon, held, f.anon.item(i), f.cache.item(i), reclaim)

    def fill_spare_kib(self) -> float:
        """What the next inflate request's allocation finds to take (``alloc_pages``)."""
        return self._row_spare_kib()

    def _fresh(self, k: int) -> U32s:
        """Up to ``k`` never-used frames, top down: a slice of one descending run made
        per ``FRESH_RUN_PAGES`` frames (an arange per 256 requests, not per request).
        The run is never written: the driver copies PFNs into its own array."""
        top, lo = self._next_pfn, max(self._next_pfn - k, FIRST_FREE_PFN)
        run, run_top = self._run, self._run_top
        if lo >= top:
            return run[:0]
        if run_top - lo >= len(run):  # the run does not reach down to lo: start a new one
            length = min(max(FRESH_RUN_PAGES, top - lo), top - FIRST_FREE_PFN)
            run = self._run = np.arange(top - 1, top - 1 - length, -1, dtype=np.uint32)
            run_top = self._run_top = top - 1
        self._next_pfn = lo
        return run[run_top - (top - 1) : run_top - lo + 1]

    def alloc_pages(self, n: int) -> U32s:
        return self._take(min(n, int(self._row_spare_kib() // spec.BALLOON_PAGE_KIB)))

    def _take(self, k: int) -> U32s:
        """``k`` frames: the ones given back first, most recent first, then fresh ones."""
        if k > 0 and not self._free_stack:  # the common case: fresh frames
            return self._fresh(k)
        out: list[U32s] = []
        while k > 0 and self._free_stack:
            top = self._free_stack[-1]
            take = min(k, len(top))
            out.append(top[len(top) - take :])
            self._free_stack[-1] = top[: len(top) - take]
            if not len(self._free_stack[-1]):
                self._free_stack.pop()
            self._free_stack_pages -= take
            k -= take
        if k > 0:
            out.append(self._fresh(k))
        if len(out) == 1:  # frames from one array given back: a view, no copy
            return out[0]
        return np.concatenate(out) if out else np.empty(0, dtype=np.uint32)

    def _moved(self, delta_kib: float, release_frac: float) -> None:
        """The balloon moved by ``delta_kib``: the driver seam's ``balloon_kib`` and the
        Fleet's layers, compiled in one call where numba is on (``protocol_kernel``)."""
        balloons, i = self.balloons, self.i
        balloons.fleet_changed()
        if compiled.AVAILABLE:
            self._spare_kib = protocol_kernel.balloon_moved_one(
                self.fleet, balloons.balloon_kib, balloons.held_kib, self.row, i, delta_kib, release_frac
            )
            self._spare_version = balloons.fleet_version
            return
        balloons.balloon_kib[i] = balloons.balloon_kib.item(i) + delta_kib
        self.fleet.balloon_moved_one(i, delta_kib, release_frac)

    def balloon_taken(self, pages: int) -> None:
        """Account an inflate request; what the host released decides how many of the
        touched pages taken stop costing it (glue, not guest code: it reads the host)."""
        released = self.host.released_bytes - self._released_seen
        self._released_seen = self.host.released_bytes
        self._moved(pages * spec.BALLOON_PAGE_KIB, min(released / (pages * spec.BALLOON_PAGE_BYTES), 1.0))

    def pages_left(self) -> int:
        """Frames ``alloc_pages`` can hand out before reaching the window: the ones given
        back, then fresh ones."""
        return self._free_stack_pages + self._next_pfn - FIRST_FREE_PFN

    def release_unseen(self) -> bool:
        """Whether the host released memory no inflate request has accounted yet."""
        return self.host.released_bytes != self._released_seen

    def taken_at_once(self, requests: int, pages: int, spare_kib: float, fleet_changes: int) -> list[U32s]:
        """This side of ``requests`` inflate requests of ``pages`` frames each done at
        once, the Fleet's accounting already done (``sim.memory.inflate_runs``): the
        arrays ``alloc_pages`` gave each, the host's releases seen, and the spare KiB
        the last accounting returned, current after ``fleet_changes`` changes."""
        arrays: list[U32s] = []
        while len(arrays) < requests and self._free_stack:  # frames given back: as each would
            arrays.append(self._take(pages))
        while len(arrays) < requests:
            # As many requests as the current run of frames holds, in one ``_fresh``
            # (one at a time where the next renews the run, as each would alone).
            fit = (self._next_pfn - (self._run_top - len(self._run) + 1)) // pages
            n = max(min(requests - len(arrays), fit), 1)
            block = self._fresh(n * pages)
            arrays.extend(block[j * pages : (j + 1) * pages] for j in range(n))
        self._released_seen = self.host.released_bytes
        self._accounted_at_once(spare_kib, fleet_changes)
        return arrays

    def freed_at_once(self, arrays: list[U32s], spare_kib: float, fleet_changes: int) -> None:
        """``taken_at_once``'s mirror for deflate requests: ``free_pages`` of each of
        ``arrays`` in order, the Fleet's accounting already done."""
        self._free_stack.extend(arrays)
        self._free_stack_pages += sum(len(a) for a in arrays)
        self._accounted_at_once(spare_kib, fleet_changes)

    def _accounted_at_once(self, spare_kib: float, fleet_changes: int) -> None:
        """The Fleet changed ``fleet_changes`` times, the last leaving ``spare_kib``."""
        self.balloons.fleet_version += fleet_changes
        self._spare_kib, self._spare_version = spare_kib, self.balloons.fleet_version

    def free_pages(self, pfns: U32s) -> None:
        self._free_stack.append(pfns)
        self._free_stack_pages += len(pfns)
        self._moved(-len(pfns) * spec.BALLOON_PAGE_KIB, 0.0)

    def adjust_managed_page_count(self, pages: int) -> None:
        balloons, i = self.balloons, self.i
        balloons.fleet_changed()
        balloons.managed_removed_kib[i] = balloons.managed_removed_kib.item(i) - pages * spec.BALLOON_PAGE_KIB

    def vm_stats(self) -> list[tuple[int, int]]:
        """The 16 entries current Linux sends, vm events first, in its order (every
        guest's rows are built at once, in numpy, by ``ProtocolBalloons.stats_rows``)."""
        return list(zip(_STAT_TAGS, self.balloons.stats_rows()[self.i]))

    # free page hinting: blocks taken without reclaim, held until DONE

    def alloc_block(self, order: int) -> int | None:
        size_kib = 4 << order
        if self._row_spare_kib(reclaim=False) < size_kib:
            return None
        pfn = self._hint_next_pfn
        self._hint_next_pfn = (pfn + (1 << order)) % max(self.ram_pages - (1 << order), 1)
        self.balloons.fleet_changed()
        self.balloons.held_kib[self.i] += size_kib
        return pfn

    def free_block(self, pfn: int, order: int) -> None:
        self.balloons.fleet_changed()
        self.balloons.held_kib[self.i] -= 4 << order

    # free page reporting: touched free memory in whole 2 MiB blocks, past the zone gate

    def reportable_blocks(self, order: int) -> int:
        return int(self.fleet.reportable_blocks()[self.i])

    def isolate_reportable(self, n: int, order: int) -> list[int]:
        k = min(n, self.reportable_blocks(order))
        blocks = []
        for _ in range(k):
            blocks.append(self._report_next_pfn)
            self._report_next_pfn = (self._report_next_pfn + (1 << order)) % (
                self.ram_pages // (1 << order) * (1 << order)
            )
        return blocks

    def mark_reported(self, pfns: list[int], order: int, discarded: bool) -> None:
        if discarded:
            self.balloons.fleet_changed()
            f, i = self.fleet, self.i
            f.mark_reported(i, min(len(pfns) * (4 << order), float(f._touched_free()[i])))


class GuestBalloon:
    """One guest's byte-level balloon: memory window, device, driver, host RAM."""

    def __init__(
        self, world: World, gspec: GuestSpec, mm_factory: Callable[[int], FleetMm], *, stats_period_s: int
    ) -> None:
        world = world.guest_world()  # its own events on its own clock (``World.guest_world``)
        ram_pages = gspec.ram_kib // spec.BALLOON_PAGE_KIB
        self.mem = GuestMemory(WINDOW_BYTES, ram_pages)
        self.host = HostRam(gspec.backing)
        self.device = VirtioBalloon(
            world,
            self.mem,
            self.host,
            deflate_on_oom=gspec.deflate_on_oom,
            free_page_hint=gspec.free_page_hint,
            free_page_reporting=gspec.reporting,
        )
        self.mm = mm_factory(ram_pages)
        self.mm.host = self.host
        self.driver = LinuxBalloonDriver(world, self.mem, self.device, self.mm)
        self.device.stats_run = functools.partial(stats_runs.exchange_run, self)
        if compiled.AVAILABLE:
            self.driver.fill_run = functools.partial(inflate_runs.fill_run, self)
            self.driver.leak_run = functools.partial(inflate_runs.leak_run, self)
        self.driver.probe()
        if stats_period_s:
            # Polling switched on at the guest's stats phase fires at once, as the bulk
            # device's timer (``sim.virtio.device.BalloonDevice``).
            switch_on = functools.partial(self.device.set_stats_poll_interval, stats_period_s)
            if gspec.stats_phase_s > 0:
                world.schedule_at(world.now_s + gspec.stats_phase_s, switch_on)
            else:
                switch_on()


class ProtocolBalloons:
    """Every guest's protocol-level balloon behind the bulk path's two seams."""

    def __init__(self, world: World, fleet: Fleet, specs: list[GuestSpec], stats_period_s: float) -> None:
        if stats_period_s != int(stats_period_s):
            raise ValueError(f"stats_period_s(={stats_period_s}) must be whole seconds (QEMU's property is an int)")
        n = len(specs)
        self.world, self.fleet = world, fleet
        self.ram_kib = fleet.ram
        self.balloon_kib = np.zeros(n)
        self.held_kib = np.zeros(n)
        self.managed_removed_kib = np.zeros(n)
        self.reports_itself = np.array([s.reporting for s in specs], dtype=bool)
        self.accounts_deflates = True  # every page back goes through FleetMm.free_pages
        self.stats_period_s = np.full(n, float(stats_period_s))
        self.last_update_s = np.full(n, -np.inf)
        self.stats = StatArrays.zeros(n)
        self._copied_updates = [0] * n
        self.fleet_version = 0
        self._kept: tuple[int, bytes, npt.NDArray[np.int64]] | None = None  # fleet_version, bytes, values
        self._packed_stats = b""  # every guest's entries, packed from ``_kept`` (``_pack``)
        fleet.driver = self  # the Fleet's driver seam (``sim.virtio.driver.FleetDriver``), protocol speed
        self.guests = [
            GuestBalloon(world, s, functools.partial(FleetMm, fleet, self, i), stats_period_s=int(stats_period_s))
            for i, s in enumerate(specs)
        ]
        self._devices = [g.device for g in self.guests]
        self.poll_stats(world.now_s)

    # -- the Fleet's state, as the guests' stats read it -------------------------------

    def fleet_changed(self) -> None:
        """Something moved a guest's memory: the next stats gather reads the Fleet again,
        and the next inflate request its spare memory (``FleetMm._row_spare_kib``)."""
        self.fleet_version += 1

    def fleet_stats(self) -> StatArrays:
        """``Fleet.stats()``: what the guests' stats gathers read (``stats_rows``)."""
        return self.fleet.stats()

    def stats_rows(self) -> list[list[int]]:
        """Every guest's 16 stat values (``_STAT_ROW`` order, bytes or counts): the
        reference ``vm_stats`` reads; the driver's gathers read ``packed_stats``."""
        kept = self._kept_stats()
        return [row[:5] + _UNKEPT + row[5:] for row in kept.T.tolist()]

    def _kept_stats(self) -> npt.NDArray[np.int64]:
        """The stats the model fills, every guest's (rows in ``_STAT_NAMES`` order, bytes
        or counts), from ``fleet_stats``: one numpy pass instead of one dict per guest
        per gather. Truncated toward zero, as ``int()`` of each float would be; packed
        for the drivers (``packed_stats``) whenever a value changed.

        Computed once per change of the Fleet (``fleet_version``), not per gather: each
        guest's timer fires on its own phase, several gathers between two moves, and
        each would otherwise compute every guest's arrays to read its own row. Every
        path that changes the Fleet between its ticks goes through ``FleetMm`` or this
        seam, which call ``fleet_changed``; the Fleet's own advance calls ``advance``
        (a change) before it moves anything, and nothing gathers until it returns, so
        nothing made before it survives it (``FleetMm._row_spare_kib`` relies on the same)."""
        cached = self._kept
        if cached is not None and cached[0] == self.fleet_version:
            return cached[2]
        stats = self.fleet_stats()
        kept = (np.array([getattr(stats, name) for name in _STAT_NAMES]) * _STAT_UNITS).astype(np.int64)  # truncates
        kept_bytes = kept.tobytes()  # the values, compared in one call (same shape each time)
        if cached is None or kept_bytes != cached[1]:
            # (A change that left every value as it was, a request's accounting between
            # gathers moving a few KiB, keeps the entries packed before.)
            self._packed_stats = self._pack(kept)
        self._kept = (self.fleet_version, kept_bytes, kept)
        return kept

    @staticmethod
    def _pack(kept: npt.NDArray[np.int64]) -> bytes:
        """Every guest's 16 entries as its driver writes them (``spec.stats_array`` over
        (tag, value) pairs), guest after guest, in one numpy call; the counters the
        model keeps at 0 as zeros. A value below 0 is refused, as ``struct`` refuses it."""
        if (kept < 0).any():
            raise ValueError(f"a guest's stat is negative: {kept.min()}")
        entries = np.zeros((kept.shape[1], len(_STAT_ROW)), dtype=_STAT_RECORD)
        entries["tag"] = _STAT_TAGS
        entries["val"][:, _KEPT_AT] = kept.T
        return entries.tobytes()

    def packed_stats(self, i: int) -> bytes:
        """Guest ``i``'s ``stats_rows`` entries packed as its driver writes them: the
        bytes of ``spec.stats_array`` over (tag, value) pairs, made once per change."""
        cached = self._kept
        if cached is None or cached[0] != self.fleet_version:
            self._kept_stats()
        return self._packed_stats[i * _STATS_BYTES : (i + 1) * _STATS_BYTES]

    # -- the driver seam (Fleet) ---------------------------------------------------

    @property
    def puff_retries(self) -> Array:
        return np.array([g.driver.puff_count for g in self.guests], dtype=np.float64)

    @property
    def notifier_kib(self) -> Array:
        return np.array([g.driver.num_pages * spec.BALLOON_PAGE_KIB for g in self.guests], dtype=np.float64)

    def config_changed(self, i: int, num_pages_kib: float) -> None:
        """The host writes guest ``i``'s ``num_pages`` (in KiB here) and interrupts."""
        self.guests[i].device.set_num_pages(int(num_pages_kib) // spec.BALLOON_PAGE_KIB)

    def advance(self, dt_s: float, spare_kib: Array) -> None:
        """Nothing to move: balloons moved request by request on the World clock. The
        Fleet calls this first in its own advance, which changes every guest."""
        self.fleet_changed()

    def deflate_on_oom(self, wanted_kib: Array) -> Array:
        """Run each guest's OOM notifier until it covered ``wanted_kib`` or had nothing."""
        self.fleet_changed()
        given = np.zeros_like(wanted_kib)
        for i in np.flatnonzero(wanted_kib > 0):
            driver = self.guests[i].driver
            while given[i] < wanted_kib[i]:
                pages = driver.oom_notify()
                if not pages:
                    break
                given[i] += pages * spec.BALLOON_PAGE_KIB
        self.fleet_changed()  # the Fleet's advance goes on changing it: no cached spare survives
        return given

    def release_held(self, wanted_kib: Array) -> Array:
        """Memory pressure runs each guest's hinting shrinker: whole 4 MiB blocks back."""
        self.fleet_changed()
        given = np.zeros_like(wanted_kib)
        block_kib = 4 << spec.VIRTIO_BALLOON_HINT_BLOCK_ORDER
        for i in np.flatnonzero((wanted_kib > 0) & (self.held_kib > 0)):
            blocks = int(np.ceil(wanted_kib[i] / block_kib))
            given[i] = self.guests[i].driver.shrink_free_pages(blocks) * block_kib
        return given

    def after_advance(self) -> None:
        """Free memory changed in bulk: reporting guests get their 2-s timer armed."""
        self.fleet_changed()
        if not self.reports_itself.any():
            return
        blocks = self.fleet.reportable_blocks()  # once for all guests, not once per guest
        for i in np.flatnonzero(self.reports_itself & (blocks > 0)):
            self.guests[i].driver.page_reporting_notify_free()

    # -- the device seam (SimHypervisor) -------------------------------------------

    def set_target(self, i: int, target_kib: int) -> None:
        self.guests[i].device.to_target(target_kib * 1024)

    def poll_stats(self, now_s: float, current: StatArrays | None = None) -> None:
        """Copy what each device last received (u64 bytes/counts) into KiB arrays: the
        guests with a new sample since the last copy, all at once."""
        updates = [d.stats_updates for d in self._devices]
        if updates == self._copied_updates:
            return
        # Each guest polls every tick or two: usually all are fresh, and a slice stores faster.
        fresh = [i for i, (new, old) in enumerate(zip(updates, self._copied_updates, strict=True)) if new != old]
        devices = [self._devices[i] for i in fresh]
        self._copied_updates = updates
        cols: list[int] | slice = slice(None) if len(fresh) == len(self.guests) else fresh
        self.last_update_s[cols] = [d.stats_last_update_s for d in devices]
        block = self.stats.block
        assert block is not None  # ``StatArrays.zeros`` made it
        # The u64 values ("-1" is 2**64 - 1) divided exactly in u64 and rounded to float
        # once (as ``float()`` of the Python quotient would): one store, rows in block order.
        values = np.array([d.stats for d in devices], dtype=np.uint64)[:, _BLOCK_TAGS]
        block[:, cols] = (values // _BLOCK_UNITS).astype(np.float64).T

    def has_stats(self) -> npt.NDArray[np.bool_]:
        return np.asarray(np.isfinite(self.last_update_s), dtype=bool)
