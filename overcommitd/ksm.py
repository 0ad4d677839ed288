"""KSM control: start, throttle and stop the kernel's same-page merging from host
pressure and from the sharing it achieves, next to ballooning (MOM does both).

The law is ksmtuned's (Dan Kenigsberg, Red Hat 2009, shipped with Fedora/RHEL qemu-kvm)
and oVirt MOM's ``doc/ksm.rules`` (3de1c8e), which agree on every constant; here they are
re-expressed, not translated. Each adjustment (every ``adjust_interval_s``,
KSM_MONITOR_INTERVAL=60 s):

* ``threshold = max(RAM x threshold_pct / 100, threshold_min_kib)`` (KSM_THRES_COEF=20 %,
  KSM_THRES_CONST=2048 KiB; MOM: ksm_free_percent 0.20);
* stop (``run`` = 0) when ``guest memory + threshold < RAM`` and ``free > threshold``:
  nothing to gain and no pressure. ksmtuned's "committed" is the RSS of the qemu
  processes, MOM's ``ksm_shareable`` the same; ours is the guests' ``actual``;
* otherwise run (``run`` = 1) with ``sleep_millisecs = sleep_ms_per_16gib x 16 GiB / RAM``
  (KSM_SLEEP_MSEC=10; MOM ksm_sleep_ms_baseline 10) and ``pages_to_scan`` raised by
  ``npages_boost`` (KSM_NPAGES_BOOST=300) while ``free < threshold``, lowered by
  ``npages_decay`` (KSM_NPAGES_DECAY=-50) otherwise, within ``npages_min..npages_max``
  (KSM_NPAGES_MIN=64, KSM_NPAGES_MAX=1250). A start counts from 0, as ksmtuned does.

Ours beyond them: "free" is MemAvailable (with the ZFS ARC above c_min, ``count_arc``),
not MemFree + Buffers + Cached; ``sleep_millisecs`` has bounds; and a run that has done
``judge_after_full_scans`` full scans yet shares less than ``min_saved_kib`` is stopped
for ``backoff_s``: ksmd burns a CPU for nothing when the guests have little in common.
``run`` is never written 2 (unmerge everything): that would raise host use by all the
sharing at once. A ``run`` of 2 found in sysfs, someone else unmerging, is left alone.
With Linux >= 6.7's advisor in ``scan-time`` mode the kernel owns ``pages_to_scan``; we
then leave it alone and only start and stop.

``decide`` is pure (reading and state in, writes and state out); ``KsmSysfs`` does the
file I/O; ``KsmController`` joins them once per tick and never raises.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from overcommitd.config import KsmConfig
from overcommitd.model import HostSnapshot, OvercommitdError

log = logging.getLogger(__name__)

GIB_KIB = 1024 * 1024
# MOM multiplies by 16777216 KiB, ksmtuned by 16 * 1024 * 1024: the 16 GiB reference host.
REFERENCE_HOST_KIB = 16 * GIB_KIB

KsmAction = Literal["wait", "hold", "start", "boost", "decay", "stop", "backoff"]


class KsmError(OvercommitdError):
    """A KSM sysfs file cannot be read, parsed or written."""


@dataclass(frozen=True, slots=True)
class KsmReading:
    """KSM's sysfs files (Documentation/admin-guide/mm/ksm.rst), in their own units: pages."""

    run: int
    pages_to_scan: int
    sleep_millisecs: int
    pages_shared: int  # KSM pages in use: one per distinct content
    pages_sharing: int  # mappings of them, i.e. pages saved
    full_scans: int  # cumulative: passes over all mergeable memory
    advisor_scan_time: bool = False  # advisor_mode is "scan-time": the kernel sets pages_to_scan


@dataclass(frozen=True, slots=True)
class KsmWrites:
    """Values to write; None leaves a file alone."""

    pages_to_scan: int | None = None
    sleep_millisecs: int | None = None
    run: int | None = None

    def items(self) -> list[tuple[str, int]]:
        """In writing order: speed first, then ``run``, so ksmd starts at the new speed
        (ksmtuned's KSMCTL start does the same)."""
        order = (("pages_to_scan", self.pages_to_scan), ("sleep_millisecs", self.sleep_millisecs), ("run", self.run))
        return [(name, value) for name, value in order if value is not None]


@dataclass(frozen=True, slots=True)
class KsmState:
    last_adjust_s: float | None = None
    scans_at_start_total: int | None = None  # full_scans when this run began (or was adopted)
    backoff_until_s: float = 0.0


@dataclass(frozen=True, slots=True)
class KsmDecision:
    action: KsmAction
    reason: str
    writes: KsmWrites
    state: KsmState
    free_kib: int = 0
    threshold_kib: int = 0


def threshold_kib(cfg: KsmConfig, mem_total_kib: int) -> int:
    return max(int(mem_total_kib * cfg.threshold_pct / 100), cfg.threshold_min_kib)


def sleep_ms(cfg: KsmConfig, mem_total_kib: int) -> int:
    """Bigger hosts scan more often: the 16 GiB reference sleep scaled by 16 GiB / RAM."""
    return min(cfg.sleep_ms_max, max(cfg.sleep_ms_min, cfg.sleep_ms_per_16gib * REFERENCE_HOST_KIB // mem_total_kib))


def _changed(reading: KsmReading, **wanted: int | None) -> KsmWrites:
    """Only what differs from sysfs (MOM's controller writes only changed values)."""
    return KsmWrites(**{k: v for k, v in wanted.items() if v is not None and v != getattr(reading, k)})


def decide(
    cfg: KsmConfig,
    now_s: float,
    host: HostSnapshot,
    guest_memory_kib: int,
    reading: KsmReading,
    state: KsmState,
    page_kib: int = 4,
) -> KsmDecision:
    """One adjustment: what to write and the next state. Pure."""
    if state.last_adjust_s is not None and now_s - state.last_adjust_s < cfg.adjust_interval_s:
        return KsmDecision("wait", "not yet time to adjust", KsmWrites(), state)
    thres, free = threshold_kib(cfg, host.mem_total_kib), host.available_kib(count_arc=cfg.count_arc)
    state = replace(state, last_adjust_s=now_s)

    def out(action: KsmAction, reason: str, writes: KsmWrites, new: KsmState) -> KsmDecision:
        return KsmDecision(action, reason, writes, new, free, thres)

    if reading.run not in (0, 1):
        return out("hold", f"run is {reading.run} (unmerging): left alone", KsmWrites(), state)
    stopped = replace(state, scans_at_start_total=None)
    if now_s < state.backoff_until_s:
        return out("backoff", "backing off after an unproductive run", _changed(reading, run=0), stopped)
    saved_kib = reading.pages_sharing * page_kib
    scans = reading.full_scans - (
        reading.full_scans if state.scans_at_start_total is None else state.scans_at_start_total
    )
    if reading.run == 1 and scans >= cfg.judge_after_full_scans and saved_kib < cfg.min_saved_kib:
        reason = f"{scans} full scans shared {saved_kib} KiB < {cfg.min_saved_kib} KiB"
        backoff = replace(stopped, backoff_until_s=now_s + cfg.backoff_s)
        return out("backoff", reason, _changed(reading, run=0), backoff)
    if guest_memory_kib + thres < host.mem_total_kib and free > thres:
        reason = f"guests {guest_memory_kib} KiB + threshold {thres} KiB < RAM and free {free} KiB > threshold"
        return out("stop", reason, _changed(reading, run=0), stopped)
    pressed = free < thres
    base = reading.pages_to_scan if reading.run == 1 else 0  # ksmtuned starts counting at 0
    npages = min(cfg.npages_max, max(cfg.npages_min, base + (cfg.npages_boost if pressed else -cfg.npages_decay)))
    action: KsmAction = "start" if reading.run == 0 else ("boost" if pressed else "decay")
    writes = _changed(
        reading,
        pages_to_scan=None if reading.advisor_scan_time else npages,
        sleep_millisecs=sleep_ms(cfg, host.mem_total_kib),
        run=1,
    )
    started = state.scans_at_start_total if reading.run == 1 and state.scans_at_start_total is not None else None
    running = replace(state, scans_at_start_total=reading.full_scans if started is None else started)
    reason = f"free {free} KiB {'<' if pressed else '>='} threshold {thres} KiB"
    return out(action, reason, writes, running)


class KsmSysfs:
    """The files under ``/sys/kernel/mm/ksm`` (injectable root)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _int(self, name: str) -> int:
        path = self.root / name
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise KsmError(f"cannot read {path}: {e.strerror or e}") from e
        try:
            return int(text)
        except ValueError as e:
            raise KsmError(f"{path}: {text[:40]!r} is not an integer") from e

    def read(self) -> KsmReading:
        advisor = self.root / "advisor_mode"  # "[none] scan-time": the bracketed one is in force
        try:
            scan_time = "[scan-time]" in advisor.read_text()
        except OSError:
            scan_time = False  # before Linux 6.7: no advisor
        return KsmReading(
            run=self._int("run"),
            pages_to_scan=self._int("pages_to_scan"),
            sleep_millisecs=self._int("sleep_millisecs"),
            pages_shared=self._int("pages_shared"),
            pages_sharing=self._int("pages_sharing"),
            full_scans=self._int("full_scans"),
            advisor_scan_time=scan_time,
        )

    def write(self, writes: KsmWrites) -> None:
        for name, value in writes.items():
            path = self.root / name
            try:
                path.write_text(f"{value}\n")
            except OSError as e:
                raise KsmError(f"cannot write {value} to {path}: {e.strerror or e}") from e


@dataclass(frozen=True, slots=True)
class KsmStatus:
    """What the controller last saw and did, for /metrics and MQTT."""

    reading: KsmReading | None
    decision: KsmDecision | None  # this tick's; "wait" between adjustments
    dry_run: bool
    error: str | None = None
    adjustment: KsmDecision | None = None  # the last decision that was not "wait"


@dataclass
class KsmController:
    """Once per tick: read sysfs, decide, write (or, in dry-run, log). Never raises: an
    error is logged, counted in ``errors`` and the next tick tries again."""

    cfg: KsmConfig
    page_kib: int = field(default_factory=lambda: os.sysconf("SC_PAGE_SIZE") // 1024)
    state: KsmState = field(default_factory=KsmState)
    errors: Counter[str] = field(default_factory=Counter)
    writes_total: Counter[str] = field(default_factory=Counter)
    last: KsmStatus | None = None
    _last_error: str | None = None
    _adjustment: KsmDecision | None = None

    def __post_init__(self) -> None:
        self.sysfs = KsmSysfs(self.cfg.sysfs_dir)

    def tick(self, now_s: float, host: HostSnapshot, guest_memory_kib: int, *, dry_run: bool = False) -> KsmStatus:
        """One adjustment; ``dry_run`` (the daemon's own) adds to ``[ksm] dry_run``."""
        dry = self.cfg.dry_run or dry_run
        reading: KsmReading | None = None
        decision: KsmDecision | None = None
        try:
            reading = self.sysfs.read()
            decision = decide(self.cfg, now_s, host, guest_memory_kib, reading, self.state, self.page_kib)
            if decision.writes.items():
                self._apply(decision, dry)
            self.state = decision.state  # after the writes: a failed one is retried next tick
        except KsmError as e:
            self._failed("read" if decision is None else "write", str(e))
            self.last = KsmStatus(reading, decision, dry, str(e), self._adjustment)
            return self.last
        self._last_error = None
        if decision.action != "wait":
            self._adjustment = decision
        self.last = KsmStatus(reading, decision, dry, None, self._adjustment)
        return self.last

    def _failed(self, op: str, error: str) -> None:
        """Counted every time; logged as an error once per new message (a missing
        /sys/kernel/mm/ksm would otherwise fill the journal every tick)."""
        self.errors[op] += 1
        level = logging.DEBUG if error == self._last_error else logging.ERROR
        log.log(level, "ksm: %s", error, extra={"event": "ksm-error"})
        self._last_error = error

    def _apply(self, decision: KsmDecision, dry_run: bool) -> None:
        what = ", ".join(f"{k}={v}" for k, v in decision.writes.items())
        extra = {"event": "ksm", "action": decision.action, "writes": dict(decision.writes.items())}
        if dry_run:
            log.info("ksm %s (dry-run, not written): %s; %s", decision.action, what, decision.reason, extra=extra)
            return
        log.info("ksm %s: %s; %s", decision.action, what, decision.reason, extra=extra)
        self.sysfs.write(decision.writes)
        self.writes_total.update([name for name, _value in decision.writes.items()])
