"""Prometheus metrics for ``/metrics`` (prometheus_client), on a private registry so two
daemons in one process (tests) never collide. Names follow Prometheus conventions: base
units are bytes and seconds, so KiB are multiplied out here, at the edge.

The per-guest gauges are one custom collector (``GuestGauges``) over the last tick's
columns: a tick stores a handful of arrays, a scrape formats them. Setting four labelled
gauges per guest per tick cost more than the rest of a 1,000-guest tick together, and a
scrape still sees every tick's values (prometheus_client's documented way for exporters
whose values live elsewhere: a collector whose ``collect`` runs at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from overcommitd.ksm import KsmController
from overcommitd.model import ClampReason, Decision, GuestSnapshot, HostSnapshot
from overcommitd.shortfall import Shortfall
from overcommitd.table import FloatArray, GuestTable, IntArray

_KIB = 1024
_LABELS = ["guest", "uuid"]


def _none() -> FloatArray:
    return np.empty(0)


@dataclass(frozen=True, slots=True, eq=False)
class GuestColumns:
    """What the per-guest gauges show, row for row with ``uuids``/``names`` (KiB; NaN:
    no sample yet, the series is left out)."""

    names: tuple[str, ...] = ()
    uuids: tuple[str, ...] = ()
    actual_kib: FloatArray = field(default_factory=_none)
    max_kib: FloatArray = field(default_factory=_none)
    available_kib: FloatArray = field(default_factory=_none)
    target_kib: FloatArray = field(default_factory=_none)

    def carried(self, uuids: tuple[str, ...], values: FloatArray, previous: FloatArray) -> FloatArray:
        """``values``, with NaN rows keeping the value this guest had last tick: a gauge
        keeps its last value until it is set again, as the labelled gauges did."""
        missing = np.isnan(values)
        if not missing.any() or len(self.uuids) == 0:
            return values
        if uuids == self.uuids:
            old = previous
        else:
            index = {u: i for i, u in enumerate(self.uuids)}
            at = np.array([index.get(u, -1) for u in uuids], dtype=np.int64)
            old = np.where(at >= 0, previous[np.maximum(at, 0)], np.nan)
        return np.where(missing, old, values)


class GuestGauges(Collector):
    """``overcommitd_guest_{actual,max,available,target}_bytes`` from ``GuestColumns``,
    formatted at scrape time. A guest that left is gone from the next scrape."""

    _HELP = (
        ("overcommitd_guest_target_bytes", "Balloon target last set by this daemon", "target_kib"),
        ("overcommitd_guest_actual_bytes", "Guest memory now (max minus balloon)", "actual_kib"),
        ("overcommitd_guest_available_bytes", "Guest MemAvailable from its balloon stats", "available_kib"),
        ("overcommitd_guest_max_bytes", "Guest boot memory (libvirt <memory>)", "max_kib"),
    )

    def __init__(self) -> None:
        self.columns = GuestColumns()  # replaced whole by each tick: a scrape sees one tick

    def collect(self) -> Iterator[GaugeMetricFamily]:
        c = self.columns
        for name, text, column in self._HELP:
            family = GaugeMetricFamily(name, text, labels=_LABELS)
            values: FloatArray = getattr(c, column)
            for i in np.flatnonzero(~np.isnan(values)).tolist():
                family.add_metric([c.names[i], c.uuids[i]], float(values[i]) * _KIB)
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.guests = GuestGauges()
        r.register(self.guests)
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

    def observe_host(self, host: HostSnapshot) -> None:
        self.host_available.set(host.mem_available_kib * _KIB)
        self.host_arc_reclaimable.set(host.arc_reclaimable_kib * _KIB)
        if host.psi is not None:
            self.host_psi_some.set(host.psi.some_avg10)

    def observe_guests(self, table: GuestTable, set_rows: IntArray, set_kib: IntArray) -> None:
        """Every guest's gauges from the tick's table; ``set_rows`` of it were given
        ``set_kib`` this tick. A gauge with no new value keeps the guest's last one."""
        old = self.guests.columns
        target = np.where(table.has_last_target, table.last_target_kib, np.nan)
        target[set_rows] = set_kib
        available = np.where(table.stats.present, table.stats.available_kib(), np.nan)
        self.guests.columns = GuestColumns(
            table.name,
            table.uuid,
            table.actual_kib.astype(np.float64),
            table.max_kib.astype(np.float64),
            old.carried(table.uuid, available, old.available_kib),
            old.carried(table.uuid, target, old.target_kib),
        )

    def count_decisions(self, set_n: int, held_n: int, clamps: Mapping[ClampReason, int]) -> None:
        """This tick's decisions by outcome and clamps by reason."""
        if set_n:
            self.decisions.labels("set").inc(set_n)
        if held_n:
            self.decisions.labels("held").inc(held_n)
        for reason, n in clamps.items():
            if n:
                self.clamps.labels(reason.value).inc(n)

    def observe(
        self, host: HostSnapshot, guests: Sequence[GuestSnapshot], decisions: Sequence[Decision], applied: set[str]
    ) -> None:
        """The same from snapshots and Decisions (one guest at a time)."""
        self.observe_host(host)
        table = GuestTable.of(guests)
        row = {u: i for i, u in enumerate(table.uuid)}
        moved = [
            (row[d.uuid], d.target_kib)
            for d in decisions
            if d.uuid in applied and d.target_kib is not None and d.uuid in row
        ]
        self.observe_guests(
            table, np.array([r for r, _ in moved], dtype=np.int64), np.array([t for _, t in moved], dtype=np.int64)
        )
        clamps: dict[ClampReason, int] = {}
        for d in decisions:
            for c in d.clamps:
                clamps[c.reason] = clamps.get(c.reason, 0) + 1
        set_n = sum(1 for d in decisions if d.uuid in applied)
        self.count_decisions(set_n, len(decisions) - set_n, clamps)
