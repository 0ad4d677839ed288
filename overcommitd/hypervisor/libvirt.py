"""The Hypervisor protocol on libvirt (libvirt-python), for a real KVM/QEMU host.

One tick costs one RPC to read every guest: ``getAllDomainStats(BALLOON | STATE,
ACTIVE)``. A domain's XML (balloon features, stats period, our ``<metadata>``) is read
once when the guest is first seen and again only after an event says it changed. Setting
a target is one ``setMemoryFlags(kib, VIR_DOMAIN_AFFECT_LIVE)`` on the domain object the
bulk call returned, so no lookups either.

libvirt does not report the target it was given: its live ``<currentMemory>`` follows the
guest's ``actual`` through BALLOON_CHANGE events (virtio-balloon.md §7.2), so this backend
keeps its own record of the targets it set, keyed by UUID. That record, like the set of
guests a lifecycle event marked as migrating, survives a reconnect: when libvirtd
restarts, the guests (QEMU processes) keep running and so do their balloons.

Events run on libvirt's default event loop in a daemon thread (registered before the
first ``open``, as libvirt requires). Handlers only record what happened under a lock and
hand an :class:`GuestEvent` to ``on_event``, which the runner bridges into asyncio with
``loop.call_soon_threadsafe``. All other methods block and are meant to be run off the
asyncio loop, one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import libvirt  # type: ignore[import-untyped]

from overcommitd.config import LibvirtConfig
from overcommitd.hypervisor import FloorAboveMaximum, GuestEvent, HypervisorError, NoSuchGuest
from overcommitd.hypervisor import libvirt_xml as lx
from overcommitd.hypervisor.libvirt_stats import STATE_RUNNING, BalloonReading, from_bulk, run_state
from overcommitd.model import GuestSnapshot, RunState

# GuestEvent and NoSuchGuest live in overcommitd.hypervisor (every backend uses them) and
# are re-exported here for the callers that always imported them from this module.
__all__ = ["GuestEvent", "LibvirtHypervisor", "NoSuchGuest", "start_event_loop"]

log = logging.getLogger(__name__)

# Lifecycle events and details (libvirt-domain.h; virtio-balloon.md §7.5).
_EV_DEFINED, _EV_UNDEFINED, _EV_STARTED, _EV_SUSPENDED, _EV_RESUMED, _EV_STOPPED, _EV_SHUTDOWN = 0, 1, 2, 3, 4, 5, 6
_EV_SUSPENDED_MIGRATED = 1

# QEMU throttles BALLOON_CHANGE to one event a second (virtio-balloon.md §7.2), so for a
# few seconds after a target is set, libvirt's bulk view of a guest's size may be stale.
SETTLE_S = 5.0

# Errors that mean the domain is gone, not that libvirt is.
_GONE = {libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID}


_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_event_loop() -> None:
    """Register libvirt's default event loop implementation and run it in a daemon thread.
    Once per process, and before the first ``libvirt.open`` (real-guest.md pitfall 10)."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        # libvirt's default error handler prints every error to stderr, caught or not (pitfall 11).
        libvirt.registerErrorHandler(lambda *_: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class LibvirtHypervisor:
    """``Hypervisor`` over a libvirt connection; reconnects with backoff on its own."""

    def __init__(
        self,
        cfg: LibvirtConfig,
        *,
        on_event: Callable[[GuestEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.on_event = on_event
        self.clock = clock
        self.calls: Counter[str] = Counter()  # libvirt RPCs by method name, since start
        self.errors: Counter[str] = Counter()  # libvirt errors by method name
        self._conn: Any = None
        self._callback_ids: list[int] = []
        self._lock = threading.Lock()
        self._lost = False
        self._retry_at_s = 0.0
        self._backoff_s = cfg.reconnect_min_s
        # Per-guest state, by UUID; kept across reconnects.
        self._targets_kib: dict[str, int] = {}
        self._set_at_s: dict[str, float] = {}  # when each target was set (self.clock)
        self._migrating: set[str] = set()
        self._domains: dict[str, Any] = {}  # virDomain objects from the last bulk call
        self._xml: dict[str, lx.DomainConfig] = {}  # parsed once per guest, dropped on change events
        self._period_set: set[str] = set()

    # -- connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._lost

    def connect(self) -> None:
        """Open the connection and register events; raises HypervisorError with what to try."""
        start_event_loop()
        uri = self.cfg.uri
        try:
            conn = self._rpc("open", libvirt.open, uri)
        except HypervisorError as e:
            raise HypervisorError(f"cannot open {uri!r}: {e}. Is libvirtd running? Try: virsh -c {uri} list") from e
        self._conn, self._lost = conn, False
        self._xml.clear()  # domains may have been redefined while we were away
        self._domains.clear()
        try:
            if self.cfg.keepalive_interval_s:
                conn.setKeepAlive(self.cfg.keepalive_interval_s, self.cfg.keepalive_count)
        except libvirt.libvirtError:
            pass  # local drivers (test://, qemu:///embed) have no keepalive; nothing to lose
        try:
            conn.registerCloseCallback(self._on_close, None)
            ids = [
                (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
                (libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, self._on_balloon_change),
                (libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata_change),
                (libvirt.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, self._on_migration_iteration),
            ]
            self._callback_ids = [conn.domainEventRegisterAny(None, eid, cb, None) for eid, cb in ids]
        except libvirt.libvirtError as e:
            # Old or limited drivers lack some events; the daemon works without them.
            log.warning("libvirt events partly unavailable on %s: %s", uri, e.get_error_message())
        self._backoff_s = self.cfg.reconnect_min_s
        log.info("connected to libvirt at %s", uri)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for cid in self._callback_ids:
            try:
                conn.domainEventDeregisterAny(cid)
            except libvirt.libvirtError:
                pass
        self._callback_ids = []
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    def _ensure_connected(self) -> Any:
        """The live connection, reconnecting when the backoff allows; else HypervisorError."""
        if self._conn is not None and not self._lost:
            return self._conn
        if self._conn is not None:
            log.warning("libvirt connection to %s lost; reconnecting", self.cfg.uri)
            self.close()
        now = self.clock()
        if now < self._retry_at_s:
            raise HypervisorError(
                f"libvirt at {self.cfg.uri} is unreachable; next attempt in {self._retry_at_s - now:.1f} s"
            )
        try:
            self.connect()
        except HypervisorError:
            self._retry_at_s = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.cfg.reconnect_max_s)
            raise
        return self._conn

    def _rpc(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call libvirt, count it, and turn its error into ours."""
        self.calls[name] += 1
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            self.errors[name] += 1
            code = e.get_error_code()
            if code not in _GONE and (
                e.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE) or not self._alive()
            ):
                self._lost = True
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                raise NoSuchGuest(f"{name}: {e.get_error_message()}") from e
            raise HypervisorError(f"libvirt {name} failed: {e.get_error_message()}") from e

    def _alive(self) -> bool:
        try:
            return self._conn is not None and bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    # -- Hypervisor protocol ------------------------------------------------------------

    def snapshot(self) -> Sequence[GuestSnapshot]:
        """Every active guest with a balloon, from one bulk stats call."""
        conn = self._ensure_connected()
        flags = libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_STATE
        records = self._rpc(
            "getAllDomainStats", conn.getAllDomainStats, flags, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
        )
        out: list[GuestSnapshot] = []
        seen: dict[str, Any] = {}
        for dom, params in records:
            uuid, name = dom.UUIDString(), dom.name()  # both local: the object carries them
            seen[uuid] = dom
            try:
                guest = self._guest(dom, uuid, name, params)
            except NoSuchGuest:
                continue  # destroyed since the bulk call
            except (HypervisorError, lx.DomainXmlError, ValueError) as e:
                log.warning("guest %s skipped this tick: %s", name, e)
                continue
            if guest is not None:
                out.append(guest)
        self._domains = seen
        with self._lock:
            for gone in set(self._targets_kib) - set(seen):
                # A guest that is not active has no balloon to remember; a restarted one starts fresh.
                self._targets_kib.pop(gone, None)
                self._set_at_s.pop(gone, None)
            self._migrating &= set(seen)
            stale = set(self._xml) - set(seen)
            for gone in stale:
                self._xml.pop(gone, None)
                self._period_set.discard(gone)
        return out

    def set_target(self, uuid: str, target_kib: int) -> None:
        dom = self._domain(uuid)
        self._rpc("setMemoryFlags", dom.setMemoryFlags, int(target_kib), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        with self._lock:
            self._targets_kib[uuid] = int(target_kib)
            self._set_at_s[uuid] = self.clock()

    # -- beyond the protocol --------------------------------------------------------------

    def target_kib(self, uuid: str) -> int | None:
        """The target this daemon last set for the guest, if any."""
        with self._lock:
            return self._targets_kib.get(uuid)

    def set_floor(self, name_or_uuid: str, floor_kib: int) -> str:
        """Write the SLA floor into the domain's ``<metadata>`` (live, and persistent when
        the domain is defined), keeping our other keys; returns the guest's UUID."""
        dom = self._lookup(name_or_uuid)
        uuid = dom.UUIDString()
        max_kib = int(self._rpc("maxMemory", dom.maxMemory))
        FloorAboveMaximum.check(name_or_uuid, floor_kib, max_kib)
        try:
            current = lx.parse_metadata_element(
                dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, lx.NAMESPACE), name_or_uuid
            )
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                raise HypervisorError(f"{name_or_uuid}: cannot read metadata: {e.get_error_message()}") from e
            current = lx.GuestMetadata()
        new = lx.GuestMetadata(floor_kib, current.weight, current.exclude)
        flags = (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0) | (
            libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
        )
        self._rpc(
            "setMetadata",
            dom.setMetadata,
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            lx.metadata_element(new),
            lx.PREFIX,
            lx.NAMESPACE,
            flags,
        )
        self._xml.pop(uuid, None)
        return str(uuid)

    def return_to_max(self) -> int:
        """Deflate every guest seen in the last snapshot to its maximum; returns how many.
        Used on exit when configured; errors are logged, never raised."""
        n = 0
        for uuid, dom in list(self._domains.items()):
            try:
                self._rpc("setMemoryFlags", dom.setMemoryFlags, int(dom.maxMemory()), libvirt.VIR_DOMAIN_AFFECT_LIVE)
                n += 1
            except HypervisorError as e:
                log.warning("guest %s not returned to its maximum: %s", uuid, e)
        return n

    # -- internals ------------------------------------------------------------------------

    def _domain(self, uuid: str) -> Any:
        dom = self._domains.get(uuid)
        if dom is None:
            conn = self._ensure_connected()
            dom = self._rpc("lookupByUUIDString", conn.lookupByUUIDString, uuid)
        return dom

    def _lookup(self, name_or_uuid: str) -> Any:
        conn = self._ensure_connected()
        try:
            return self._rpc("lookupByName", conn.lookupByName, name_or_uuid)
        except NoSuchGuest:
            try:
                return self._rpc("lookupByUUIDString", conn.lookupByUUIDString, name_or_uuid)
            except HypervisorError:
                raise NoSuchGuest(f"no guest named or with UUID {name_or_uuid!r}") from None

    def _guest(self, dom: Any, uuid: str, name: str, params: dict[str, Any]) -> GuestSnapshot | None:
        run_state = self._run_state(uuid, params)
        if run_state is None:
            return None
        xml = self._xml.get(uuid)
        if xml is None:
            xml = self._xml[uuid] = lx.parse_domain(self._rpc("XMLDesc", dom.XMLDesc, 0), where=name)
        if not xml.has_balloon or xml.metadata.exclude:
            return None
        period_s = self._ensure_stats_period(dom, uuid, name, xml.stats_period_s)
        reading = self._reading(dom, name, params)
        with self._lock:
            last_target = self._targets_kib.get(uuid)
            set_at_s = self._set_at_s.get(uuid, float("-inf"))
        actual_kib = reading.current_kib
        if last_target is not None and actual_kib != last_target and self.clock() - set_at_s < SETTLE_S:
            # Recently set and libvirt's view disagrees: it may only be waiting for the
            # throttled event. Ask QEMU (query-balloon, via memoryStats) rather than let the
            # guard take a balloon in flight for one that stopped short. One RPC, and only
            # for guests whose target changed in the last few seconds.
            actual_kib = min(
                int(self._rpc("memoryStats", dom.memoryStats).get("actual", actual_kib)), reading.maximum_kib
            )
        return GuestSnapshot(
            uuid=uuid,
            name=name,
            max_kib=reading.maximum_kib,
            actual_kib=actual_kib,
            current_kib=reading.current_kib,
            last_target_kib=last_target,
            last_target_age_s=None if last_target is None else self.clock() - set_at_s,
            features=xml.features,
            stats=reading.stats,
            stats_period_s=period_s,
            floor_kib=xml.metadata.floor_kib,
            weight=xml.metadata.weight,
            run_state=run_state,
        )

    def _reading(self, dom: Any, name: str, params: dict[str, Any]) -> BalloonReading:
        if "balloon.maximum" not in params:
            # Only drivers without bulk balloon stats (the test driver) get here: one RPC.
            _state, max_kib, cur_kib, *_ = self._rpc("info", dom.info)
            params = {**params, "balloon.maximum": max_kib, "balloon.current": cur_kib}
        return from_bulk(params, where=name)

    def _run_state(self, uuid: str, params: dict[str, Any]) -> RunState | None:
        """RUNNING, or why the guest is left alone; None for a guest that is not running at all."""
        with self._lock:
            migrating = uuid in self._migrating
        return run_state(params.get("state.state", STATE_RUNNING), params.get("state.reason", 0), migrating=migrating)

    def _ensure_stats_period(self, dom: Any, uuid: str, name: str, period_s: float) -> float:
        """Turn on stats polling for a guest that has none, when configured; once per guest."""
        want = self.cfg.enable_stats_period_s
        if period_s > 0 or want == 0:
            return period_s
        if uuid not in self._period_set:
            self._period_set.add(uuid)
            try:
                self._rpc("setMemoryStatsPeriod", dom.setMemoryStatsPeriod, want, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                log.info("guest %s: stats polling enabled every %d s", name, want)
            except HypervisorError as e:
                log.warning("guest %s: cannot enable stats polling: %s", name, e)
                return 0.0
        return float(want)

    # -- event handlers (libvirt's event thread: record and hand on, nothing else) ---------

    def _emit(self, event: GuestEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("event consumer failed on %s", event)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        uuid = dom.UUIDString()
        with self._lock:
            if event == _EV_SUSPENDED and detail == _EV_SUSPENDED_MIGRATED:
                self._migrating.add(uuid)
            elif event in (_EV_RESUMED, _EV_STARTED, _EV_STOPPED, _EV_UNDEFINED):
                self._migrating.discard(uuid)
            if event in (_EV_STOPPED, _EV_UNDEFINED):
                self._targets_kib.pop(uuid, None)
            if event in (_EV_DEFINED, _EV_STARTED, _EV_STOPPED, _EV_UNDEFINED):
                self._xml.pop(uuid, None)
                self._period_set.discard(uuid)
        names = [
            "defined",
            "undefined",
            "started",
            "suspended",
            "resumed",
            "stopped",
            "shutdown",
            "pmsuspended",
            "crashed",
        ]
        what = names[event] if 0 <= event < len(names) else str(event)
        self._emit(GuestEvent("lifecycle", uuid, dom.name(), f"{what}/{detail}"))

    def _on_balloon_change(self, _conn: Any, dom: Any, actual_kib: int, _opaque: Any) -> None:
        self._emit(GuestEvent("balloon-change", dom.UUIDString(), dom.name(), actual_kib=int(actual_kib)))

    def _on_metadata_change(self, _conn: Any, dom: Any, _mtype: int, _nsuri: Any, _opaque: Any) -> None:
        uuid = dom.UUIDString()
        with self._lock:
            self._xml.pop(uuid, None)
        self._emit(GuestEvent("metadata-change", uuid, dom.name()))

    def _on_migration_iteration(self, _conn: Any, dom: Any, iteration: int, _opaque: Any) -> None:
        uuid = dom.UUIDString()
        with self._lock:
            self._migrating.add(uuid)
        self._emit(GuestEvent("migration", uuid, dom.name(), f"iteration {iteration}"))

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self._lost = True
        log.warning("libvirt connection closed (reason %d)", reason)
