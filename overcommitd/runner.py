"""The daemon: ``overcommitd run`` on a real host.

Each tick reads (host files, then every guest in one hypervisor call), lets
``overcommitd.loop.step`` decide (the policy, then the guard: nothing reaches a guest any
other way), applies the targets unless in dry-run, and hands telemetry to MQTT and
Prometheus, which never wait on the network. Blocking calls (libvirt, /proc) run in a
worker thread, so signals, commands and telemetry are served while libvirt is slow.

Signals: SIGTERM/SIGINT stop after the current tick (and, when configured, deflate every
balloon to its maximum first); SIGHUP reloads the config file and makes the running state
match it (a policy, dry-run or pause set over MQTT gives way to the file), logging each
change. Per-guest state (targets set, the guard's back-off memory) lives across reloads and
libvirt reconnects. Over MQTT only registered policies are accepted: nothing received
imports code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from overcommitd import package_version
from overcommitd import status as status_doc
from overcommitd.config import DaemonConfig, GuardConfig, GuestOverride
from overcommitd.config_diff import changes
from overcommitd.guard import clamp_counts
from overcommitd.host import HostError
from overcommitd.hypervisor import FloorAboveMaximum, HostReader, Hypervisor, HypervisorError, NoSuchGuest
from overcommitd.ksm import KsmController
from overcommitd.loop import LoopState, StepOutcome, apply, step_table
from overcommitd.model import Decision, GuestSnapshot, HostSnapshot
from overcommitd.sdnotify import Notifier
from overcommitd.shortfall import Shortfall, ShortfallLog, estimate_table
from overcommitd.table import GuestTable
from overcommitd.telemetry import messages as msg
from overcommitd.telemetry.metrics import Metrics
from overcommitd.telemetry.mqtt import MqttLink
from policies.api import ModulePathRefused, Policy, PolicyFactory, PolicyLoadError, UnknownPolicy

log = logging.getLogger(__name__)


class ManagedHypervisor(Hypervisor, Protocol):
    """What the daemon needs beyond the loop's Hypervisor: a connection to manage,
    floors to write, balloons to return on exit, and its error counts."""

    errors: Counter[str]

    def connect(self) -> None: ...
    def close(self) -> None: ...
    def set_floor(self, name_or_uuid: str, floor_kib: int) -> str: ...
    def return_to_max(self) -> int: ...


@dataclass(frozen=True, slots=True)
class TickReport:
    """What one tick did; ``error`` is set when it could not read and so decided nothing."""

    table: GuestTable | None = None  # every guest as the hypervisor reported it this tick
    outcome: StepOutcome[Any] | None = None
    applied: frozenset[str] = frozenset()
    duration_s: float = 0.0
    error: str | None = None
    shortfall: Shortfall | None = None  # what the host lacks beyond every balloon (None: not read)

    @property
    def guests(self) -> tuple[GuestSnapshot, ...]:
        """The table's rows as snapshots (built when asked: the tick itself never does)."""
        return () if self.table is None else self.table.snapshots()


def read_table(hv: Hypervisor) -> GuestTable:
    """The hypervisor's one bulk snapshot as a table: straight from its arrays when it
    builds one (``table()``, the simulator), else from its snapshots (libvirt, QMP)."""
    table = getattr(hv, "table", None)
    if table is not None:
        return table()  # type: ignore[no-any-return]
    return GuestTable.of(hv.snapshot())


@dataclass(frozen=True, slots=True, eq=False)
class _StatusInputs:
    """What the status document of the last tick is built from, when someone asks."""

    outcome: StepOutcome[Any]
    applied: frozenset[str]
    rules: GuardConfig
    policy: str
    dry_run: bool
    ticks: int
    interval_s: float
    host_short_kib: int
    updated_at: str

    def build(self) -> status_doc.DaemonStatus:
        return status_doc.build(
            self.outcome.table.snapshots(),
            self.outcome.decisions,
            self.applied,
            self.rules,
            policy=self.policy,
            dry_run=self.dry_run,
            ticks=self.ticks,
            interval_s=self.interval_s,
            host_short_kib=self.host_short_kib,
            updated_at=self.updated_at,
        )


# Keys of the restart-only sections that the daemon reads afresh every tick (the shortfall
# estimate's host reserve): a reload applies them, so no "after a restart" warning.
_LIVE_KEYS: dict[str, set[str]] = {"host": {"reserve_kib", "guest_overhead_kib"}}


def _error_name(e: HypervisorError) -> msg.ErrorName:
    if isinstance(e, NoSuchGuest):
        return "no-such-guest"
    if isinstance(e, FloorAboveMaximum):
        return "floor-above-max"
    return "hypervisor-error"


def _policy_error_name(e: PolicyLoadError) -> msg.ErrorName:
    if isinstance(e, ModulePathRefused):
        return "policy-path-refused"
    return "unknown-policy" if isinstance(e, UnknownPolicy) else "bad-policy"


class Daemon:
    def __init__(
        self,
        cfg: DaemonConfig,
        hv: ManagedHypervisor,
        host: HostReader,
        *,
        config_path: Path | None = None,
        cli_dry_run: bool | None = None,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        make_policy: PolicyFactory,
    ) -> None:
        self.cfg = cfg
        self.hv = hv
        self.host = host
        self.config_path = config_path
        self.cli_dry_run = cli_dry_run
        self.dry_run = cfg.runner.dry_run if cli_dry_run is None else cli_dry_run
        self.notifier = notifier or Notifier()
        self.metrics = metrics or Metrics()
        self.make_policy = make_policy  # the CLI hands the registry's create: reload and set-policy need one
        self.policy: Policy[Any] = make_policy(cfg.policy.name, cfg.policy.params)
        self.policy_params: dict[str, Any] = dict(cfg.policy.params)  # as the running policy was given them
        self.policy_spec = cfg.policy.name  # the name it was created from (registry name or module:Class)
        self.state: LoopState[Any] = LoopState.initial(self.policy)
        self.paused: set[str] = set()  # uuids paused by command: left alone, like excluded guests
        self.migrations: dict[str, float] = {}  # uuid -> monotonic deadline of an announced migration
        self.last_table: GuestTable | None = None  # the last tick's guests, for commands naming one
        self.ticks = 0
        self.mqtt: MqttLink | None = None
        self.stopping = asyncio.Event()
        self.reload_requested = False
        self._hv_lock = asyncio.Lock()  # one hypervisor call sequence at a time: tick or command
        self._errors_seen: Counter[str] = Counter()
        self.ksm = KsmController(cfg.ksm) if cfg.ksm.enabled else None
        self.ksm_failures = 0  # unexpected errors of the KSM controller, beside its own counted ones
        self._wake = asyncio.Event()  # SIGHUP and SIGTERM cut the wait between ticks short
        self._floors_warned: set[tuple[str, int]] = set()  # (uuid, config floor) already reported
        self._calls_seen: Counter[str] = Counter()
        self._status: _StatusInputs | status_doc.DaemonStatus | None = None  # built on first read
        self._status_bytes: bytes | None = status_doc.encode(
            status_doc.build(
                [],
                [],
                frozenset(),
                cfg.guard,
                policy=self.policy.name,
                dry_run=self.dry_run,
                ticks=0,
                interval_s=cfg.interval_s,
            )
        )  # served until the first tick
        self._reasons = status_doc.ReasonKinds()
        self._short_log = ShortfallLog()
        self._status_server: status_doc.StatusServer | None = None

    # -- one tick ---------------------------------------------------------------------------

    async def tick(self) -> TickReport:
        started = time.perf_counter()
        async with self._hv_lock:
            report = await self._read_decide_apply()
        report = dataclasses.replace(report, duration_s=time.perf_counter() - started)
        self.metrics.tick.observe(report.duration_s)
        self._count_libvirt_errors()
        self.ticks += 1
        return report

    async def _read_decide_apply(self) -> TickReport:
        try:
            host, table = await asyncio.to_thread(self._read)
        except (HostError, HypervisorError) as e:
            log.warning("tick skipped, every guest held: %s", e, extra={"event": "tick-skipped"})
            return TickReport(error=str(e))
        table = self._mark_migrations(table)
        self.last_table = table
        await self._ksm_tick(host, table)
        self._warn_floors_above_max(table)
        cfg = self._effective_cfg(table)
        outcome = step_table(host.taken_at_s, host, table, self.policy, self.state, cfg)
        self.state = outcome.state
        moving = outcome.decisions_of(np.flatnonzero(outcome.has_target).tolist())
        applied: frozenset[str] = frozenset()
        if not self.dry_run and moving:
            applied = frozenset(await asyncio.to_thread(apply, self.hv, moving))
        shortfall = self._shortfall(host, outcome, cfg)
        self._publish(host, table, outcome, moving, applied, shortfall)
        self._explain(outcome, applied, shortfall)
        return TickReport(table, outcome, applied, shortfall=shortfall)

    def _read(self) -> tuple[HostSnapshot, GuestTable]:
        """The host, then every guest: one trip to the worker thread for both."""
        return self.host.read(), read_table(self.hv)

    def _shortfall(self, host: HostSnapshot, outcome: StepOutcome[Any], cfg: DaemonConfig) -> Shortfall:
        """What the host lacks even if every balloon took all it safely can (``overcommitd.
        shortfall``), over the step's own table (with the config's floors); excluded and
        paused guests count at their size, the host's own use at least ``[host]``'s
        reserve. Logged when it is news."""
        table = outcome.table
        held = outcome.excluded if outcome.excluded is not None else np.zeros(len(table), dtype=bool)
        own_min_kib = cfg.host.own_min_kib(len(table))
        shortfall = estimate_table(host, table, cfg.guard, held=held, host_own_min_kib=own_min_kib)
        self._short_log.update(shortfall)
        return shortfall

    async def _ksm_tick(self, host: HostSnapshot, table: GuestTable) -> None:
        """One KSM adjustment, if enabled; the daemon's dry-run holds for KSM too. Nothing it
        does can stop the balloon loop."""
        if self.ksm is None:
            return
        ksm = self.ksm
        try:
            memory_kib = int(table.actual_kib.sum())
            status = await asyncio.to_thread(ksm.tick, time.monotonic(), host, memory_kib, dry_run=self.dry_run)
            self.metrics.observe_ksm(ksm)
            if self.mqtt is not None:
                self.mqtt.offer(self.mqtt.topics.ksm, msg.KsmMessage.of(status), retain=True)
        except Exception:  # a bug in the optional controller must not cost the guests their tick
            self.ksm_failures += 1
            log.exception("ksm controller failed; balloon control goes on", extra={"event": "ksm-error"})

    def _overridden_rows(self, table: GuestTable) -> list[tuple[int, GuestOverride]]:
        """The rows the config's ``[guests.*]`` sections name, with their override (one
        keyed by UUID wins, as ``DaemonConfig.override_for``)."""
        guests = self.cfg.guests
        if not guests:
            return []
        out = []
        for i, (uuid, name) in enumerate(zip(table.uuid, table.name, strict=True)):
            o = guests.get(uuid) or guests.get(name)
            if o is not None:
                out.append((i, o))
        return out

    def _warn_floors_above_max(self, table: GuestTable) -> None:
        """A config floor above a guest's maximum is capped at the maximum (the guard's
        ``floor_kib``); say so once per guest and floor, not every tick."""
        for i, o in self._overridden_rows(table):
            max_kib = int(table.max_kib[i])
            if o.floor_kib is None or o.floor_kib <= max_kib:
                continue
            uuid, name = table.uuid[i], table.name[i]
            if (uuid, o.floor_kib) not in self._floors_warned:
                self._floors_warned.add((uuid, o.floor_kib))
                log.warning(
                    "guest %s: config floor %d KiB is above its maximum %d KiB; capped at the maximum",
                    name,
                    o.floor_kib,
                    max_kib,
                    extra={"event": "floor-above-max", "guest": name},
                )

    def _explain(self, outcome: StepOutcome[Any], applied: frozenset[str], shortfall: Shortfall) -> None:
        """Keep what the status document is built from (built when someone reads it) and
        log each guest's reason when its kind changes (``status.ReasonKinds``)."""
        self._status = _StatusInputs(
            outcome,
            applied,
            self.cfg.guard,
            self.policy.name,
            self.dry_run,
            self.ticks + 1,
            self.cfg.interval_s,
            shortfall.short_kib,
            status_doc.now_text(),
        )
        self._status_bytes = None
        table, verdict = outcome.table, outcome.verdict
        if verdict is None:
            return
        applied_rows = (
            np.array([u in applied for u in table.uuid], dtype=bool) if applied else np.zeros(len(table), dtype=bool)
        )
        kinds = self._reasons.kinds(table, verdict, applied_rows, outcome.errors, outcome.reasons)

        def status_of(i: int) -> status_doc.GuestStatus:
            (d,) = outcome.decisions_of([i])
            return status_doc.guest_status(table.snapshot(i), d, d.uuid in applied, int(verdict.floor_kib[i]))

        self._reasons.update(table.uuid, kinds, status_of)

    @property
    def last_status(self) -> status_doc.DaemonStatus | None:
        """What `overcommitd status` shows: the last tick's document (None before one)."""
        if isinstance(self._status, _StatusInputs):
            self._status = self._status.build()
        return self._status

    def _effective_cfg(self, table: GuestTable) -> DaemonConfig:
        """The config with guests paused by command excluded (keeping their other overrides)."""
        if not self.paused:
            return self.cfg
        overrides = dict(self.cfg.guests)
        for uuid, name in zip(table.uuid, table.name, strict=True):
            if uuid in self.paused:
                base = self.cfg.guests.get(uuid) or self.cfg.guests.get(name) or GuestOverride.model_validate({})
                overrides[uuid] = base.model_copy(update={"exclude": True})
        return self.cfg.model_copy(update={"guests": overrides})

    def _mark_migrations(self, table: GuestTable) -> GuestTable:
        """Guests with an announced migration, marked; an announcement whose time ran out,
        or whose guest has left this host, is dropped."""
        if not self.migrations:
            return table
        now_s = time.monotonic()
        present = set(table.uuid)
        self.migrations = {u: t for u, t in self.migrations.items() if t > now_s and u in present}
        if not self.migrations:
            return table
        announced = np.array([u in self.migrations for u in table.uuid], dtype=bool)
        return table.replace(migration_pending=table.migration_pending | announced)

    def _count_libvirt_errors(self) -> None:
        """Carry the backend's cumulative call and error counts into Prometheus."""
        for counts, seen, metric in (
            (getattr(self.hv, "errors", Counter()), self._errors_seen, self.metrics.libvirt_errors),
            (getattr(self.hv, "calls", Counter()), self._calls_seen, self.metrics.hypervisor_calls),
        ):
            for call, n in list(counts.items()):
                if n > seen[call]:
                    metric.labels(call).inc(n - seen[call])
                    seen[call] = n

    # -- telemetry --------------------------------------------------------------------------

    def status_document(self) -> bytes:
        """The JSON the status socket serves: the last tick's ``status.DaemonStatus``."""
        if self._status_bytes is None:
            status = self.last_status
            assert status is not None  # set with the first tick, which also cleared the bytes
            self._status_bytes = status_doc.encode(status)
        return self._status_bytes

    def status(self) -> msg.StatusMessage:
        return msg.StatusMessage(online=True, dry_run=self.dry_run, policy=self.policy.name, version=package_version())

    def _publish(
        self,
        host: HostSnapshot,
        read: GuestTable,
        outcome: StepOutcome[Any],
        moving: Sequence[Decision],
        applied: frozenset[str],
        shortfall: Shortfall,
    ) -> None:
        """Prometheus from the step's columns; a log line per target set; MQTT as documented
        (a snapshot and a decision per guest per tick, built only when MQTT is on)."""
        table = outcome.table
        self.metrics.observe_host(host)
        row = {u: i for i, u in enumerate(table.uuid)} if applied else {}
        set_rows = [(row[d.uuid], d.target_kib) for d in moving if d.uuid in applied and d.target_kib is not None]
        self.metrics.observe_guests(
            table,
            np.array([r for r, _ in set_rows], dtype=np.int64),
            np.array([t for _, t in set_rows], dtype=np.int64),
        )
        clamps = clamp_counts(outcome.verdict) if outcome.verdict is not None else self._clamps_of(outcome.decisions)
        self.metrics.count_decisions(len(applied), len(table) - len(applied), clamps)
        self.metrics.observe_shortfall(shortfall)
        self.metrics.dry_run.set(1 if self.dry_run else 0)
        for d in moving:
            if d.target_kib is not None:
                log.info(
                    "guest %s: target %d KiB%s",
                    d.name,
                    d.target_kib,
                    "" if d.uuid in applied else " (not applied)",
                    extra={
                        "event": "target",
                        "guest": d.name,
                        "target_kib": d.target_kib,
                        "wish_kib": d.wish_kib,
                        "applied": d.uuid in applied,
                        "clamps": [c.reason.value for c in d.clamps],
                    },
                )
        if self.mqtt is None:
            return
        self.metrics.mqtt_dropped.set(self.mqtt.dropped_total)
        t = self.mqtt.topics
        self.mqtt.offer(t.host, msg.HostMessage.of(host), retain=True)
        self.mqtt.offer(t.shortfall, msg.ShortfallMessage.of(shortfall), retain=True)
        names = {}
        for g in read.snapshots():  # the snapshot as read: before the config's overrides
            names[g.uuid] = g.name
            self.mqtt.offer(t.guest(g.name, "snapshot"), msg.GuestMessage.of(g))
        for d in outcome.decisions:
            self.mqtt.offer(
                t.guest(names.get(d.uuid, d.name), "decision"), msg.DecisionMessage.of(d, applied=d.uuid in applied)
            )

    @staticmethod
    def _clamps_of(decisions: Sequence[Decision]) -> dict[Any, int]:
        counts: Counter[Any] = Counter()
        for d in decisions:
            counts.update(c.reason for c in d.clamps)
        return dict(counts)

    def on_guest_event(self, event: Any) -> None:
        """A libvirt event, on the asyncio loop (bridged from libvirt's event thread)."""
        log.debug(
            "guest %s: %s %s", event.name, event.kind, event.detail, extra={"event": event.kind, "guest": event.name}
        )
        if self.mqtt is not None:
            m = msg.GuestEventMessage(
                uuid=event.uuid, name=event.name, kind=event.kind, detail=event.detail, actual_kib=event.actual_kib
            )
            self.mqtt.offer(self.mqtt.topics.guest(event.name, "event"), m)

    # -- commands ---------------------------------------------------------------------------

    async def handle_command(self, cmd: msg.Command) -> msg.Reply:
        log.info("command %s", cmd.command, extra={"event": "command", "command": cmd.model_dump()})
        if isinstance(cmd, msg.SetFloor):
            async with self._hv_lock:
                try:
                    uuid = await asyncio.to_thread(self.hv.set_floor, cmd.guest, cmd.floor_kib)
                except HypervisorError as e:
                    raise msg.CommandError(_error_name(e), str(e), cmd.id) from e
            return msg.Reply(id=cmd.id, ok=True, message=f"floor of {uuid} set to {cmd.floor_kib} KiB")
        if isinstance(cmd, msg.PauseGuest | msg.ResumeGuest):
            g = self._known_guest(cmd.guest, cmd.id)
            (self.paused.add if isinstance(cmd, msg.PauseGuest) else self.paused.discard)(g.uuid)
            return msg.Reply(id=cmd.id, ok=True, message=f"{g.name} {cmd.command}d")
        if isinstance(cmd, msg.PrepareMigration):
            g = self._known_guest(cmd.guest, cmd.id)
            self.migrations[g.uuid] = time.monotonic() + cmd.within_s
            return msg.Reply(id=cmd.id, ok=True, message=f"{g.name}: migration announced for {cmd.within_s:g} s")
        if isinstance(cmd, msg.CancelMigration):
            g = self._known_guest(cmd.guest, cmd.id)
            was = self.migrations.pop(g.uuid, None) is not None
            return msg.Reply(
                id=cmd.id,
                ok=True,
                message=f"{g.name}: {'migration cancelled' if was else 'no migration was announced'}",
            )
        if isinstance(cmd, msg.SwitchPolicy):
            try:
                policy = self.make_policy(cmd.name, cmd.params, allow_module_path=False)
            except PolicyLoadError as e:
                raise msg.CommandError(_policy_error_name(e), str(e), cmd.id) from e
            self._use_policy(policy, cmd.name, dict(cmd.params))
            return msg.Reply(id=cmd.id, ok=True, message=f"policy {cmd.name}")
        assert isinstance(cmd, msg.SetDryRun)
        self.dry_run = cmd.enabled
        self._publish_status()
        return msg.Reply(id=cmd.id, ok=True, message=f"dry-run {'on' if cmd.enabled else 'off'}")

    def _known_guest(self, name_or_uuid: str, cmd_id: str | None) -> GuestSnapshot:
        table = self.last_table
        if table is not None:
            for i, (uuid, name) in enumerate(zip(table.uuid, table.name, strict=True)):
                if name_or_uuid in (name, uuid):
                    return table.snapshot(i)
        raise msg.CommandError("no-such-guest", f"no running guest named or with UUID {name_or_uuid!r}", cmd_id)

    def _use_policy(self, policy: Policy[Any], spec: str, params: dict[str, Any]) -> None:
        """A new policy starts from its own initial state; the guard's memory is kept."""
        self.policy, self.policy_spec, self.policy_params = policy, spec, params
        self.state = LoopState(policy.initial_state(), self.state.guard)
        self._publish_status()
        log.info("policy is now %s", policy.name, extra={"event": "policy", "policy": policy.name})

    def running_config(self) -> DaemonConfig:
        """The config as the daemon runs it: the file's, with what commands changed."""
        policy = self.cfg.policy.model_copy(update={"name": self.policy_spec, "params": self.policy_params})
        runner = self.cfg.runner.model_copy(update={"dry_run": self.dry_run})
        return self.cfg.model_copy(update={"policy": policy, "runner": runner})

    def _publish_status(self) -> None:
        if self.mqtt is not None:
            self.mqtt.offer(self.mqtt.topics.status, self.status(), retain=True)

    # -- reload and run ---------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config file and make the running state match it. A bad file
        (or anything failing while reading it) is logged and the running config kept."""
        self.reload_requested = False
        if self.config_path is None:
            log.info("SIGHUP: no config file to reload")
            return
        self.notifier.reloading()
        try:
            self._reload_from(self.config_path)
        except Exception as e:  # noqa: BLE001 - a reload never stops the daemon
            log.error("reload failed, keeping the running config: %s", e, extra={"event": "reload-failed"})
        finally:
            self.notifier.ready()

    def _reload_from(self, path: Path) -> None:
        new = DaemonConfig.load(path)
        if self.cli_dry_run is not None:  # --dry-run on the command line outlives reloads
            new = new.model_copy(update={"runner": new.runner.model_copy(update={"dry_run": self.cli_dry_run})})
        changed = changes(self.running_config(), new)
        if (new.policy.name, new.policy.params) != (self.policy_spec, self.policy_params):
            policy = self.make_policy(new.policy.name, new.policy.params)  # raises before anything changes
            self._use_policy(policy, new.policy.name, dict(new.policy.params))
        if self.paused:
            changed.append(f"guests paused by command resumed: {len(self.paused)}")
            self.paused.clear()
        for section in ("hypervisor", "libvirt", "qmp", "mqtt", "metrics", "host"):
            live = _LIVE_KEYS.get(section, set())  # read every tick: take effect now
            if getattr(new, section).model_dump(exclude=live) != getattr(self.cfg, section).model_dump(exclude=live):
                log.warning("[%s] changed: takes effect after a restart", section)
        if new.ksm != self.cfg.ksm:
            self.ksm = KsmController(new.ksm) if new.ksm.enabled else None
        self.cfg = new
        self.dry_run = new.runner.dry_run
        self._publish_status()
        log.info(
            "config reloaded from %s: %s",
            path,
            "; ".join(changed) or "no change",
            extra={"event": "reloaded", "changes": changed},
        )

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)

        def hup() -> None:
            self.reload_requested = True
            self._wake.set()

        loop.add_signal_handler(signal.SIGHUP, hup)

    async def run(self, *, once: bool = False, on_tick: Callable[[TickReport], None] | None = None) -> None:
        """Tick on a steady schedule until SIGTERM (or once)."""
        loop = asyncio.get_running_loop()
        if hasattr(self.hv, "on_event"):
            self.hv.on_event = lambda e: loop.call_soon_threadsafe(self.on_guest_event, e)
        if self.cfg.metrics.enabled:
            port = self.metrics.serve(self.cfg.metrics.address, self.cfg.metrics.port)
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.address, port)
        if self.cfg.runner.status_socket:
            server = status_doc.StatusServer(Path(self.cfg.runner.status_socket), self.status_document)
            self._status_server = server if await server.start() else None
        if self.cfg.mqtt.enabled:
            self.mqtt = MqttLink(self.cfg.mqtt, self.handle_command, self.status)
            self.mqtt.start()
        try:
            await asyncio.to_thread(self.hv.connect)
        except HypervisorError as e:
            log.error("%s; will keep retrying", e)  # snapshot() reconnects with backoff
        self.notifier.ready(f"policy {self.policy.name}{', dry-run' if self.dry_run else ''}")
        next_s = time.monotonic()
        try:
            while not self.stopping.is_set():
                if self.reload_requested:
                    self.reload()
                report = await self.tick()
                self.notifier.watchdog()  # pinged from the tick: a hung tick gets us restarted
                if on_tick is not None:
                    on_tick(report)
                if once:
                    break
                next_s = max(next_s + self.cfg.interval_s, time.monotonic())
                await self._wait_until(next_s)
        finally:
            await self._shutdown()

    async def _wait_until(self, at_s: float) -> None:
        """Sleep until the next tick; a SIGHUP is served at once, not after the sleep."""
        while not self.stopping.is_set() and (left_s := at_s - time.monotonic()) > 0:
            self._wake.clear()
            stop = asyncio.ensure_future(self.stopping.wait())
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait((stop, wake), timeout=left_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                wake.cancel()
            if self.reload_requested:
                self.reload()

    async def _shutdown(self) -> None:
        """Every step runs even when one before it failed: the broker hears ``online: false``
        however the daemon leaves."""
        self.notifier.stopping()
        try:
            if self.cfg.runner.return_to_max_on_exit and not self.dry_run:
                async with self._hv_lock:
                    n = await asyncio.to_thread(self.hv.return_to_max)
                log.info("returned %d guests to their maximum", n, extra={"event": "returned-to-max"})
        finally:
            try:
                if self.mqtt is not None:
                    await self.mqtt.stop()
                if self._status_server is not None:
                    await self._status_server.stop()
            finally:
                await asyncio.to_thread(self.hv.close)
                log.info("stopped", extra={"event": "stopped"})
