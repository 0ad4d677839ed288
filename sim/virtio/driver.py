"""The guest's balloon driver (Linux drivers/virtio/virtio_balloon.c), at both of the
simulator's speeds.

* ``BalloonDriver``: the bulk path, every guest at once: it moves each balloon toward
  the host's ``num_pages`` at the rate a real guest achieves and stops where the guest
  has nothing left to give.
* ``LinuxBalloonDriver``: the protocol path, one guest: config interrupt -> work item ->
  256-PFN requests over the inflate/deflate virtqueues, the OOM notifier, stats, free
  page reporting and hinting, as generator processes on the World clock.

Both keep these rates and rules:

* inflate 128 MiB in 0.11-0.19 s and deflate it in 0.05-0.17 s on a TCG guest
  (real-guest.md): about 0.9 GiB/s and 1.2 GiB/s at the calibration of ``sim.virtio.calibration``;
* inflation takes only pages the guest can spare (the allocation is
  ``__GFP_NORETRY``); short of the target, the driver logs "Out of puff!", sleeps
  200 ms and retries, for as long as the target stays out of reach (each retry costs
  guest CPU, so retries are counted);
* with DEFLATE_ON_OOM the OOM notifier takes pages back, 256 per OOM event, and the
  driver does not re-inflate until the host's next config-change interrupt (unless its
  size work was still running, short of the target: then it keeps retrying, as Linux).
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections.abc import Callable, Generator
from typing import Protocol

import numpy as np
import numpy.typing as npt

import sim.virtio.balloon_spec as spec
from sim.virtio import calibration as cal
from sim.virtio.backing import HostRam
from sim.virtio.balloon_spec import BALLOON_PAGE_KIB
from sim.virtio.calibration import DEFLATE_REQUEST_S, FAILED_ALLOC_S, INFLATE_REQUEST_S
from sim.virtio.guestmem import Arena, GuestMemory
from sim.virtio.process import ProcessGen, Signal, WorkItem
from sim.virtio.virtqueue import Buf, DriverQueue, RingLayout, VirtioError
from sim.virtio.world import World

Array = npt.NDArray[np.float64]
# One 256-PFN (1 MiB) request per INFLATE_REQUEST_S: the protocol model's calibrated pace.
INFLATE_KIB_S = 1024.0 / INFLATE_REQUEST_S
DEFLATE_KIB_S = 1024.0 / DEFLATE_REQUEST_S
# msleep(200) after "Out of puff!", plus the failed allocation's own direct-reclaim pass.
OUT_OF_PUFF_RETRY_S = 0.2 + FAILED_ALLOC_S


class FleetDriver(Protocol):
    """The driver seam the bulk ``Fleet`` reads and drives, met by both speeds: the bulk
    ``BalloonDriver`` and the protocol model's ``sim.memory.balloon_fleet.ProtocolBalloons``.
    Arrays hold one element per guest, memory in KiB."""

    balloon_kib: Array
    held_kib: Array  # free page hinting blocks the driver holds
    reports_itself: npt.NDArray[np.bool_]  # free page reporting runs in the driver, not the Fleet
    # The pages the OOM notifier gives back already went through the Fleet's per-request
    # accounting (``Fleet.balloon_moved_one``, from the guest's own mm): the Fleet must not
    # free them again (the protocol model's driver; the bulk one leaves it to the Fleet).
    accounts_deflates: bool

    @property
    def managed_removed_kib(self) -> Array:
        """What adjust_managed_page_count() took out of MemTotal."""
        ...

    @property
    def puff_retries(self) -> Array:
        """Retries after "Out of puff!" so far, per guest."""
        ...

    @property
    def notifier_kib(self) -> Array:
        """What the OOM notifier could take back now: the pages on the driver's balloon
        list, the host's ack awaited or not."""
        ...

    def config_changed(self, i: int, num_pages_kib: float) -> None:
        """The host wrote ``num_pages`` and raised the config interrupt."""
        ...

    def advance(self, dt_s: float, spare_kib: Array) -> None:
        """Move the balloons for ``dt_s`` (a no-op where they move event by event)."""
        ...

    def deflate_on_oom(self, wanted_kib: Array) -> Array:
        """The OOM notifier: what each guest's balloon gave back."""
        ...

    def release_held(self, wanted_kib: Array) -> Array:
        """The hinting shrinker: held blocks given back under pressure."""
        ...


class BalloonDriver:
    """Balloon size and target of every guest, in KiB (4 KiB pages x 4)."""

    def __init__(self, n: int, deflate_on_oom: npt.NDArray[np.bool_] | None = None) -> None:
        self.deflate_on_oom_negotiated = np.zeros(n, dtype=bool) if deflate_on_oom is None else deflate_on_oom
        self.held_kib = np.zeros(n)  # free page hinting blocks: none in the bulk path
        self.reports_itself = np.zeros(n, dtype=bool)  # free page reporting stays the Fleet's, in bulk
        self.accounts_deflates = False
        self.balloon_kib = np.zeros(n)
        self.num_pages_kib = np.zeros(n)  # the host's wish: config num_pages x 4 KiB
        self.waiting_for_config = np.zeros(n, dtype=bool)  # auto-deflated: no inflation until told again
        self.puff_retries = np.zeros(n)
        self.puff_clock_s = np.zeros(n)  # time spent short of the target, while it lasts

    @property
    def managed_removed_kib(self) -> Array:
        """What adjust_managed_page_count() took out of MemTotal: the balloon, unless
        DEFLATE_ON_OOM was negotiated."""
        return np.where(self.deflate_on_oom_negotiated, 0.0, self.balloon_kib)

    @property
    def notifier_kib(self) -> Array:
        return self.balloon_kib

    def config_changed(self, i: int | npt.NDArray[np.int64], num_pages_kib: float | Array) -> None:
        """Config interrupt: the host wrote ``num_pages`` (even the same value again)."""
        self.num_pages_kib[i] = num_pages_kib
        self.waiting_for_config[i] = False

    def advance(self, dt_s: float, spare_kib: Array) -> None:
        """Move toward ``num_pages`` for ``dt_s``; inflate at most ``spare_kib``, in whole
        4 KiB pages (what the allocator can hand out)."""
        diff = self.num_pages_kib - self.balloon_kib
        inflate = np.where(self.waiting_for_config, 0.0, np.clip(diff, 0.0, INFLATE_KIB_S * dt_s))
        spare_pages_kib = np.floor(spare_kib / BALLOON_PAGE_KIB) * BALLOON_PAGE_KIB
        short = inflate > spare_pages_kib
        inflate = np.minimum(inflate, spare_pages_kib)
        deflate = np.clip(-diff, 0.0, DEFLATE_KIB_S * dt_s)
        self.balloon_kib += inflate - deflate
        # A short guest fails an allocation, then retries every OUT_OF_PUFF_RETRY_S for as
        # long as it stays short; the phase carries over from one interval to the next.
        before = np.ceil(self.puff_clock_s / OUT_OF_PUFF_RETRY_S)
        self.puff_clock_s = np.where(short, self.puff_clock_s + dt_s, 0.0)
        self.puff_retries += np.where(short, np.ceil(self.puff_clock_s / OUT_OF_PUFF_RETRY_S) - before, 0.0)

    def release_held(self, wanted_kib: Array) -> Array:
        """The hinting shrinker: the bulk path holds no hint blocks, so nothing."""
        return np.zeros_like(wanted_kib)

    def deflate_on_oom(self, wanted_kib: Array) -> Array:
        """The OOM notifier's leak_balloon(): returns what was given back. A guest whose
        size work was idle (target met) stays deflated until the next config interrupt;
        one still short of its target keeps re-queuing the work, as Linux does."""
        active = self.balloon_kib < self.num_pages_kib
        given = np.minimum(wanted_kib, self.balloon_kib)
        self.balloon_kib -= given
        self.waiting_for_config |= (given > 0) & ~active
        return given


# -- the protocol level: Linux drivers/virtio/virtio_balloon.c, one guest ---------------
#
# Callbacks only schedule; work items do the work, as generators on the World clock.
# Units: ``num_pages`` and ``actual`` count 4 KiB balloon pages (PAGES_PER_PAGE = 1 on
# x86-64); the guest's memory manager (``GuestMm``) hands out and takes back PFNs.


log = logging.getLogger(__name__)
U32s = npt.NDArray[np.uint32]

# What the Linux driver asks for (its feature table) plus the ring features it uses.
DRIVER_FEATURES = sum(
    1 << b
    for b in (
        spec.VIRTIO_BALLOON_F_MUST_TELL_HOST,
        spec.VIRTIO_BALLOON_F_STATS_VQ,
        spec.VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
        spec.VIRTIO_BALLOON_F_FREE_PAGE_HINT,
        spec.VIRTIO_BALLOON_F_PAGE_POISON,
        spec.VIRTIO_BALLOON_F_REPORTING,
        spec.VIRTIO_RING_F_INDIRECT_DESC,
        spec.VIRTIO_RING_F_EVENT_IDX,
        spec.VIRTIO_F_VERSION_1,
    )
)


class GuestMm(Protocol):
    """The guest kernel's memory manager as the balloon driver sees it."""

    def alloc_pages(self, n: int) -> U32s:
        """Up to ``n`` 4 KiB pages with __GFP_NORETRY: fewer means the next one failed."""
        ...

    def free_pages(self, pfns: U32s) -> None: ...

    def balloon_taken(self, pages: int) -> None:
        """``pages`` allocated pages are in the balloon and the host has been told."""
        ...

    def adjust_managed_page_count(self, pages: int) -> None: ...

    def vm_stats(self) -> list[tuple[int, int]]:
        """(tag, value) pairs in the order update_balloon_stats() writes them."""
        ...

    def alloc_block(self, order: int) -> int | None:
        """A free block of 2**order pages (hinting: NORETRY, no reclaim), or None."""
        ...

    def free_block(self, pfn: int, order: int) -> None: ...

    def reportable_blocks(self, order: int) -> int:
        """Free blocks of 2**order pages not yet reported, past the zone gate."""
        ...

    def isolate_reportable(self, n: int, order: int) -> list[int]: ...

    def mark_reported(self, pfns: list[int], order: int, discarded: bool) -> None: ...


class BalloonTransport(Protocol):
    """The virtio-balloon device as the driver reaches it through the transport (QEMU's
    ``sim.virtio.device.VirtioBalloon``): features, status, queue setup, config space in le32
    fields, notifications. The driver sets the interrupt lines at probe (``irq_last``: the
    used-buffer interrupt raised as the device event's last act)."""

    host_features: int
    status: int
    broken: str | None
    host: HostRam  # read by reporting's glue only: did the host discard what was reported
    irq: Callable[[int], None]
    irq_last: Callable[[int], None]
    config_irq: Callable[[], None]

    def set_features(self, bits: int) -> bool: ...

    def set_status(self, status: int) -> None: ...

    def setup_queues(self, layouts: list[RingLayout]) -> None: ...

    def config_readl(self, offset: int) -> int: ...

    def config_writel(self, offset: int, value: int) -> None: ...

    def notify(self, index: int) -> None: ...

    def service_now(self, name: str) -> None: ...


class LinuxBalloonDriver:
    """One guest's virtio_balloon driver: probe, target tracking, stats, OOM,
    free page reporting and hinting, over ``DriverQueue``s in guest memory."""

    def __init__(
        self,
        world: World,
        mem: GuestMemory,
        device: BalloonTransport,
        mm: GuestMm,
        *,
        init_on_free: bool = False,
        page_poisoning: bool = False,
    ) -> None:
        self.world, self.mem, self.device, self.mm = world, mem, device, mm
        self.init_on_free, self.page_poisoning = init_on_free, page_poisoning
        # An mm that keeps its stats entries packed (``sim.memory.balloon_fleet.FleetMm``)
        # hands over the bytes, made once per change; any other is packed per gather.
        self._packed_stats: Callable[[], bytes] = getattr(mm, "packed_stats", self._pack_stats)
        self.arena = Arena(mem)
        self.features = 0
        self.deflate_on_oom_negotiated = False  # fixed at probe; read per request
        self.vqs: dict[str, DriverQueue] = {}
        self.num_pages = 0  # vb->num_pages: 4 KiB units in the balloon
        # Pages fill_balloon enqueued whose ack it still awaits, holding vb->balloon_lock
        # (their accounting is ``_fill_acked``'s, done once per request).
        self.fill_unacked_pages = 0
        self.balloon: list[U32s] = []  # the balloon list, LIFO (balloon_page_enqueue/dequeue)
        self.acked = Signal(world)  # vb->acked
        self.done_tokens: set[int] = set()
        self._token = 0
        self.stopping = False
        self.update_work = WorkItem(world, self.update_balloon_size_func)
        self.stats_work = WorkItem(world, self.stats_handle_request, cal.STATS_WORK_S)
        self.hint_work = WorkItem(world, self.report_free_page_func)
        self.reporting_work = WorkItem(world, self.page_reporting_process, 0.0)
        # Whole inflate and deflate requests done at once, where nothing can come between
        # them (``sim.memory.inflate_runs``): given the pages still to go, the pages moved.
        self.fill_run: Callable[[int], int] | None = None
        self.leak_run: Callable[[int], int] | None = None
        self.puff_count = 0  # "Out of puff!" messages (rate-limited in dmesg, all counted here)
        self.puff_sleep_s = 0.0  # guest time spent in msleep(200) after a failed allocation
        self.cpu_s = 0.0  # guest CPU the driver burnt: allocations (failed ones too), releases
        self.oom_deflates = 0
        self.log: list[tuple[float, str]] = []
        self.cmd_id_active = spec.VIRTIO_BALLOON_CMD_ID_STOP
        self.cmd_id_received_cache: int | None = None
        self.hint_blocks: list[int] = []
        self.reporting_requested = False
        self.reported_blocks = 0

    def has(self, bit: int) -> bool:
        return spec.has(self.features, bit)

    # -- probe --------------------------------------------------------------------

    def probe(self) -> bool:
        """virtballoon_probe: negotiate (with validate()'s rules), init_vqs, poison_val,
        DRIVER_OK, and honour a target the host set before the driver loaded."""
        dev = self.device
        dev.set_status(spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER)
        wanted = dev.host_features & DRIVER_FEATURES
        if not (self.init_on_free or self.page_poisoning):
            wanted &= ~(1 << spec.VIRTIO_BALLOON_F_PAGE_POISON)
        elif not spec.has(wanted, spec.VIRTIO_BALLOON_F_PAGE_POISON):
            wanted &= ~(1 << spec.VIRTIO_BALLOON_F_REPORTING)
        if not dev.set_features(wanted):
            dev.set_status(spec.VIRTIO_CONFIG_S_FAILED)
            return False
        self.features = wanted
        self.deflate_on_oom_negotiated = self.has(spec.VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        dev.set_status(dev.status | spec.VIRTIO_CONFIG_S_FEATURES_OK)
        self.pfns_addr = self.arena.alloc(4 * spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX, 4)
        self.pfns = self.mem.u32_view(self.pfns_addr, spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX)  # vb->pfns, in place
        self._init_vqs()
        if self.has(spec.VIRTIO_BALLOON_F_PAGE_POISON):
            poison_val = 0 if self.init_on_free else spec.PAGE_POISON * 0x01010101
            self._write_config(spec.CONFIG_POISON_VAL, poison_val)
        dev.config_irq = self.virtballoon_changed
        dev.irq = self._vring_interrupt
        dev.irq_last = self._vring_interrupt_last
        dev.set_status(dev.status | spec.VIRTIO_CONFIG_S_DRIVER_OK)
        if self.towards_target() != 0:
            self.virtballoon_changed()
        return True

    def _init_vqs(self) -> None:
        names = spec.queue_names(self.features)
        event_idx = self.has(spec.VIRTIO_RING_F_EVENT_IDX)
        indirect = self.has(spec.VIRTIO_RING_F_INDIRECT_DESC)
        layouts = []
        for name in names:
            lay = RingLayout.allocate(self.arena, spec.QUEUE_SIZES[name])
            layouts.append(lay)
            self.vqs[name] = DriverQueue(
                self.mem,
                lay,
                event_idx=event_idx,
                indirect=indirect,
                arena=self.arena,
                callback=name != "free_page_vq",
                name=name,
            )
        self.names = names
        self.index = {name: i for i, name in enumerate(names)}
        self.device.setup_queues(layouts)
        if "statsq" in self.vqs:
            # Linux fills real stats and adds *and kicks* inside init_vqs, before DRIVER_OK.
            n = len(self.mm.vm_stats())
            self.stats_addr = self.arena.alloc(spec.STAT.size * n, 8)
            self.stats_len = spec.STAT.size * n
            self._write_stats()
            self._add_and_kick("statsq", [Buf(self.stats_addr, self.stats_len)])
        if "free_page_vq" in self.vqs:
            self.cmd_id_active_addr = self.arena.alloc(4, 4)
            self.cmd_id_stop_addr = self.arena.alloc(4, 4)
        if "reporting_vq" in self.vqs:
            self.reporting_sg_max = spec.PAGE_REPORTING_CAPACITY

    # -- config space and interrupts ----------------------------------------------

    def _read_config(self, offset: int) -> int:
        """virtio_cread_le of one le32 field (the transport reads fields, not the struct)."""
        return self.device.config_readl(offset)

    def _write_config(self, offset: int, value: int) -> None:
        self.device.config_writel(offset, value)

    def _vring_interrupt(self, index: int) -> None:
        """vring_interrupt -> the queue's callback: balloon_ack or stats_request."""
        name = self.names[index]
        if name == "statsq":
            if not self.stopping:
                self.stats_work.queue()
        elif name != "free_page_vq":
            self.acked.fire()

    def _vring_interrupt_last(self, index: int) -> None:
        """``_vring_interrupt`` raised as the device event's last act: the stats work,
        due STATS_WORK_S later, runs on the spot when nothing else is due before it
        (``WorkItem.run_at_once``), as its queued run would."""
        if self.names[index] == "statsq" and not self.stopping and self.stats_work.run_at_once():
            return
        self._vring_interrupt(index)

    def virtballoon_changed(self) -> None:
        """Config interrupt: only schedule work (never inflate from here)."""
        if self.stopping:
            return
        self.update_work.queue(cal.CONFIG_IRQ_TO_WORK_S)
        if self.has(spec.VIRTIO_BALLOON_F_FREE_PAGE_HINT):
            self.cmd_id_received_cache = None  # re-read it from config
            self.hint_work.queue(cal.CONFIG_IRQ_TO_WORK_S)

    def towards_target(self) -> int:
        """Signed 4 KiB units still to inflate (>0) or deflate (<0)."""
        return self.device.config_readl(spec.CONFIG_NUM_PAGES) - self.num_pages  # PAGES_PER_PAGE = 1: no rounding

    def update_balloon_size(self) -> None:
        self.device.config_writel(spec.CONFIG_ACTUAL, self.num_pages)

    # -- inflate and deflate ------------------------------------------------------

    def update_balloon_size_func(self) -> ProcessGen:
        """The work item: one bounded step toward the target, ``actual`` written, and
        re-queued while the target is not met (so big changes go 256 PFNs at a time)."""
        diff = self.towards_target()
        if diff > spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX and self.fill_run is not None:
            diff -= self.fill_run(diff)  # the runs before this one, at once
        elif diff < -spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX and self.leak_run is not None:
            diff += self.leak_run(-diff)
        if diff > 0:
            diff -= yield from self.fill_balloon(diff)
        elif diff < 0:
            diff += yield from self.leak_balloon(-diff)
        self.update_balloon_size()
        if diff and not self.device.broken:
            self.update_work.queue()

    def fill_balloon(self, num: int) -> Generator[float | Signal, None, int]:
        num = min(num, spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX)
        pfns = self.mm.alloc_pages(num)
        got = len(pfns)
        # A failed __GFP_NORETRY allocation still makes one pass of direct reclaim.
        alloc_s = got * cal.GUEST_ALLOC_S_PER_PAGE + (got < num) * cal.FAILED_ALLOC_S
        self.cpu_s += alloc_s
        yield alloc_s
        if got < num:
            self.puff_count += 1
            self.log.append((self.world.now_s, "Out of puff! Can't get 1 pages"))
            self.puff_sleep_s += spec.OUT_OF_PUFF_SLEEP_S
            yield spec.OUT_OF_PUFF_SLEEP_S
        if got == 0:
            return 0
        self.balloon.append(pfns)
        self.num_pages += got
        self.fill_unacked_pages = got
        if not self.deflate_on_oom_negotiated:
            self.mm.adjust_managed_page_count(-got)
        token = self._post_pfns("inflateq", pfns)  # tell_host: post, kick, wait until used
        while not self._acked("inflateq", token):
            yield self.acked
        self._fill_acked()
        return got

    def _fill_acked(self) -> None:
        """The host acked fill_balloon's request: its pages count as the balloon's. Done
        once per request, by the fill or by the OOM notifier that waited for that ack
        first (``oom_notify``), whichever comes first."""
        if self.fill_unacked_pages:
            self.mm.balloon_taken(self.fill_unacked_pages)
            self.fill_unacked_pages = 0

    def filled_at_once(self, arrays: list[U32s], cpu_s: float) -> int:
        """The driver's side of whole inflate requests done at once, one PFN array each,
        every one posted, served and reaped, the work item re-queued after each
        (``sim.memory.inflate_runs``): the balloon list, the shared PFN array, the
        inflate queue, tokens, runs; ``cpu_s`` is the CPU total after them. Returns
        the descriptor every request used (the device's side replays it too)."""
        self.balloon.extend(arrays)
        self.num_pages += sum(len(a) for a in arrays)
        return self._served_at_once("inflateq", arrays, cpu_s)

    def leaked_at_once(self, requests: int, pages: int, at_s: list[float], cpu_s: float) -> tuple[list[U32s], int]:
        """``filled_at_once``'s mirror for whole deflate requests of ``pages`` each, the
        ``n``-th released at ``at_s[n]``: the PFN arrays each gave back (in order, for
        the memory manager's free lists) and the descriptor every request used."""
        arrays = [self._dequeue(pages) for _ in range(requests)]
        self.num_pages -= requests * pages
        self.log.extend((t, f"released {pages} pages") for t in at_s)
        return arrays, self._served_at_once("deflateq", arrays, cpu_s)

    def _served_at_once(self, name: str, arrays: list[U32s], cpu_s: float) -> int:
        """The shared PFN array, queue ``name``, tokens and runs after one request per
        array, each posted, served and reaped (the last array's PFNs stay in
        ``vb->pfns``); ``cpu_s``: the CPU total after them. Returns their descriptor."""
        last = arrays[-1]
        self.pfns[: len(last)] = last
        head = self.vqs[name].replay_served(len(arrays), self.pfns_addr, 4 * len(last))
        self._token += len(arrays)
        self.cpu_s = cpu_s
        self.update_work.runs += len(arrays)
        return head

    def _dequeue(self, num: int) -> U32s:
        """balloon_page_dequeue, ``num`` times: the most recently inflated pages first."""
        out: list[U32s] = []
        while num > 0 and self.balloon:
            last = self.balloon[-1]
            take = min(num, len(last))
            out.append(last[len(last) - take :])
            if take == len(last):
                self.balloon.pop()
            else:
                self.balloon[-1] = last[: len(last) - take]
            num -= take
        if len(out) == 1:  # the common case, a request within one inflated array: no copy
            return out[0]
        return np.concatenate(out) if out else np.empty(0, dtype=np.uint32)

    def leak_balloon(self, num: int) -> Generator[float | Signal, None, int]:
        pfns = self._dequeue(min(num, spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX, self.num_pages))
        self.num_pages -= len(pfns)
        if len(pfns):
            # MUST_TELL_HOST (Linux does it always): tell the host and wait for the ack,
            # and only then hand the pages back to the allocator.
            token = self._post_pfns("deflateq", pfns)
            while not self._acked("deflateq", token):
                yield self.acked
            self.cpu_s += len(pfns) * cal.GUEST_RELEASE_S_PER_PAGE
            yield len(pfns) * cal.GUEST_RELEASE_S_PER_PAGE
            self._release_pages(pfns)
        return len(pfns)

    def _release_pages(self, pfns: U32s) -> None:
        if not self.deflate_on_oom_negotiated:
            self.mm.adjust_managed_page_count(len(pfns))
        self.mm.free_pages(pfns)
        self.log.append((self.world.now_s, f"released {len(pfns)} pages"))

    def _add_and_kick(self, name: str, bufs: list[Buf]) -> int | None:
        """Add a chain and notify if the device wants it; a full ring returns None."""
        vq = self.vqs[name]
        self._token += 1
        token = self._token
        if vq.add(bufs, token) is None:
            return None
        if vq.kick_prepare():
            self.device.notify(self.index[name])
        return token

    def _add_one_and_kick(self, name: str, addr: int, length: int) -> int | None:
        """``_add_and_kick`` of one device-readable buffer (virtqueue_add_outbuf)."""
        vq = self.vqs[name]
        self._token += 1
        token = self._token
        if vq.add_one(addr, length, token) is None:
            return None
        if vq.kick_prepare():
            self.device.notify(self.index[name])
        return token

    def _reap(self, name: str) -> None:
        vq = self.vqs[name]
        try:
            while (got := vq.get_buf()) is not None:
                if isinstance(token := got[0], int):  # every chain this driver adds carries an int
                    self.done_tokens.add(token)
        except VirtioError as e:  # BAD_RING: the driver stops using the queue
            self.log.append((self.world.now_s, str(e)))

    def _post_pfns(self, name: str, pfns: U32s) -> int | None:
        """Write ``pfns`` into the shared ``vb->pfns`` array (one numpy store into guest
        memory, le32) and post that array on ``name``; None if the ring is full."""
        n = len(pfns)
        if n > spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX:
            raise ValueError(f"{n} PFNs exceed VIRTIO_BALLOON_ARRAY_PFNS_MAX(={spec.VIRTIO_BALLOON_ARRAY_PFNS_MAX})")
        self.pfns[:n] = pfns
        return self._add_one_and_kick(name, self.pfns_addr, 4 * n)

    def _acked(self, name: str, token: int | None) -> bool:
        """tell_host's ``wait_event(vb->acked, ...)`` condition, checked before each
        sleep: reap what the device used; True once ``token``'s chain came back, or if it
        never went out (a full ring). A broken device never uses the buffer, so the work
        item sleeps for good - the balloon stops responding, as on a real guest. Usually
        true at once: the device served the kick before the driver looked."""
        if token is None:
            return True
        self._reap(name)
        if token in self.done_tokens:
            self.done_tokens.discard(token)
            return True
        return False

    # -- deflate on OOM -------------------------------------------------------------

    def oom_notify(self) -> int:
        """virtio_balloon_oom_notify: give back up to 256 pages, tell the host first,
        write ``actual``; the size work is not re-queued, so the balloon stays below
        target until the host's next config interrupt. Runs synchronously (it is called
        from the allocator's OOM path): the device serves the request at once.

        Its leak_balloon() takes vb->balloon_lock, which fill_balloon() holds from
        enqueuing its pages until tell_host() has the host's ack (Linux
        drivers/virtio/virtio_balloon.c: both take the mutex, tell_host waits under it):
        so the notifier never sees an inflate in flight, it waits for that ack first.
        The device applied the request at the kick (``VirtioBalloon.notify``) and only
        its used buffer is still to come: that wait is collapsed to now, as the
        notifier's own request is, and the fill's accounting done before any page is
        taken back (without it the Fleet's ``balloon_kib`` went 1 MiB below zero)."""
        if not self.has(spec.VIRTIO_BALLOON_F_DEFLATE_ON_OOM) or self.device.broken:
            return 0
        self._fill_acked()
        pfns = self._dequeue(min(spec.VIRTIO_BALLOON_OOM_NR_PAGES, self.num_pages))
        if len(pfns) == 0:
            return 0
        self.num_pages -= len(pfns)
        token = self._post_pfns("deflateq", pfns)
        self.device.service_now("deflateq")
        self._reap("deflateq")
        self.done_tokens.discard(token or 0)
        self._release_pages(pfns)
        self.update_balloon_size()
        self.oom_deflates += 1
        return len(pfns)

    # -- stats ----------------------------------------------------------------------

    def _write_stats(self) -> None:
        packed = self._packed_stats()
        self.mem.view[self.stats_addr : self.stats_addr + len(packed)] = packed

    def _pack_stats(self) -> bytes:
        """update_balloon_stats(): the mm's entries as ``virtio_balloon_stat`` structs
        back to back (the reference for an mm that keeps them packed)."""
        entries = self.mm.vm_stats()
        return spec.stats_array(len(entries)).pack(*itertools.chain.from_iterable(entries))

    def gather_stats(self) -> bytes:
        """update_balloon_stats(): the entries as this driver writes them in the buffer."""
        return self._packed_stats()

    def stats_reusable(self, head: int) -> bool:
        """Whether the stats work, each time the device pushes the buffer ``head`` back,
        would run at once from the interrupt and re-post it the common way
        (``stats_gathered_at_once``): a running driver, the work idle, the ring steady."""
        work = self.stats_work
        return (
            not self.stopping
            and not work.pending
            and (work.running is None or not work.running.alive)
            and self.device.irq_last == self._vring_interrupt_last
            and self.vqs["statsq"].reusable(head)
        )

    def stats_gathered_at_once(self, count: int, head: int, packed: bytes) -> None:
        """What ``count`` runs of the stats work leave, each gathering ``packed``,
        reclaiming the buffer ``head`` the device pushed back and posting it again,
        kicked (from a ``stats_reusable`` driver)."""
        self.mem.view[self.stats_addr : self.stats_addr + len(packed)] = packed
        self._token += count
        self.vqs["statsq"].replay_reused(count, head, self.stats_addr, self.stats_len, self._token)
        self.stats_work.runs += count

    def stats_handle_request(self) -> None:
        """update_balloon_stats_work: gather, reclaim the used buffer, post it again
        (work that never sleeps: a plain function for its ``WorkItem``)."""
        packed = self._packed_stats()  # ``_write_stats``, inline: every exchange runs this
        self.mem.view[self.stats_addr : self.stats_addr + len(packed)] = packed
        vq = self.vqs["statsq"]
        kick = vq.reuse_one(self.stats_addr, self.stats_len, self._token + 1)  # get_buf + add_one, inline
        if kick is not None:
            self._token += 1
            if kick:
                self.device.notify(self.index["statsq"])
            return
        try:
            got = vq.get_buf()
        except VirtioError as e:
            self.log.append((self.world.now_s, str(e)))
            return
        if got is None:
            return
        self._add_one_and_kick("statsq", self.stats_addr, self.stats_len)

    # -- free page reporting ----------------------------------------------------------

    def page_reporting_notify_free(self) -> None:
        """mm: a free of a block >= the reporting order: IDLE -> REQUESTED, pass in 2 s."""
        if "reporting_vq" in self.vqs and not self.reporting_requested:
            self.reporting_requested = True
            self.reporting_work.queue(spec.PAGE_REPORTING_DELAY_S)

    def page_reporting_process(self) -> ProcessGen:
        """One pass: a budget of ceil(free blocks / (32*16)) report() calls of up to 32
        blocks each; if blocks remain, another pass 2 s later."""
        self.reporting_requested = False
        order = spec.PAGEBLOCK_ORDER
        budget = -(-self.mm.reportable_blocks(order) // (spec.PAGE_REPORTING_CAPACITY * 16))
        for _ in range(budget):
            blocks = self.mm.isolate_reportable(spec.PAGE_REPORTING_CAPACITY, order)
            if not blocks:
                break
            yield from self.virtballoon_free_page_report(blocks, order)
        if self.mm.reportable_blocks(order) and not self.device.broken:
            self.page_reporting_notify_free()

    def virtballoon_free_page_report(self, blocks: list[int], order: int) -> Generator[float | Signal, None, None]:
        size = 4096 << order
        released_before = self.device.host.reported_bytes
        token = self._add_and_kick("reporting_vq", [Buf(pfn << 12, size, write=True) for pfn in blocks])
        while not self._acked("reporting_vq", token):
            yield self.acked
        discarded = self.device.host.reported_bytes > released_before
        self.mm.mark_reported(blocks, order, discarded)
        self.reported_blocks += len(blocks)

    # -- free page hinting ------------------------------------------------------------

    def _cmd_id_received(self) -> int:
        if self.cmd_id_received_cache is None:
            self.cmd_id_received_cache = self._read_config(spec.CONFIG_FREE_PAGE_HINT_CMD_ID)
        return self.cmd_id_received_cache

    def report_free_page_func(self) -> ProcessGen:
        """The hinting work: DONE frees held blocks; a new id runs one round."""
        cmd_id = self._cmd_id_received()
        if cmd_id == spec.VIRTIO_BALLOON_CMD_ID_DONE:
            self.return_free_pages_to_mm()
        elif cmd_id != spec.VIRTIO_BALLOON_CMD_ID_STOP and cmd_id != self.cmd_id_active:
            yield from self._hint_round(cmd_id)

    def _send_cmd_id(self, addr: int, cmd_id: int) -> None:
        self._reap("free_page_vq")
        struct.pack_into("<I", self.mem.buf, addr, cmd_id)
        self._add_and_kick("free_page_vq", [Buf(addr, 4)])

    def _hint_round(self, cmd_id: int) -> ProcessGen:
        self.cmd_id_active = cmd_id
        self._send_cmd_id(self.cmd_id_active_addr, cmd_id)
        order = spec.VIRTIO_BALLOON_HINT_BLOCK_ORDER
        vq = self.vqs["free_page_vq"]
        while self._cmd_id_received() == self.cmd_id_active and not self.device.broken:
            self._reap("free_page_vq")
            pfn = self.mm.alloc_block(order)
            if pfn is None:
                break
            if vq.num_free <= 1:  # one slot stays free for the stop id
                self.mm.free_block(pfn, order)
                break
            self._add_and_kick("free_page_vq", [Buf(pfn << 12, 4096 << order, write=True)])
            self.hint_blocks.append(pfn)
            yield cal.HINT_BLOCK_S
        self._send_cmd_id(self.cmd_id_stop_addr, spec.VIRTIO_BALLOON_CMD_ID_STOP)

    def shrink_free_pages(self, blocks: int) -> int:
        """The shrinker's scan (virtio_balloon_shrinker_scan): give back up to ``blocks``
        held hint blocks under memory pressure; returns how many went back."""
        freed = 0
        while freed < blocks and self.hint_blocks:
            self.mm.free_block(self.hint_blocks.pop(), spec.VIRTIO_BALLOON_HINT_BLOCK_ORDER)
            freed += 1
        return freed

    def return_free_pages_to_mm(self) -> None:
        for pfn in self.hint_blocks:
            self.mm.free_block(pfn, spec.VIRTIO_BALLOON_HINT_BLOCK_ORDER)
        self.hint_blocks.clear()
        self.cmd_id_active = spec.VIRTIO_BALLOON_CMD_ID_STOP
