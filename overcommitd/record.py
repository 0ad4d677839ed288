"""``overcommitd record``: write what a host's guests and the host itself did, in
overcommitd's trace format (``overcommitd.traceformat``, docs/trace-format.md), so a
replay can put other policies in front of the same workload.

Read-only by construction: the recorder is handed a :class:`GuestSource`, which has
``snapshot()`` and nothing else (the CLI wraps a libvirt connection opened read-only, on
which libvirt itself refuses ``setMemory``), and a ``HostReader``. It never sets a target.
On libvirt it does not change a guest's stats period either; the QMP backend switches
each balloon's stats polling on, as the daemon does, since a guest without it sends none.

Every interval it reads the same bulk stats the daemon reads and the host's meminfo, PSI
and KSM counters, and appends one row per guest to ``guests-<UTC hour>.csv`` and one row
to ``host-<UTC hour>.csv`` (``overcommitd.hourly``: written and fsynced every interval,
so a crash loses at most one; each hour gzip-compressed to ``.csv.gz`` once it is
over). ``recording.json`` beside them says what was recorded, and how many samples were
skipped and why.

``used_kib`` is the workload's demand, not the balloon's effect. From the guest's own
stats: ``used = MemTotal - MemAvailable``. The balloon's pages are never available, and
where they are counted depends on one feature (Linux drivers/virtio/virtio_balloon.c,
``fill_balloon()``/``release_pages_balloon()`` call ``adjust_managed_page_count()`` only
``if (!virtio_has_feature(vb->vdev, VIRTIO_BALLOON_F_DEFLATE_ON_OOM))``; commit
997e120843e8; the MEMTOT stat is ``si_meminfo().totalram``, the managed pages;
virtio-balloon.md §2.2 and §3.5):

* without DEFLATE_ON_OOM the balloon's pages leave MemTotal, so ``MemTotal -
  MemAvailable`` is already the workload's (and the guest kernel's) memory;
* with DEFLATE_ON_OOM MemTotal keeps them and they count as used, so the balloon,
  ``max_kib - actual_kib``, is subtracted.

A guest whose stats are missing, stale or impossible (the guard's own test,
``overcommitd.guard.stats_problem``) or lack MemTotal has no ``used_kib``, which the
format requires: that sample is skipped, counted per guest and reason, logged the first
time and in every hourly summary, and kept in ``recording.json``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from overcommitd import traceformat as tf
from overcommitd.config import GuardConfig
from overcommitd.guard import stats_problem
from overcommitd.host import HostError
from overcommitd.hourly import Cell, HourlyCsv
from overcommitd.hypervisor import HostReader, Hypervisor, HypervisorError
from overcommitd.model import GuestSnapshot, GuestStats, HostSnapshot

log = logging.getLogger(__name__)

MANIFEST = "recording.json"
NO_MEMTOTAL = "no-memtotal"  # stats without MemTotal or any way to MemAvailable
UNREACHABLE = "hypervisor-unreachable"  # the whole interval: no guest could be read
WRITE_FAILED = "write-failed"  # the whole interval: its rows could not be written (disk full?)

# The guest columns the recorder can fill. Disk I/O rates are not in the balloon stats
# the daemon reads, so those columns are left out (absent, not zero).
GUEST_HEADER: tuple[str, ...] = (
    *tf.REQUIRED_COLUMNS,
    tf.CACHE_KIB,
    tf.SWAP_IN_KIB_S,
    tf.SWAP_OUT_KIB_S,
    tf.ACTUAL_KIB,
    tf.DEFLATE_ON_OOM,
    *tf.STAT_COLUMNS,
)


class GuestSource(Protocol):
    """All the recorder may ask of a hypervisor."""

    def snapshot(self) -> Sequence[GuestSnapshot]: ...


class ReadOnlyGuests:
    """A hypervisor's ``snapshot()`` and nothing else: what the CLI hands the recorder."""

    __slots__ = ("_snapshot",)

    def __init__(self, hv: Hypervisor) -> None:
        self._snapshot = hv.snapshot

    def snapshot(self) -> Sequence[GuestSnapshot]:
        return self._snapshot()


def demand_kib(guest: GuestSnapshot) -> int | None:
    """The memory the guest's workload holds, balloon removed (see the module
    docstring); None when the stats cannot say. Never below 0 or above ``max_kib``."""
    stats = guest.stats
    if stats is None or stats.mem_total_kib is None:
        return None
    available = stats.available_kib()
    if available is None:
        return None
    used = stats.mem_total_kib - available
    if guest.features.deflate_on_oom:
        used -= guest.balloon_kib
    return min(max(used, 0), guest.max_kib)


@dataclass(frozen=True, slots=True)
class _Counters:
    """A guest's cumulative swap counters at one stats sample."""

    at_s: float
    swap_in_kib: int | None
    swap_out_kib: int | None


def _rate(before: int | None, now: int | None, dt_s: float) -> float | None:
    if before is None or now is None or now < before or dt_s <= 0:
        return None  # unknown, or the counter restarted (guest reboot)
    return round((now - before) / dt_s, 3)


class Recorder:
    """Samples guests and host into ``out_dir``. ``clock`` is Unix time, the clock of the
    stats' ``last_update`` (host epoch seconds), so staleness comes out right; a test
    or a benchmark injects its own."""

    def __init__(
        self,
        guests: GuestSource,
        host: HostReader,
        out_dir: Path,
        *,
        rules: GuardConfig,
        interval_s: float,
        source: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.guests, self.host, self.out_dir, self.rules = guests, host, out_dir, rules
        self.interval_s, self.source, self.clock = interval_s, source, clock
        self.guest_file = HourlyCsv(out_dir, "guests", GUEST_HEADER)
        self.host_file = HourlyCsv(out_dir, "host", tf.HOST_COLUMNS)
        self.rows_written = 0
        self.host_rows_written = 0
        self.skipped: Counter[tuple[str, str]] = Counter()  # (guest, reason) -> samples
        self.started_s: float | None = None
        self.last_sample_s: float | None = None
        self._hour_rows = 0
        self._hour_skipped: Counter[str] = Counter()
        self._prev: dict[str, _Counters] = {}
        self._rates: dict[str, tuple[float | None, float | None]] = {}

    # -- one interval -------------------------------------------------------------------

    def sample(self) -> None:
        """Read guests and host once and append their rows. Errors reading either are
        logged and counted; errors writing (a full disk) propagate."""
        now_s = self.clock()
        if self.started_s is None:
            self.started_s = now_s
            self.guest_file.recover()
            self.host_file.recover()
        self.last_sample_s = now_s
        self._sample_host(now_s)
        try:
            snapshots = self.guests.snapshot()
        except HypervisorError as e:
            log.warning("no guests recorded at %.0f: %s", now_s, e)
            self._skip("*", UNREACHABLE)
            return
        rows = [row for g in snapshots if (row := self._guest_row(now_s, g)) is not None]
        live = {g.uuid for g in snapshots}
        for gone in set(self._prev) - live:  # a guest that left: forget its counters
            self._prev.pop(gone)
            self._rates.pop(gone, None)
        if self.guest_file.append(now_s, rows):
            self._new_hour()
        self.rows_written += len(rows)
        self._hour_rows += len(rows)

    def _sample_host(self, now_s: float) -> None:
        try:
            h = self.host.read()
        except HostError as e:
            log.warning("no host row at %.0f: %s", now_s, e)
            return
        self.host_file.append(now_s, [_host_row(now_s, h)])
        self.host_rows_written += 1

    def _guest_row(self, now_s: float, g: GuestSnapshot) -> list[Cell] | None:
        problem = stats_problem(now_s, g, self.rules)
        used = demand_kib(g) if problem is None else None
        if used is None:
            self._skip(g.name, problem.reason.value if problem is not None else NO_MEMTOTAL)
            return None
        s = g.stats
        assert s is not None
        swap_in_s, swap_out_s = self._swap_rates(g.uuid, s)
        values: dict[str, Cell] = {
            tf.TIME_S: round(now_s, 3),
            tf.GUEST: g.name,
            tf.PROVISIONED_KIB: g.max_kib,
            tf.USED_KIB: used,
            tf.CACHE_KIB: s.disk_caches_kib,
            tf.SWAP_IN_KIB_S: swap_in_s,
            tf.SWAP_OUT_KIB_S: swap_out_s,
            tf.ACTUAL_KIB: g.actual_kib,
            tf.DEFLATE_ON_OOM: int(g.features.deflate_on_oom),
        }
        values |= {column: getattr(s, name) for column, name in tf.STAT_COLUMNS.items()}
        return [values[c] for c in GUEST_HEADER]

    def _swap_rates(self, uuid: str, s: GuestStats) -> tuple[float | None, float | None]:
        """Swap KiB/s over the guest's last stats period; the same figure again while
        the guest has not sent a newer sample (a stats period longer than the interval)."""
        prev = self._prev.get(uuid)
        if prev is None or s.last_update_s > prev.at_s:
            if prev is not None:
                dt_s = s.last_update_s - prev.at_s
                self._rates[uuid] = (
                    _rate(prev.swap_in_kib, s.swap_in_kib, dt_s),
                    _rate(prev.swap_out_kib, s.swap_out_kib, dt_s),
                )
            self._prev[uuid] = _Counters(s.last_update_s, s.swap_in_kib, s.swap_out_kib)
        return self._rates.get(uuid, (None, None))

    def _skip(self, guest: str, reason: str) -> None:
        if (guest, reason) not in self.skipped:
            log.warning("guest %s: sample skipped (%s); counted in %s", guest, reason, self.out_dir / MANIFEST)
        self.skipped[guest, reason] += 1
        self._hour_skipped[reason] += 1

    # -- hours, manifest, the loop -------------------------------------------------------

    def _new_hour(self) -> None:
        """A new hour's file was opened: summarise the last one and save the manifest."""
        self._summarise("hour done")
        self.write_manifest()

    def _summarise(self, what: str) -> None:
        skipped = sum(self._hour_skipped.values())
        if self._hour_rows or skipped:
            level = logging.WARNING if skipped else logging.INFO
            reasons = dict(self._hour_skipped)
            log.log(level, "%s: %d guest rows, %d samples skipped %s", what, self._hour_rows, skipped, reasons)
        self._hour_rows = 0
        self._hour_skipped.clear()

    def write_manifest(self) -> None:
        """``recording.json``: what this directory holds, replaced atomically."""
        skipped: dict[str, dict[str, int]] = {}
        for (guest, reason), n in sorted(self.skipped.items()):
            skipped.setdefault(guest, {})[reason] = n
        manifest = {
            "format_version": tf.FORMAT_VERSION,
            "host": socket.gethostname(),
            "source": self.source,
            "interval_s": self.interval_s,
            "started_s": self.started_s,
            "last_sample_s": self.last_sample_s,
            "guest_rows": self.rows_written,
            "host_rows": self.host_rows_written,
            "skipped_samples": skipped,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, self.out_dir / MANIFEST)

    def close(self) -> None:
        """Compress the last hour and save the manifest; a failure is logged, not raised
        (what is on disk stays readable, and the next start compresses what is left)."""
        self._summarise("recording stopped")
        for step in (self.guest_file.finish, self.host_file.finish, self.write_manifest):
            try:
                step()
            except OSError as e:
                log.error("while closing the recording in %s: %s", self.out_dir, e)

    def run(self, stop: threading.Event, *, hours: float | None = None) -> None:
        """Sample every ``interval_s`` (on the monotonic clock, so a slow sample does not
        shift the ones after it) until ``stop`` is set or ``hours`` have passed; close."""
        start = time.monotonic()
        end = None if hours is None else start + hours * 3600.0
        k = 0
        try:
            while not stop.is_set():
                try:
                    self.sample()
                except OSError as e:  # a full disk may be freed: keep trying every interval
                    log.error("interval not written to %s: %s", self.out_dir, e)
                    self._skip("*", WRITE_FAILED)
                k += 1
                next_at = start + k * self.interval_s
                if end is not None and next_at > end:
                    break
                stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            self.close()


def _host_row(now_s: float, h: HostSnapshot) -> list[Cell]:
    """The host columns are HostSnapshot's fields by name, but for the time and PSI's
    cumulative stall counters (empty on a kernel without PSI)."""
    psi = h.psi
    values: dict[str, Cell] = {
        tf.TIME_S: round(now_s, 3),
        "psi_some_total_us": None if psi is None else psi.some_total_us,
        "psi_full_total_us": None if psi is None else psi.full_total_us,
    }
    return [values[c] if c in values else getattr(h, c) for c in tf.HOST_COLUMNS]
