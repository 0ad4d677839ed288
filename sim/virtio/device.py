"""The host side of the virtio-balloon device (QEMU hw/virtio/virtio-balloon.c), at both
of the simulator's speeds.

* ``BalloonDevice``: the bulk path, every guest at once: the target as ``num_pages``, and
  the stats the host last received.
* ``VirtioBalloon``: the protocol path, one guest: config space at the spec's offsets,
  feature negotiation, queues in guest memory, inflate/deflate discards, the reverse
  stats queue and its timer, free page hinting and reporting, QEMU's error handling.

Both keep these rules (``tests/test_two_speeds.py`` holds them to the same results):

* a target becomes ``num_pages = (ram - target) >> 12`` (truncating; a target above RAM
  is RAM) and a config-change interrupt, even when the value did not change;
* stats arrive once per polling period and are stamped with the host time they
  arrived (``last-update``); between polls the host sees the previous sample; a period
  of 0 means polling is off and the host keeps the last sample forever;
* QEMU re-arms its poll timer only when the guest's answer arrives, so samples arrive
  every ``period + STATS_WORK_S`` (the guest's response time), drifting off the
  period's grid, and the first one arrives at once when polling is switched on.
"""

from __future__ import annotations

import functools
import logging
import operator
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import numpy as np
import numpy.typing as npt

import sim.virtio.balloon_spec as spec
from overcommitd.table import STAT_NAMES
from sim import compiled
from sim.virtio import calibration as cal
from sim.virtio import stats_kernel
from sim.virtio.backing import HostRam
from sim.virtio.balloon_spec import BALLOON_PAGE_KIB
from sim.virtio.calibration import STATS_WORK_S
from sim.virtio.driver import BalloonDriver, FleetDriver
from sim.virtio.guestmem import GuestMemory, GuestMemoryError
from sim.virtio.virtqueue import DeviceQueue, Element, RingLayout, VirtioError
from sim.virtio.world import World

Array = npt.NDArray[np.float64]


def _fmin(a: Array) -> float:
    """The smallest of ``a`` ignoring NaN (inf when empty or all NaN), without
    ``ndarray.min``'s Python-level wrapper: ``poll_stats`` asks it every interval."""
    return float(np.fmin.reduce(a, initial=np.inf))


@dataclass(frozen=True)
class StatArrays:
    """Every guest's balloon stats, one array per ``GuestStats`` field (KiB or counts):
    the typed seam between the Fleet and both device speeds, so a misspelt stat is a
    mypy/AttributeError rather than a silent KeyError. The arrays are filled in place.
    Made by ``zeros`` or ``of_block``, they are the rows of one 2-D ``block`` (a stat a
    row, in field order), which copies and truncates in one numpy call, not nine."""

    swap_in_kib: Array
    swap_out_kib: Array
    major_faults: Array
    minor_faults: Array
    mem_free_kib: Array
    mem_total_kib: Array
    mem_available_kib: Array
    disk_caches_kib: Array
    oom_kills: Array
    block: Array | None = field(default=None, repr=False, compare=False)

    @classmethod
    def zeros(cls, n: int) -> StatArrays:
        return cls.of_block(np.zeros((len(STAT_ARRAY_NAMES), n)))

    @classmethod
    def of_block(cls, block: Array) -> StatArrays:
        """The stats whose arrays are ``block``'s rows (a view: writes go through)."""
        if block.shape[0] != len(STAT_ARRAY_NAMES):
            raise ValueError(f"a stats block has {len(STAT_ARRAY_NAMES)} rows, not {block.shape[0]}")
        return cls(**dict(zip(STAT_ARRAY_NAMES, block, strict=True)), block=block)

    def items(self) -> Iterator[tuple[str, Array]]:
        """(GuestStats field name, array) for every stat, in field order."""
        return ((name, getattr(self, name)) for name in STAT_ARRAY_NAMES)

    def stacked(self) -> Array:
        """Every stat as a row of one 2-D array (``block`` itself where there is one)."""
        return self.block if self.block is not None else np.stack([v for _, v in self.items()])

    def copy_from(self, other: StatArrays, rows: npt.NDArray[np.bool_] | slice = slice(None)) -> None:
        """Overwrite ``rows`` of every stat with ``other``'s."""
        if self.block is not None and other.block is not None:
            self.block[:, rows] = other.block[:, rows]
            return
        for name in STAT_ARRAY_NAMES:
            getattr(self, name)[rows] = getattr(other, name)[rows]


# Listed once: ``dataclasses.fields`` on every poll cost more than the copies (issue 13 profile).
STAT_ARRAY_NAMES: tuple[str, ...] = tuple(f.name for f in fields(StatArrays) if f.name != "block")


if not set(STAT_ARRAY_NAMES) <= set(STAT_NAMES):
    raise AssertionError("StatArrays fields must be GuestStats fields")


def num_pages_kib(ram_kib: float, target_kib: int) -> float:
    """The balloon size the host asks for, in KiB, as QEMU's virtio_balloon_to_target
    computes ``num_pages``: whole 4 KiB pages, truncated."""
    target_kib = min(target_kib, int(ram_kib))
    return float((int(ram_kib) - target_kib) // BALLOON_PAGE_KIB * BALLOON_PAGE_KIB)


class BalloonDevice:
    """Targets and received stats of every guest."""

    def __init__(
        self, ram_kib: Array, stats_period_s: Array, driver: FleetDriver, stats_phase_s: Array | None = None
    ) -> None:
        n = len(ram_kib)
        self.ram_kib = ram_kib
        self.driver = driver
        self.stats_period_s = stats_period_s
        self.last_update_s = np.full(n, -np.inf)  # never received
        self.stats = StatArrays.zeros(n)
        # Polling switched on at ``stats_phase_s`` (default: time 0) fires at once; the guest
        # answers STATS_WORK_S later. Real guests' timers run each in its own phase (issue 16).
        phase = np.zeros(n) if stats_phase_s is None else stats_phase_s
        self.next_arrival_s = np.where(stats_period_s > 0, phase + STATS_WORK_S, np.inf)
        self.compiled = compiled.AVAILABLE  # ``poll_stats`` through its kernel

    def set_target(self, i: int, target_kib: int) -> None:
        self.driver.config_changed(i, num_pages_kib(self.ram_kib[i], target_kib))

    def set_targets(self, rows: npt.NDArray[np.int64], targets_kib: npt.NDArray[np.int64]) -> None:
        """``set_target`` for many guests at once (``num_pages_kib``'s rule over arrays)."""
        ram = self.ram_kib[rows].astype(np.int64)
        num_pages_kib = (ram - np.minimum(targets_kib, ram)) // BALLOON_PAGE_KIB * BALLOON_PAGE_KIB
        pages = num_pages_kib.astype(np.float64)
        if isinstance(self.driver, BalloonDriver):  # the bulk driver takes every row at once
            self.driver.config_changed(rows, pages)
            return
        for i, kib in zip(rows.tolist(), pages.tolist(), strict=True):
            self.driver.config_changed(i, kib)

    def take_sample(self, now_s: float, current: StatArrays) -> None:
        """The sample every guest sends at probe, before polling is on."""
        self.stats.copy_from(current)
        self.last_update_s[:] = np.floor(now_s)

    def poll_stats(self, now_s: float, current: Callable[[], StatArrays]) -> None:
        """Take every sample that arrives before ``now_s``; ``current()`` is the guests'
        state over that span, computed only if a sample is due. Times are summed as the
        World sums them (timer at arrival + period, answer STATS_WORK_S later), so both
        speeds stamp alike. Compiled (``stats_kernel.poll_stats``) where both sides hold
        their stats as one block; ``_poll_reference`` is the rule."""
        # fmin ignores NaN as ``<`` does: a NaN arrival is never due, in either path.
        if not _fmin(self.next_arrival_s) < now_s:
            return
        sample = current()
        if self.compiled and sample.block is not None and self.stats.block is not None:
            stats_kernel.poll_stats(
                now_s,
                STATS_WORK_S,
                self.stats_period_s,
                self.next_arrival_s,
                self.last_update_s,
                sample.block,
                self.stats.block,
            )
            return
        self._poll_reference(now_s, sample)

    def _poll_reference(self, now_s: float, sample: StatArrays) -> None:
        """``poll_stats`` in numpy, the reference for its compiled kernel."""
        due = self.next_arrival_s < now_s
        if not due.any():
            return
        # Every sample before ``now_s`` reads the same state: copy it once to every guest
        # due at least once, then stamp each arrival.
        self.stats.copy_from(sample, slice(None) if due.all() else due)
        while due.any():
            rows = slice(None) if due.all() else due  # a replay's guests poll in step: no mask
            self.last_update_s[rows] = np.floor(self.next_arrival_s[rows])  # QEMU stamps whole seconds
            self.next_arrival_s[rows] = self.next_arrival_s[rows] + self.stats_period_s[rows] + STATS_WORK_S
            due = self.next_arrival_s < now_s

    def has_stats(self) -> npt.NDArray[np.bool_]:
        return np.asarray(np.isfinite(self.last_update_s), dtype=bool)


# -- the protocol level: QEMU's virtio-balloon, byte for byte ---------------------------
#
# One ``VirtioBalloon`` per guest: the config space, the queues in guest memory, the
# inflate/deflate handlers that discard through ``sim.virtio.backing``, the reverse stats
# queue and its timer, free page hinting and reporting. Runs only when something happens
# (a kick, a timer, a target); ``sim.memory.balloon_fleet`` keeps the bulk view in step.


log = logging.getLogger(__name__)

_NOT_SUPPLIED = (spec.STAT_NOT_SUPPLIED,)
_max = np.maximum.reduce  # ndarray.max without its Python-level wrapper


@functools.lru_cache(maxsize=64)  # bounded: the tags are the guest's to choose
def _stat_picker(tags: tuple[int, ...]) -> Callable[[tuple[int, ...]], tuple[int, ...]]:
    """Where each of the VIRTIO_BALLOON_S_NR stats sits in a buffer's unpacked fields
    (tag, value, tag, value, ..., then one "-1"), for one sequence of tags: a guest
    sends the same tags in the same order every time, so this is worked out once. A
    repeated tag's last value wins (QEMU overwrites in order); tags past
    VIRTIO_BALLOON_S_NR are ignored; a stat never sent reads "-1" (the appended field)."""
    where = {tag: 2 * k + 1 for k, tag in enumerate(tags)}  # later entries overwrite
    unsupplied = 2 * len(tags)
    picks = [where.get(tag, unsupplied) for tag in range(spec.VIRTIO_BALLOON_S_NR)]
    return operator.itemgetter(*picks)


BALLOON_CHANGE_RATE_S = 1.0  # monitor/monitor.c monitor_qapi_event_conf: 1000 ms
# QEMU's FreePageHintStatus (include/hw/virtio/virtio-balloon.h).
FREE_PAGE_HINT_S_STOP, FREE_PAGE_HINT_S_REQUESTED, FREE_PAGE_HINT_S_START, FREE_PAGE_HINT_S_DONE = 0, 1, 2, 3


class VirtioBalloon:
    """QEMU's hw/virtio/virtio-balloon.c for one guest, on the World clock.

    ``deflate_on_oom``, ``free_page_hint``, ``page_poison`` (default on, as in QEMU),
    ``free_page_reporting`` are QEMU's device properties; STATS_VQ is always offered and
    MUST_TELL_HOST never (QEMU does not), unless ``must_tell_host`` asks for it.
    A guest-caused protocol error marks the device broken (``broken`` holds QEMU's
    message, status gets NEEDS_RESET) and the device stops processing; nothing raises.
    """

    def __init__(
        self,
        world: World,
        mem: GuestMemory,
        host: HostRam,
        *,
        deflate_on_oom: bool = False,
        free_page_hint: bool = False,
        page_poison: bool = True,
        free_page_reporting: bool = False,
        must_tell_host: bool = False,
        event_idx: bool = True,
        indirect_desc: bool = True,
    ) -> None:
        self.world, self.mem, self.host = world, mem, host
        bits = 1 << spec.VIRTIO_BALLOON_F_STATS_VQ | 1 << spec.VIRTIO_F_VERSION_1
        for on, bit in (
            (must_tell_host, spec.VIRTIO_BALLOON_F_MUST_TELL_HOST),
            (deflate_on_oom, spec.VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
            (free_page_hint, spec.VIRTIO_BALLOON_F_FREE_PAGE_HINT),
            (page_poison, spec.VIRTIO_BALLOON_F_PAGE_POISON),
            (free_page_reporting, spec.VIRTIO_BALLOON_F_REPORTING),
            (event_idx, spec.VIRTIO_RING_F_EVENT_IDX),
            (indirect_desc, spec.VIRTIO_RING_F_INDIRECT_DESC),
        ):
            bits |= on << bit
        self.host_features = bits
        self.guest_features = 0
        self.status = 0
        self.broken: str | None = None
        self.num_pages = 0
        self.actual = 0
        self.poison_val = 0
        self.config_size = 16 if page_poison else 12 if free_page_hint else 8  # virtio_balloon_config_size
        self.queues: dict[str, DeviceQueue] = {}
        self.index: list[str] = []
        self._queue_index: dict[str, int] = {}
        self.irq: Callable[[int], None] = lambda index: None  # used-buffer interrupt to the guest
        # The same interrupt raised as the last act of the event raising it (the stats
        # timer's): the guest may run its bottom half on the spot (``WorkItem.run_at_once``).
        self.irq_last: Callable[[int], None] = lambda index: self.irq(index)
        self.config_irq: Callable[[], None] = lambda: None
        self.actual_log: list[tuple[float, int]] = []  # (time, actual) whenever the guest writes a new one
        # QAPI BALLOON_CHANGE {"actual": bytes of guest memory}, rate-limited by the monitor.
        self.balloon_change_events: list[tuple[float, int]] = []
        self._event_window_end_s = -float("inf")
        self._event_pending: int | None = None
        # statsq
        self.stats = [spec.STAT_NOT_SUPPLIED] * spec.VIRTIO_BALLOON_S_NR
        self._stats_data, self._stats_picked = b"", tuple(self.stats)  # the last buffer and what it gave
        self._stats_tags: tuple[int, ...] = ()  # the last buffer's tags, and where they put each stat
        self._stats_pick: Callable[[tuple[int, ...]], tuple[int, ...]] = _stat_picker(())
        self.stats_last_update_s = 0.0  # 0 = never, as QEMU's "last-update"
        self.stats_updates = 0
        self.stats_poll_interval_s = 0
        self.stats_vq_head: int | None = None  # QEMU's stats_vq_elem, held by its head
        self._stats_timer_gen = 0
        self._stats_timer_due_s: float | None = None
        self._stats_timer_held = False  # inside ``_stats_poll_cb``'s exchange: it arms the timer
        # Exchanges done many at once, where nothing can come between them
        # (``sim.memory.stats_runs``): the number done, 0 where none could be.
        self.stats_run: Callable[[], int] | None = None
        # VM run state: QEMU_CLOCK_VIRTUAL stops while the VM is paused (or migrating).
        self.vm_running = True
        self._frozen_timer_s: float | None = None
        self._config_irq_deferred = False
        # free page hinting
        self.free_page_hint_status = FREE_PAGE_HINT_S_STOP
        self.free_page_hint_cmd_id = spec.VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN - 1
        self.hinted_bytes = 0
        self._handlers: dict[str, Callable[[str, bool], None]] = {
            "inflateq": self._handle_output,
            "deflateq": self._handle_output,
            "statsq": self._handle_stats,
            "free_page_vq": self._handle_free_page,
            "reporting_vq": self._handle_report,
        }

    # -- transport: features, status, queues, config --------------------------------

    def has(self, bit: int) -> bool:
        return spec.has(self.guest_features, bit)

    def set_features(self, bits: int) -> bool:
        """The driver's accepted subset; FEATURES_OK fails on bits never offered."""
        if bits & ~self.host_features:
            return False
        self.guest_features = bits
        return True

    def set_status(self, status: int) -> None:
        was_ok = self.status & spec.VIRTIO_CONFIG_S_DRIVER_OK
        self.status = status | (spec.VIRTIO_CONFIG_S_NEEDS_RESET if self.broken else 0)
        # virtio_balloon_set_status: a stats buffer kicked before DRIVER_OK is picked up now.
        if (
            status & spec.VIRTIO_CONFIG_S_DRIVER_OK
            and not was_ok
            and "statsq" in self.queues
            and self.stats_vq_head is None
        ):
            self._service("statsq")

    def setup_queues(self, layouts: list[RingLayout]) -> None:
        """Queues get transport indices by position among those that exist (§1.3)."""
        self.index = spec.queue_names(self.guest_features)
        self._queue_index = {name: i for i, name in enumerate(self.index)}
        if len(layouts) != len(self.index):
            self._error(f"virtio-balloon: driver set up {len(layouts)} queues, device has {len(self.index)}")
            return
        event_idx = self.has(spec.VIRTIO_RING_F_EVENT_IDX)
        try:
            for name, lay in zip(self.index, layouts):
                if lay.num > spec.QUEUE_SIZES[name]:
                    raise VirtioError(f"virtio-balloon: {name} size {lay.num} exceeds {spec.QUEUE_SIZES[name]}")
                self.queues[name] = DeviceQueue(self.mem, lay, event_idx=event_idx, name=name)
        except (VirtioError, GuestMemoryError) as e:  # a bad ring address breaks the device
            self._error(str(e))

    def _cmd_id_field(self) -> int:
        """The cmd id field reads per hinting state (virtio_balloon_get_config)."""
        status = self.free_page_hint_status
        if status == FREE_PAGE_HINT_S_REQUESTED:
            return self.free_page_hint_cmd_id
        if status == FREE_PAGE_HINT_S_DONE:
            return spec.VIRTIO_BALLOON_CMD_ID_DONE
        return spec.VIRTIO_BALLOON_CMD_ID_STOP  # STOP, and START reads 0 too

    def get_config(self) -> bytes:
        """virtio_balloon_get_config: the whole config space, ``config_size`` bytes."""
        return spec.CONFIG.pack(self.num_pages, self.actual, self._cmd_id_field(), self.poison_val)[: self.config_size]

    def set_config(self, data: bytes) -> None:
        """virtio_balloon_set_config: take ``actual`` (and ``poison_val`` if negotiated)."""
        _, actual, _, poison_val = spec.CONFIG.unpack(data.ljust(spec.CONFIG.size, b"\0")[: spec.CONFIG.size])
        self._set_actual(actual)
        if self.config_size > spec.CONFIG_POISON_VAL:
            self._set_poison_val(poison_val)

    def config_readl(self, offset: int) -> int:
        """A guest's 4-byte config read (QEMU virtio_config_modern_readl): one field,
        without packing the struct; past ``config_size`` it reads all ones."""
        if offset < 0 or offset + 4 > self.config_size:
            return 0xFFFFFFFF
        if offset == spec.CONFIG_NUM_PAGES:
            return self.num_pages
        if offset == spec.CONFIG_ACTUAL:
            return self.actual
        if offset == spec.CONFIG_FREE_PAGE_HINT_CMD_ID:
            return self._cmd_id_field()
        if offset == spec.CONFIG_POISON_VAL:
            return self.poison_val
        return int(struct.unpack_from("<I", self.get_config(), offset)[0])  # unaligned: from the bytes

    def config_writel(self, offset: int, value: int) -> None:
        """A guest's 4-byte config write (QEMU virtio_config_modern_writel): ignored past
        ``config_size``; then set_config sees the fields, of which only ``actual`` and
        ``poison_val`` are the driver's to write."""
        if offset < 0 or offset + 4 > self.config_size:
            return
        if offset == spec.CONFIG_ACTUAL:
            self._set_actual(value & 0xFFFFFFFF)
        elif offset == spec.CONFIG_POISON_VAL:
            self._set_poison_val(value & 0xFFFFFFFF)
        elif offset % 4:
            cfg = bytearray(self.get_config())
            struct.pack_into("<I", cfg, offset, value & 0xFFFFFFFF)
            self.set_config(bytes(cfg))

    def _set_actual(self, actual: int) -> None:
        if actual != self.actual:
            self.actual = actual
            self.actual_log.append((self.world.now_s, actual))
            self._balloon_change(self.mem.ram_bytes - (actual << spec.VIRTIO_BALLOON_PFN_SHIFT))

    def _set_poison_val(self, poison_val: int) -> None:
        self.poison_val = poison_val if self.has(spec.VIRTIO_BALLOON_F_PAGE_POISON) else 0

    def balloon_change_window(self) -> tuple[float, bool]:
        """The BALLOON_CHANGE rate limit: when its window ends, and whether a value is
        held until then."""
        return self._event_window_end_s, self._event_pending is not None

    def actuals_written(
        self,
        at_s: list[float],
        actuals: list[int],
        emitted: list[int],
        window_end_s: float,
        pending: bool,
        flush_at_s: float | None,
    ) -> None:
        """``_set_actual`` of each of ``actuals`` (each new) at its instant in ``at_s``,
        from a run of requests done at once, whose BALLOON_CHANGE rate limit the caller
        worked out (``sim.memory.protocol_kernel``): the requests in ``emitted`` sent
        theirs, the window ends at ``window_end_s``, the last value is held if
        ``pending``, and the run scheduled the flush at ``flush_at_s`` (None: it did not)."""
        self.actual = actuals[-1]
        self.actual_log.extend(zip(at_s, actuals, strict=True))
        ram = self.mem.ram_bytes
        self.balloon_change_events.extend(
            (at_s[j], ram - (actuals[j] << spec.VIRTIO_BALLOON_PFN_SHIFT)) for j in emitted
        )
        self._event_window_end_s = window_end_s
        if pending:
            self._event_pending = ram - (actuals[-1] << spec.VIRTIO_BALLOON_PFN_SHIFT)
        if flush_at_s is not None:
            self.world.schedule_at(flush_at_s, self._flush_balloon_change)

    def _balloon_change(self, actual_bytes: int) -> None:
        """Emit BALLOON_CHANGE through the monitor's rate limit (monitor/monitor.c:
        BALLOON_CHANGE at most once per 1000 ms): the first goes out at once and opens a
        window; later ones replace a pending value, sent when the window ends."""
        now = self.world.now_s
        if self._event_pending is None and now >= self._event_window_end_s:
            self.balloon_change_events.append((now, actual_bytes))
            self._event_window_end_s = now + BALLOON_CHANGE_RATE_S
            return
        if self._event_pending is None:
            self.world.schedule(self._flush_balloon_change, max(self._event_window_end_s - now, 0.0))
        self._event_pending = actual_bytes

    def _flush_balloon_change(self) -> None:
        if self._event_pending is not None:
            self.balloon_change_events.append((self.world.now_s, self._event_pending))
            self._event_pending = None
            self._event_window_end_s = self.world.now_s + BALLOON_CHANGE_RATE_S

    def to_target(self, target_bytes: int) -> None:
        """virtio_balloon_to_target: ``num_pages = (ram - target) >> 12``, then a
        config interrupt (always, even for the same value)."""
        ram = self.mem.ram_bytes
        target_bytes = min(target_bytes, ram)
        if target_bytes:
            self.set_num_pages((ram - target_bytes) >> spec.VIRTIO_BALLOON_PFN_SHIFT)

    def set_num_pages(self, num_pages: int) -> None:
        """The host writes ``num_pages`` and raises the config interrupt."""
        self.num_pages = num_pages
        self._notify_config()

    def _notify_config(self) -> None:
        if not self.vm_running:
            self._config_irq_deferred = True
        elif self.status & spec.VIRTIO_CONFIG_S_DRIVER_OK and not self.broken:
            self.world.schedule(self.config_irq, urgent=True)

    def _error(self, message: str) -> None:
        """QEMU's virtio_error: log, mark NEEDS_RESET, stop touching the rings."""
        if self.broken is None:
            log.warning("virtio-balloon: %s", message)
            self.broken = message
            self.status |= spec.VIRTIO_CONFIG_S_NEEDS_RESET

    # -- queue processing ----------------------------------------------------------

    def notify(self, index: int) -> None:
        """A kick from the guest on transport queue ``index``. The device reads the
        request at once (the vCPU exits on the kick) and pushes it back after the host's
        work on it; so the driver's one shared PFN array may be rewritten right after."""
        if self.broken or not 0 <= index < len(self.index):
            return
        name = self.index[index]
        try:  # ``_service``, one call less: every stats exchange kicks
            self._handlers[name](name, False)
        except VirtioError as e:
            self._error(str(e))

    def service_now(self, name: str) -> None:
        """Handle a queue at once (a synchronous exit: the OOM notifier's path)."""
        self._service(name, sync=True)

    def _service(self, name: str, *, sync: bool = False) -> None:
        if self.broken or name not in self.queues:
            return
        try:
            self._handlers[name](name, sync)
        except VirtioError as e:
            self._error(str(e))

    def _complete(self, name: str, head: int, at_s: float, sync: bool) -> None:
        """Push the chain ``head`` at ``at_s``, when the host's work on it ends, then interrupt if
        the ring asks. If nothing else is due before then, the clock moves there and
        the push happens now (``World.may_jump_to``): the same instant and order as a
        queued push, without the trip through the queue."""
        world = self.world
        if sync or at_s <= world.now_s:
            self._push(name, head)
        elif world.may_jump_to(at_s):
            world.now_s = at_s
            self._push(name, head)
        else:
            world.schedule_at(at_s, lambda: self._push(name, head))

    def _push(self, name: str, head: int, *, last: bool = False) -> None:
        """Push ``head`` and interrupt if the ring asks; ``last``: nothing follows in
        this event (``irq_last``)."""
        if self.broken:
            return
        vq = self.queues[name]
        vq.push_head(head, 0)
        if vq.should_notify():
            (self.irq_last if last else self.irq)(self._queue_index[name])

    def _pfns(self, name: str, elem: Element) -> npt.NDArray[np.uint32]:
        if elem.inn and not elem.out:
            # QEMU reads no PFNs from a device-writable buffer and pushes it back; the
            # spec makes inflate/deflate buffers device-readable, so we call it an error.
            raise VirtioError(f"virtio-balloon: {name}: device-writable buffer where a device-readable one belongs")
        if len(elem.out) == 1:  # Linux's one PFN array: read in place, no copy
            return self.mem.read_u32s(*elem.out[0])
        data = self.queues[name].read_out(elem)
        return np.frombuffer(data[: len(data) // 4 * 4], dtype="<u4")

    def _handle_output(self, name: str, sync: bool) -> None:
        """virtio_balloon_handle_output: every PFN of every element, then push (len 0).
        A request's PFN array is one numpy view of guest memory, checked against RAM in
        one reduction and handed to the host whole."""
        vq, mem = self.queues[name], self.mem
        ram_pages = mem.ram_pages
        apply: Callable[[npt.NDArray[np.uint32]], object]
        if name == "inflateq":
            apply, per_pfn_s = self.host.inflate_element, cal.HOST_DISCARD_S_PER_PAGE
        else:
            apply, per_pfn_s = self.host.deflate_element, cal.HOST_WILLNEED_S_PER_PAGE
        start_s, delay_s, pop = self.world.now_s, cal.NOTIFY_TO_DEVICE_S, vq.pop_direct
        while (got := pop()) is not None:
            if isinstance(got, tuple):  # Linux's one PFN array: read in place, no copy
                head, addr, length = got
                pfns = mem.read_u32s(addr, length)
            else:
                head, pfns = got.head, self._pfns(name, got)
            if len(pfns) and _max(pfns) >= ram_pages:
                pfns = pfns[pfns < ram_pages]  # not RAM: skipped (trace bad_addr)
            apply(pfns)
            delay_s += len(pfns) * per_pfn_s
            self._complete(name, head, start_s + delay_s, sync)

    # -- the stats queue, driven by the device ---------------------------------------

    def set_stats_poll_interval(self, interval_s: int) -> None:
        """QOM ``guest-stats-polling-interval``: 0 stops the timer; the first non-zero
        value fires at once; a change re-arms at now + the new value."""
        if interval_s < 0:
            raise ValueError("timer value must be greater than zero")
        if interval_s == self.stats_poll_interval_s:
            return
        previous, self.stats_poll_interval_s = self.stats_poll_interval_s, interval_s
        if interval_s == 0:
            self._stats_timer_gen += 1
        elif previous == 0:
            self._stats_timer_mod(0.0)
        else:
            self._stats_timer_mod(float(interval_s))

    def _stats_timer_mod(self, delay_s: float) -> None:
        self._stats_timer_gen += 1
        gen = self._stats_timer_gen
        if not self.vm_running:  # the virtual clock is stopped: the timer waits for vm_start
            self._frozen_timer_s = delay_s
            return
        self._stats_timer_due_s = self.world.now_s + delay_s
        if self._stats_timer_held:  # ``_stats_poll_cb`` arms it (or fires it) when its exchange is done
            return
        self.world.schedule(functools.partial(self._stats_poll_cb, gen), delay_s)

    def vm_stop(self) -> None:
        """The VM pauses: the stats timer (QEMU_CLOCK_VIRTUAL) freezes with what it had
        left to run, and config interrupts wait until the guest runs again."""
        if not self.vm_running:
            return
        self.vm_running = False
        if self._stats_timer_due_s is not None and self.stats_poll_interval_s > 0:
            self._frozen_timer_s = max(self._stats_timer_due_s - self.world.now_s, 0.0)
            self._stats_timer_gen += 1  # cancel the armed callback

    def vm_start(self) -> None:
        """The VM runs again: the frozen timer resumes, a deferred config interrupt fires."""
        if self.vm_running:
            return
        self.vm_running = True
        if self._frozen_timer_s is not None and self.stats_poll_interval_s > 0:
            self._stats_timer_mod(self._frozen_timer_s)
        self._frozen_timer_s = None
        if self._config_irq_deferred:
            self._config_irq_deferred = False
            self._notify_config()

    def _stats_poll_cb(self, gen: int) -> None:
        """balloon_stats_poll_cb: hand the held buffer back to ask for fresh stats. It
        re-arms only when it had nothing to return; otherwise the next buffer re-arms.
        When the exchange is done within this event and re-armed the timer, and nothing
        is due before the timer fires (``World.may_repeat_to``), it fires on the spot, as
        its queued callback would: one event for a run of exchanges. Where nothing can
        come between them, ``stats_run`` sets what the exchanges leave in one step."""
        world = self.world
        while gen == self._stats_timer_gen and not self.broken:
            self._stats_timer_due_s = None
            if self.stats_vq_head is None or not self.guest_features >> spec.VIRTIO_BALLOON_F_STATS_VQ & 1:
                self._stats_timer_mod(float(self.stats_poll_interval_s))
                return
            self._stats_timer_held = True
            try:
                if self.stats_run is None or not self.stats_run():
                    head, self.stats_vq_head = self.stats_vq_head, None
                    self._push("statsq", head, last=True)  # at once: _complete's synchronous case
            finally:
                self._stats_timer_held = False
            due_s = self._stats_timer_due_s
            if due_s is None or self._stats_timer_gen == gen:  # not re-armed here (the guest answers later)
                return
            gen = self._stats_timer_gen
            if not world.may_repeat_to(due_s):
                world.schedule_at(due_s, functools.partial(self._stats_poll_cb, gen))
                return
            world.now_s = due_s

    def stats_steady_head(self) -> int | None:
        """The held stats buffer's head where its exchanges, from the timer's firing on,
        may be replayed at once (``stats_exchanged_at_once``): a working, running device
        polling, and a stats queue whose every push interrupts; else None."""
        if self.broken or not self.vm_running or self.stats_poll_interval_s <= 0:
            return None
        if not self.queues["statsq"].signals_every_push():
            return None
        return self.stats_vq_head

    def stats_exchanged_at_once(self, count: int, data: bytes) -> None:
        """What ``count`` exchanges of the held buffer leave, each bringing ``data``, from
        the timer's firing to the last one's pop, now: the ring, the stats, the update
        count and time, the timer re-armed (``_stats_poll_cb`` fires or queues it)."""
        head = self.stats_vq_head
        assert head is not None and self._stats_timer_held
        self.queues["statsq"].replay_served(count, head)
        self._take_stats(data)
        self.stats_last_update_s = float(int(self.world.now_s))
        self.stats_updates += count
        self._stats_timer_gen += count - 1  # every exchange re-armed it; the last one's stands
        self._stats_timer_mod(float(self.stats_poll_interval_s))

    def _handle_stats(self, name: str, sync: bool) -> None:
        """virtio_balloon_receive_stats: hold the buffer, record its entries."""
        vq = self.queues[name]
        got = vq.pop_direct()
        if got is None:
            return
        if self.stats_vq_head is not None:  # a second buffer: return the old one at once
            old, self.stats_vq_head = self.stats_vq_head, None
            self._complete(name, old, self.world.now_s, True)
        if isinstance(got, tuple):  # Linux's one stats buffer
            self.stats_vq_head, data = got[0], self.mem.read(got[1], got[2])
        else:
            self.stats_vq_head, data = got.head, vq.read_out(got)
        self._take_stats(data)
        # g_get_real_time() / G_USEC_PER_SEC: whole seconds (integer division).
        self.stats_last_update_s = float(int(self.world.now_s))
        self.stats_updates += 1
        if self.stats_poll_interval_s > 0:
            self._stats_timer_mod(float(self.stats_poll_interval_s))

    def _take_stats(self, data: bytes) -> None:
        """Record a stats buffer's entries; a guest whose stats stayed put sends the same
        bytes, which leave the same stats (parsed once)."""
        if data != self._stats_data:
            fields = spec.stats_array(len(data) // spec.STAT.size).unpack_from(data)
            tags = fields[::2]
            if tags != self._stats_tags:  # the same tags in the same order, buffer after buffer
                self._stats_tags, self._stats_pick = tags, _stat_picker(tags)
            self._stats_data, self._stats_picked = data, self._stats_pick(fields + _NOT_SUPPLIED)
            self.stats = list(self._stats_picked)

    # -- free page reporting ---------------------------------------------------------

    def _handle_report(self, name: str, sync: bool) -> None:
        """virtio_balloon_handle_report: discard each reported block (unless inhibited
        or ``poison_val`` != 0), then push."""
        vq, start_s = self.queues[name], self.world.now_s
        while (elem := vq.pop()) is not None:
            self.host.report(elem.inn, self.poison_val)
            self._complete(name, elem.head, start_s + len(elem.inn) * cal.REPORT_BLOCK_S, sync)

    # -- free page hinting (live migration) ------------------------------------------

    def free_page_start(self) -> None:
        """After a dirty-bitmap sync: a new command id, REQUESTED, config interrupt."""
        nxt = self.free_page_hint_cmd_id + 1
        self.free_page_hint_cmd_id = nxt if nxt <= 0xFFFFFFFF else spec.VIRTIO_BALLOON_FREE_PAGE_HINT_CMD_ID_MIN
        self.free_page_hint_status = FREE_PAGE_HINT_S_REQUESTED
        self._notify_config()

    def free_page_stop(self) -> None:
        """Before a dirty-bitmap sync: hints stop counting; the guest keeps its blocks."""
        if self.free_page_hint_status != FREE_PAGE_HINT_S_STOP:
            self.free_page_hint_status = FREE_PAGE_HINT_S_STOP
            self._notify_config()

    def free_page_done(self) -> None:
        """Migration finished or cancelled: the guest may free every held block."""
        self.free_page_hint_status = FREE_PAGE_HINT_S_DONE
        self._notify_config()

    def _handle_free_page(self, name: str, sync: bool) -> None:
        """get_free_page_hints: an out buffer carries a command id (the current id moves
        REQUESTED -> START, any id in START -> STOP); in buffers are free blocks the
        migration may skip, honoured only in START."""
        vq = self.queues[name]
        while (elem := vq.pop()) is not None:
            if elem.out:
                data = vq.read_out(elem)
                if len(data) != 4:
                    raise VirtioError("received an incorrect cmd id")
                (cmd_id,) = struct.unpack("<I", data)
                if self.free_page_hint_status == FREE_PAGE_HINT_S_REQUESTED and cmd_id == self.free_page_hint_cmd_id:
                    self.free_page_hint_status = FREE_PAGE_HINT_S_START
                elif self.free_page_hint_status == FREE_PAGE_HINT_S_START:
                    self.free_page_hint_status = FREE_PAGE_HINT_S_STOP
            if elem.inn and self.free_page_hint_status == FREE_PAGE_HINT_S_START:
                self.hinted_bytes += sum(n for _, n in elem.inn)
            vq.push(elem, 0)  # free_page_vq has no guest callback: the guest polls
