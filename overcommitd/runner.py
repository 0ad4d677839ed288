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

from overcommitd import package_version
from overcommitd import status as status_doc
from overcommitd.config import DaemonConfig, GuestOverride
from overcommitd.config_diff import changes
from overcommitd.host import HostError
from overcommitd.hypervisor import FloorAboveMaximum, HostReader, Hypervisor, HypervisorError, NoSuchGuest
from overcommitd.ksm import KsmController
from overcommitd.loop import LoopState, StepOutcome, apply, step, with_overrides
from overcommitd.model import GuestSnapshot, HostSnapshot
from overcommitd.sdnotify import Notifier
from overcommitd.shortfall import Shortfall, ShortfallLog, estimate
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

    guests: tuple[GuestSnapshot, ...] = ()
    outcome: StepOutcome[Any] | None = None
    applied: frozenset[str] = frozenset()
    duration_s: float = 0.0
    error: str | None = None
    shortfall: Shortfall | None = None  # what the host lacks beyond every balloon (None: not read)


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
        self.last_guests: tuple[GuestSnapshot, ...] = ()
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
        self.last_status: status_doc.DaemonStatus | None = None  # what `overcommitd status` shows
        self._status_bytes = status_doc.encode(
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
        self._reasons = status_doc.ReasonLog()
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
            host = await asyncio.to_thread(self.host.read)
            guests = self._mark_migrations(await asyncio.to_thread(self.hv.snapshot))
        except (HostError, HypervisorError) as e:
            log.warning("tick skipped, every guest held: %s", e, extra={"event": "tick-skipped"})
            return TickReport(error=str(e))
        self.last_guests = guests
        await self._ksm_tick(host, guests)
        self._warn_floors_above_max(guests)
        cfg = self._effective_cfg(guests)
        outcome = step(host.taken_at_s, host, guests, self.policy, self.state, cfg)
        self.state = outcome.state
        applied: frozenset[str] = frozenset()
        if not self.dry_run:
            applied = frozenset(await asyncio.to_thread(apply, self.hv, outcome.decisions))
        shortfall = self._shortfall(host, guests, cfg)
        self._publish(host, guests, outcome, applied, shortfall)
        self._explain(guests, outcome, applied, shortfall)
        return TickReport(guests, outcome, applied, shortfall=shortfall)

    def _shortfall(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], cfg: DaemonConfig) -> Shortfall:
        """What the host lacks even if every balloon took all it safely can (``overcommitd.
        shortfall``); excluded and paused guests count at their size, the host's own use at
        least ``[host]``'s reserve. Logged when it is news."""
        with_floors, held = with_overrides(guests, cfg)
        own_min_kib = cfg.host.own_min_kib(len(guests))
        shortfall = estimate(host, with_floors, cfg.guard, held=held, host_own_min_kib=own_min_kib)
        self._short_log.update(shortfall)
        return shortfall

    async def _ksm_tick(self, host: HostSnapshot, guests: Sequence[GuestSnapshot]) -> None:
        """One KSM adjustment, if enabled; the daemon's dry-run holds for KSM too. Nothing it
        does can stop the balloon loop."""
        if self.ksm is None:
            return
        ksm = self.ksm
        try:
            memory_kib = sum(g.actual_kib for g in guests)
            status = await asyncio.to_thread(ksm.tick, time.monotonic(), host, memory_kib, dry_run=self.dry_run)
            self.metrics.observe_ksm(ksm)
            if self.mqtt is not None:
                self.mqtt.offer(self.mqtt.topics.ksm, msg.KsmMessage.of(status), retain=True)
        except Exception:  # a bug in the optional controller must not cost the guests their tick
            self.ksm_failures += 1
            log.exception("ksm controller failed; balloon control goes on", extra={"event": "ksm-error"})

    def _warn_floors_above_max(self, guests: Sequence[GuestSnapshot]) -> None:
        """A config floor above a guest's maximum is capped at the maximum (the guard's
        ``floor_kib``); say so once per guest and floor, not every tick."""
        for g in guests:
            o = self.cfg.override_for(g)
            if o is None or o.floor_kib is None or o.floor_kib <= g.max_kib:
                continue
            if (g.uuid, o.floor_kib) not in self._floors_warned:
                self._floors_warned.add((g.uuid, o.floor_kib))
                log.warning(
                    "guest %s: config floor %d KiB is above its maximum %d KiB; capped at the maximum",
                    g.name,
                    o.floor_kib,
                    g.max_kib,
                    extra={"event": "floor-above-max", "guest": g.name},
                )

    def _explain(
        self, guests: Sequence[GuestSnapshot], outcome: StepOutcome[Any], applied: frozenset[str], shortfall: Shortfall
    ) -> None:
        """Keep the status document current and log each guest's reason when it changes."""
        with_floors, _excluded = with_overrides(guests, self.cfg)
        self.last_status = status_doc.build(
            with_floors,
            outcome.decisions,
            applied,
            self.cfg.guard,
            policy=self.policy.name,
            dry_run=self.dry_run,
            ticks=self.ticks + 1,
            interval_s=self.cfg.interval_s,
            host_short_kib=shortfall.short_kib,
        )
        self._status_bytes = status_doc.encode(self.last_status)
        self._reasons.update(self.last_status)

    def _effective_cfg(self, guests: Sequence[GuestSnapshot]) -> DaemonConfig:
        """The config with guests paused by command excluded (keeping their other overrides)."""
        if not self.paused:
            return self.cfg
        overrides = dict(self.cfg.guests)
        for g in guests:
            if g.uuid in self.paused:
                base = self.cfg.override_for(g) or GuestOverride.model_validate({})
                overrides[g.uuid] = base.model_copy(update={"exclude": True})
        return self.cfg.model_copy(update={"guests": overrides})

    def _mark_migrations(self, guests: Sequence[GuestSnapshot]) -> tuple[GuestSnapshot, ...]:
        """Guests with an announced migration, marked; an announcement whose time ran out,
        or whose guest has left this host, is dropped."""
        now_s = time.monotonic()
        present = {g.uuid for g in guests}
        self.migrations = {u: t for u, t in self.migrations.items() if t > now_s and u in present}
        return tuple(dataclasses.replace(g, migration_pending=True) if g.uuid in self.migrations else g for g in guests)

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
        return self._status_bytes

    def status(self) -> msg.StatusMessage:
        return msg.StatusMessage(online=True, dry_run=self.dry_run, policy=self.policy.name, version=package_version())

    def _publish(
        self,
        host: HostSnapshot,
        guests: Sequence[GuestSnapshot],
        outcome: StepOutcome[Any],
        applied: frozenset[str],
        shortfall: Shortfall,
    ) -> None:
        self.metrics.observe(host, guests, outcome.decisions, set(applied))
        self.metrics.observe_shortfall(shortfall)
        self.metrics.dry_run.set(1 if self.dry_run else 0)
        for d in outcome.decisions:
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
        for g in guests:
            names[g.uuid] = g.name
            self.mqtt.offer(t.guest(g.name, "snapshot"), msg.GuestMessage.of(g))
        for d in outcome.decisions:
            self.mqtt.offer(
                t.guest(names.get(d.uuid, d.name), "decision"), msg.DecisionMessage.of(d, applied=d.uuid in applied)
            )

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
        for g in self.last_guests:
            if name_or_uuid in (g.name, g.uuid):
                return g
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
