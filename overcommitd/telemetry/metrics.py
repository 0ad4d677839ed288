"""Prometheus metrics for ``/metrics`` (prometheus_client), on a private registry so two
daemons in one process (tests) never collide. Names follow Prometheus conventions: base
units are bytes and seconds, so KiB are multiplied out here, at the edge."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from overcommitd.ksm import KsmController
from overcommitd.model import Decision, GuestSnapshot, HostSnapshot
from overcommitd.shortfall import Shortfall

_KIB = 1024


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["guest", "uuid"]
        self.target = Gauge(
            "overcommitd_guest_target_bytes", "Balloon target last set by this daemon", labels, registry=r
        )
        self.actual = Gauge(
            "overcommitd_guest_actual_bytes", "Guest memory now (max minus balloon)", labels, registry=r
        )
        self.available = Gauge(
            "overcommitd_guest_available_bytes", "Guest MemAvailable from its balloon stats", labels, registry=r
        )
        self.maximum = Gauge("overcommitd_guest_max_bytes", "Guest boot memory (libvirt <memory>)", labels, registry=r)
        self.decisions = Counter("overcommitd_decisions", "Decisions by outcome (set, held)", ["outcome"], registry=r)
        self.clamps = Counter("overcommitd_clamps", "Guard clamps by reason", ["reason"], registry=r)
        self.tick = Histogram(
            "overcommitd_tick_duration_seconds",
            "One control tick: read, decide, apply",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        # The name predates the QMP backend; it counts that backend's failed commands too.
        self.libvirt_errors = Counter(
            "overcommitd_libvirt_errors", "Hypervisor calls that failed (libvirt or QMP)", ["call"], registry=r
        )
        self.hypervisor_calls = Counter(
            "overcommitd_hypervisor_calls",
            "Calls to the hypervisor: libvirt RPCs or QMP commands",
            ["call"],
            registry=r,
        )
        self.host_available = Gauge("overcommitd_host_available_bytes", "Host MemAvailable", registry=r)
        self.host_arc_reclaimable = Gauge(
            "overcommitd_host_zfs_arc_reclaimable_bytes",
            "ZFS ARC above its minimum (size - c_min): not in MemAvailable, yet the host can drop it",
            registry=r,
        )
        self.host_short = Gauge(
            "overcommitd_host_short_bytes",
            "Memory the host lacks even if every balloon took all it safely can (0: it has room); overcommitd.shortfall",
            registry=r,
        )
        self.host_psi_some = Gauge(
            "overcommitd_host_psi_memory_some_avg10", "Host PSI memory some avg10 (%)", registry=r
        )
        self.mqtt_dropped = Gauge(
            "overcommitd_mqtt_dropped_messages", "Telemetry dropped: buffer full during an outage", registry=r
        )
        self.dry_run = Gauge("overcommitd_dry_run", "1 when decisions are not applied", registry=r)
        self.ksm = Gauge(
            "overcommitd_ksm", "KSM sysfs value as last read (run, pages_to_scan, ...)", ["file"], registry=r
        )
        self.ksm_action = Gauge(
            "overcommitd_ksm_last_action", "1 for the KSM controller's last adjustment", ["action"], registry=r
        )
        self.ksm_saved = Gauge("overcommitd_ksm_saved_bytes", "Memory KSM saves: pages_sharing x page size", registry=r)
        self.ksm_errors = Counter("overcommitd_ksm_errors", "KSM sysfs reads/writes that failed", ["op"], registry=r)
        self.ksm_writes = Counter("overcommitd_ksm_writes", "KSM sysfs files written", ["file"], registry=r)
        self._ksm_counted: dict[str, int] = {}
        self._known: set[tuple[str, str]] = set()

    def serve(self, address: str, port: int) -> int:
        """Start the HTTP endpoint in a thread; returns the bound port (for port 0)."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return int(server.server_address[1])

    def observe_shortfall(self, s: Shortfall) -> None:
        self.host_short.set(s.short_kib * _KIB)

    def observe_ksm(self, ksm: KsmController) -> None:
        """The controller's last reading and action; its error and write counts."""
        status = ksm.last
        if status is not None and status.reading is not None:
            r = status.reading
            for name in ("run", "pages_to_scan", "sleep_millisecs", "pages_shared", "pages_sharing", "full_scans"):
                self.ksm.labels(name).set(getattr(r, name))
            self.ksm_saved.set(r.pages_sharing * ksm.page_kib * _KIB)
        if status is not None and status.adjustment is not None:
            for action in ("hold", "start", "boost", "decay", "stop", "backoff"):
                self.ksm_action.labels(action).set(1 if action == status.adjustment.action else 0)
        for kind, counter, counts in (
            ("error", self.ksm_errors, ksm.errors),
            ("write", self.ksm_writes, ksm.writes_total),
        ):
            for label, n in counts.items():
                seen = self._ksm_counted.get(f"{kind}:{label}", 0)
                if n > seen:
                    counter.labels(label).inc(n - seen)
                    self._ksm_counted[f"{kind}:{label}"] = n

    def observe(
        self, host: HostSnapshot, guests: Sequence[GuestSnapshot], decisions: Sequence[Decision], applied: set[str]
    ) -> None:
        self.host_available.set(host.mem_available_kib * _KIB)
        self.host_arc_reclaimable.set(host.arc_reclaimable_kib * _KIB)
        if host.psi is not None:
            self.host_psi_some.set(host.psi.some_avg10)
        now: set[tuple[str, str]] = set()
        for g in guests:
            key = (g.name, g.uuid)
            now.add(key)
            self.actual.labels(*key).set(g.actual_kib * _KIB)
            self.maximum.labels(*key).set(g.max_kib * _KIB)
            avail = g.stats.available_kib() if g.stats else None
            if avail is not None:
                self.available.labels(*key).set(avail * _KIB)
            if g.last_target_kib is not None:
                self.target.labels(*key).set(g.last_target_kib * _KIB)
        by_uuid = {g.uuid: g for g in guests}
        for d in decisions:
            self.decisions.labels("set" if d.uuid in applied else "held").inc()
            for c in d.clamps:
                self.clamps.labels(c.reason.value).inc()
            if d.uuid in applied and d.target_kib is not None and d.uuid in by_uuid:
                self.target.labels(d.name, d.uuid).set(d.target_kib * _KIB)
        for gone in self._known - now:  # guests that left: drop their series
            for gauge in (self.actual, self.maximum, self.available, self.target):
                try:
                    gauge.remove(*gone)
                except KeyError:
                    pass
        self._known = now
