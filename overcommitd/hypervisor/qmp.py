"""The Hypervisor protocol on QEMU's own monitor (QMP), for hosts without libvirt.

Proxmox VE, and hosts that start QEMU from their own scripts, talk to each guest over a
QMP unix socket. Every socket matching ``[qmp] socket_glob`` is a guest; a socket that
disappears is a guest that left. Identity comes from ``query-name``/``query-uuid``, else
from the socket's name (Proxmox: ``<vmid>.qmp``).

**Threads.** The daemon's tick runs blocking hypervisor calls in a worker thread
(``asyncio.to_thread``), and the Hypervisor protocol is synchronous because the replay
drives the same step on a virtual clock. ``qemu.qmp`` is asyncio, and a QMP session is
long-lived: its reader task must run between ticks to take events (BALLOON_CHANGE,
STOP/RESUME, SHUTDOWN) as they come. So this backend owns one event loop in a dedicated
daemon thread; every session, reader and event listener lives on it, and the public
methods are thin synchronous wrappers that submit one coroutine and wait for it. A tick
reads every guest concurrently on that loop (``asyncio.gather``), so 100 guests cost
about one round trip of latency, not 100. Per-guest state is touched only on that loop,
so it needs no lock. Making the backend natively async would have split the Hypervisor
protocol in two (the simulator and the loop call it synchronously) for no gain: the
runner already waits on a thread.

**Sessions, and what a tick costs.** QEMU serves one client per QMP socket at a time (a
second one waits for the first to leave), and Proxmox's own tools (qm, pvestatd) use
``<vmid>.qmp``. So by default (``keep_connected = false``) a session lasts one operation:
connect, read (or set), disconnect; a tick costs four commands per guest
(``qmp_capabilities``, ``query-status``, ``qom-get guest-stats``, ``query-balloon``).
With ``keep_connected = true`` (a socket given to overcommitd alone) sessions stay open,
events arrive as they happen and a tick costs two: ``guest-stats`` and ``query-balloon``
(``actual`` is authoritative, unlike an event that QEMU throttles to one a second);
``query-status`` only after an event says the run state changed. Either way, who the
guest is (name, UUID, size, the balloon's QOM path and properties) is read once per
QEMU process (the socket file's inode and creation time). ``calls`` counts every command sent, by name.

**Failures are per guest.** Every command has a timeout (``call_timeout_s``); a guest
that does not answer, or whose connection breaks, is reported as ``UNRESPONSIVE`` with
its last reading (the guard holds it and keeps its memory) and reconnected with
exponential backoff; the others are read as usual. A socket file replaced by a new one
(a restarted QEMU) is a new guest: what we set for the old one is forgotten.

**Floors.** There is no domain XML to keep a floor in: ``set_floor`` (the MQTT command)
keeps it in this object's memory, by UUID, for the daemon's lifetime. It wins over a
Proxmox VM's own ``balloon:`` minimum (``pve_conf_dir``); floors that must survive a
restart belong in the config's ``[guests.*]``, which the loop applies on top.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, QMPClient, QMPError
from qemu.qmp.qmp_client import ExecuteError

from overcommitd.config import QmpConfig
from overcommitd.hypervisor import FloorAboveMaximum, GuestEvent, HypervisorError, NoSuchGuest, pve
from overcommitd.hypervisor import qmp_replies as qr
from overcommitd.model import BalloonFeatures, GuestSnapshot, GuestStats, RunState

log = logging.getLogger(__name__)
# qemu.qmp logs every dropped connection at error level with a traceback; a guest that
# shuts down is routine here, and we log what matters ourselves.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

T = TypeVar("T")

# Events we act on (qapi/run-state.json, qapi/machine.json: BALLOON_CHANGE).
_EVENTS = ("BALLOON_CHANGE", "STOP", "RESUME", "SHUTDOWN", "RESET", "MIGRATION")
_PERIPHERAL_PARENTS = ("/machine/peripheral", "/machine/peripheral-anon")
_FEATURE_PROPS = ("deflate-on-oom", "free-page-reporting", "free-page-hint")


class Unresponsive(HypervisorError):
    """A guest's QMP socket broke or timed out."""


class Gone(Unresponsive):
    """Nothing listens on the socket any more: its QEMU exited without removing it
    (SIGKILL, a crash). A hung QEMU still accepts, so a refusal means the guest left."""


@dataclass(slots=True)
class _Session:
    """One guest's QMP connection and what it told us; lives on the backend's loop."""

    path: str
    backoff_s: float
    socket_id: tuple[int, int] = (0, 0)  # (inode, ctime_ns): a new file, a new QEMU
    client: QMPClient | None = None
    events_task: asyncio.Task[None] | None = None
    retry_at_s: float = 0.0
    uuid: str = ""
    name: str = ""
    max_kib: int = 0
    balloon: qr.BalloonDevice | None = None
    probed: bool = False
    run_state: RunState | None = RunState.RUNNING
    status_dirty: bool = False
    stats_period_s: float = 0.0
    last: GuestSnapshot | None = None
    pve_balloon: pve.PveBalloon | None = None
    target: tuple[int, float] | None = None  # (target_kib, set_at_s) we last set

    @property
    def stem(self) -> str:
        return Path(self.path).name.removesuffix(".qmp")


class QmpHypervisor:
    """``Hypervisor`` over the QMP sockets matching ``cfg.socket_glob``."""

    def __init__(
        self,
        cfg: QmpConfig,
        *,
        on_event: Callable[[GuestEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.on_event = on_event
        self.clock = clock
        self.calls: Counter[str] = Counter()  # QMP commands sent, by name, since start
        self.errors: Counter[str] = Counter()  # QMP commands that failed or timed out, by name
        self._sessions: dict[str, _Session] = {}  # by socket path
        self._floors_kib: dict[str, int] = {}  # set_floor, by UUID
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- the loop thread ----------------------------------------------------------------

    def connect(self) -> None:
        """Start the backend's event loop; guests are connected as the glob finds them."""
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="qmp-sessions", daemon=True)
        self._thread.start()
        self._loop = loop
        if not glob.glob(self.cfg.socket_glob):
            log.warning("no QMP socket matches %s yet; guests are picked up as they appear", self.cfg.socket_glob)

    def close(self) -> None:
        """Disconnect every session and stop the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._run(self._close_all())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the backend's loop and wait for it (from any other thread)."""
        if self._loop is None:
            self.connect()
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # -- Hypervisor protocol ------------------------------------------------------------

    def snapshot(self) -> Sequence[GuestSnapshot]:
        """Every guest behind a matching socket, read concurrently: running and answering
        ones as they are, unresponsive ones as last read and marked UNRESPONSIVE."""
        return self._run(self._snapshot())

    def set_target(self, uuid: str, target_kib: int) -> None:
        self._run(self._set_target(uuid, int(target_kib)))

    # -- beyond the protocol ------------------------------------------------------------

    def set_floor(self, name_or_uuid: str, floor_kib: int) -> str:
        """Keep the guest's SLA floor in the daemon's memory (see the module's docstring)."""
        return self._run(self._set_floor(name_or_uuid, int(floor_kib)))

    async def _set_floor(self, name_or_uuid: str, floor_kib: int) -> str:
        s = self._session(name_or_uuid)
        FloorAboveMaximum.check(name_or_uuid, floor_kib, s.max_kib)
        self._floors_kib[s.uuid] = floor_kib
        return s.uuid

    def return_to_max(self) -> int:
        """Deflate every connected guest to its maximum; returns how many. Never raises."""
        return self._run(self._return_to_max())

    def target_kib(self, uuid: str) -> int | None:
        """The target this daemon last set for the guest, if any."""
        for s in list(self._sessions.values()):
            if s.uuid == uuid and s.target is not None:
                return s.target[0]
        return None

    # -- snapshot -----------------------------------------------------------------------

    async def _snapshot(self) -> list[GuestSnapshot]:
        paths = set(glob.glob(self.cfg.socket_glob))
        for path in set(self._sessions) - paths:
            log.info("QMP socket %s is gone: its guest left", path)
            await self._disconnect(self._sessions.pop(path))
        for path in sorted(paths - set(self._sessions)):
            self._sessions[path] = _Session(path, backoff_s=self.cfg.reconnect_min_s)
        sessions = [self._sessions[p] for p in sorted(paths)]
        results = await asyncio.gather(*(self._read_guarded(s) for s in sessions))
        return [g for g in results if g is not None]

    async def _read_guarded(self, s: _Session) -> GuestSnapshot | None:
        try:
            return await self._read(s)
        except Gone as e:
            if s.probed:
                log.info("guest %s left: %s", s.name, e)
            await self._disconnect(s)
            s.probed, s.last, s.target = False, None, None
            return None
        except (Unresponsive, qr.QmpReplyError) as e:
            await self._lost(s, str(e))
        except HypervisorError as e:
            # QEMU answered with an error: the session is fine, this reading is not.
            log.warning("guest %s held this tick: %s", s.name or s.path, e)
        finally:
            await self._end_operation(s)
        if s.last is None:
            return None
        return dataclasses.replace(s.last, run_state=RunState.UNRESPONSIVE)

    async def _read(self, s: _Session) -> GuestSnapshot | None:
        await self._ensure_session(s)
        # Read every tick (a small local file): `qm set --balloon` takes effect without a restart.
        s.pve_balloon = pve.read_balloon(self.cfg.pve_conf_dir, s.stem)
        if s.status_dirty:
            s.status_dirty = False
            s.run_state = qr.run_state(await self._call(s, "query-status"))
        if s.run_state is None or s.balloon is None or (s.pve_balloon is not None and s.pve_balloon.exclude):
            s.last = None
            return None
        stats_reply, balloon_reply = await asyncio.gather(
            self._call(s, "qom-get", {"path": s.balloon.qom_path, "property": "guest-stats"}),
            self._call(s, "query-balloon"),
        )
        s.last = self._guest(s, qr.guest_stats(stats_reply), qr.actual_kib(balloon_reply, s.max_kib))
        return s.last

    def _guest(self, s: _Session, stats: GuestStats | None, actual_kib: int) -> GuestSnapshot:
        assert s.balloon is not None and s.run_state is not None
        target = s.target
        floor_kib = self._floors_kib.get(s.uuid, s.pve_balloon.floor_kib if s.pve_balloon else 0)
        return GuestSnapshot(
            uuid=s.uuid,
            name=s.name,
            max_kib=s.max_kib,
            actual_kib=actual_kib,
            current_kib=actual_kib,
            last_target_kib=None if target is None else target[0],
            last_target_age_s=None if target is None else self.clock() - target[1],
            features=BalloonFeatures(
                deflate_on_oom=s.balloon.deflate_on_oom,
                free_page_hint=s.balloon.free_page_hint,
                reporting=s.balloon.free_page_reporting,
            ),
            stats=stats,
            stats_period_s=s.stats_period_s,
            floor_kib=min(floor_kib, s.max_kib),
            run_state=s.run_state,
        )

    # -- sessions -----------------------------------------------------------------------

    async def _ensure_session(self, s: _Session) -> None:
        """A live, probed session, or Unresponsive; a replaced socket starts a new guest."""
        try:
            st = os.stat(s.path)
        except OSError as e:
            raise Unresponsive(f"{s.path}: {e.strerror}") from e
        # tmpfs reuses a freed inode number at once, so the creation time tells files apart.
        socket_id = (st.st_ino, st.st_ctime_ns)
        if socket_id != s.socket_id:
            if s.socket_id != (0, 0):
                log.info("QMP socket %s was recreated: a new guest", s.path)
            await self._disconnect(s)
            s.socket_id, s.target, s.last, s.retry_at_s, s.probed = socket_id, None, None, 0.0, False
        if s.client is None:
            await self._open(s)
        if not s.probed:
            try:
                await self._probe(s)
            except (HypervisorError, qr.QmpReplyError) as e:
                # Half-known guests are not ballooned: probe again after the backoff.
                raise Unresponsive(f"{s.path}: cannot identify the guest: {e}") from e
            s.probed, s.status_dirty = True, False
            s.backoff_s = self.cfg.reconnect_min_s
            log.info("guest %s found at %s", s.name, s.path)

    async def _open(self, s: _Session) -> None:
        """Connect (greeting and qmp_capabilities), respecting the backoff."""
        now = self.clock()
        if now < s.retry_at_s:
            raise Unresponsive(f"{s.path}: unreachable; next attempt in {s.retry_at_s - now:.1f} s")
        client = QMPClient(s.stem)
        self.calls["qmp_capabilities"] += 1
        try:
            await asyncio.wait_for(client.connect(s.path), self.cfg.call_timeout_s)
        except (QMPError, OSError, TimeoutError, EOFError) as e:
            self.errors["qmp_capabilities"] += 1
            await self._drop_client(client)
            cause = getattr(e, "exc", e)  # qemu.qmp's ConnectError wraps the OSError
            kind = Gone if isinstance(cause, ConnectionRefusedError | FileNotFoundError) else Unresponsive
            raise kind(f"{s.path}: cannot connect: {str(e) or type(e).__name__}") from e
        s.client = client
        if self.cfg.keep_connected:
            listener = EventListener(_EVENTS)
            client.register_listener(listener)
            s.events_task = asyncio.get_running_loop().create_task(self._events(s, listener))

    async def _end_operation(self, s: _Session) -> None:
        """Leave the socket to QEMU's other clients, unless configured to hold it; the
        run state is then read afresh next time (no events reach a closed session)."""
        if not self.cfg.keep_connected and s.client is not None:
            await self._disconnect(s)
            s.status_dirty = True

    async def _probe(self, s: _Session) -> None:
        """Who the guest is, its state and size, where its balloon is and how it polls."""
        s.name = qr.guest_name(await self._call(s, "query-name")) or s.stem
        s.uuid = qr.guest_uuid(await self._call(s, "query-uuid")) or s.stem
        s.run_state = qr.run_state(await self._call(s, "query-status"))
        s.max_kib = qr.memory_size_kib(await self._call(s, "query-memory-size-summary"))
        s.balloon = await self._find_balloon(s)
        if s.balloon is None:
            log.info("guest %s has no virtio-balloon device: not ballooned", s.name)
            return
        s.stats_period_s = float(await self._ensure_polling(s, s.balloon.qom_path))

    async def _find_balloon(self, s: _Session) -> qr.BalloonDevice | None:
        """The balloon's QOM path, from the children of the user-created devices (named by
        ``id=`` under /machine/peripheral, unnamed under /machine/peripheral-anon)."""
        for parent in _PERIPHERAL_PARENTS:
            paths = qr.balloon_children(await self._call(s, "qom-list", {"path": parent}), parent)
            if paths:
                path = paths[0]
                props = [await self._qom_get(s, path, p) for p in _FEATURE_PROPS]
                return qr.BalloonDevice(path, *(p is True for p in props))
        return None

    async def _ensure_polling(self, s: _Session, path: str) -> int:
        """Switch stats polling on (or faster) with qom-set; returns the interval in force."""
        want = self.cfg.stats_polling_interval_s
        have = await self._qom_get(s, path, "guest-stats-polling-interval")
        if isinstance(have, int) and not isinstance(have, bool) and 0 < have <= want:
            return have
        await self._call(s, "qom-set", {"path": path, "property": "guest-stats-polling-interval", "value": want})
        log.info("guest %s: stats polling every %d s", s.name, want)
        return want

    async def _qom_get(self, s: _Session, path: str, prop: str) -> object:
        """A property, or None when this QEMU's device lacks it (older QEMU: no
        free-page-reporting before 5.1)."""
        try:
            return await self._call(s, "qom-get", {"path": path, "property": prop})
        except HypervisorError as e:
            if isinstance(e, Unresponsive):
                raise
            return None

    async def _call(self, s: _Session, cmd: str, args: dict[str, object] | None = None) -> object:
        """One QMP command with the configured timeout, counted. A QEMU error reply is a
        HypervisorError; no answer, a broken socket or a protocol error is Unresponsive."""
        client = s.client
        if client is None:
            raise Unresponsive(f"{s.path}: not connected")
        self.calls[cmd] += 1
        try:
            return await asyncio.wait_for(client.execute(cmd, args), self.cfg.call_timeout_s)
        except ExecuteError as e:
            self.errors[cmd] += 1
            raise HypervisorError(f"guest {s.name or s.path}: {cmd} failed: {e.error_class}: {e}") from e
        except TimeoutError as e:
            self.errors[cmd] += 1
            raise Unresponsive(f"guest {s.name or s.path}: {cmd} unanswered after {self.cfg.call_timeout_s:g} s") from e
        except (QMPError, OSError, EOFError) as e:
            self.errors[cmd] += 1
            raise Unresponsive(
                f"guest {s.name or s.path}: {cmd}: connection lost ({str(e) or type(e).__name__})"
            ) from e

    async def _lost(self, s: _Session, why: str) -> None:
        """Drop the session and schedule a reconnect with exponential backoff."""
        if s.client is not None or s.retry_at_s <= self.clock():
            log.warning("guest %s held: %s; reconnecting in %.1f s", s.name or s.path, why, s.backoff_s)
        await self._disconnect(s)
        if s.retry_at_s <= self.clock():
            s.retry_at_s = self.clock() + s.backoff_s
            s.backoff_s = min(s.backoff_s * 2, self.cfg.reconnect_max_s)

    async def _disconnect(self, s: _Session) -> None:
        client, s.client = s.client, None
        task, s.events_task = s.events_task, None
        if task is not None:
            task.cancel()
        if client is not None:
            await self._drop_client(client)

    async def _drop_client(self, client: QMPClient) -> None:
        try:
            await asyncio.wait_for(client.disconnect(), self.cfg.call_timeout_s)
        except (QMPError, OSError, TimeoutError, EOFError):
            pass  # the session is gone either way

    async def _close_all(self) -> None:
        for s in self._sessions.values():
            await self._disconnect(s)

    # -- events (on the loop: record and hand on) ---------------------------------------

    async def _events(self, s: _Session, listener: EventListener) -> None:
        async for event in listener:
            name, data = event.get("event"), event.get("data")
            data = data if isinstance(data, dict) else {}
            if name == "BALLOON_CHANGE":
                actual = data.get("actual")
                kib = qr.bytes_to_kib(actual) if isinstance(actual, int) and not isinstance(actual, bool) else None
                self._emit(GuestEvent("balloon-change", s.uuid, s.name, actual_kib=kib))
                continue
            # Take the event's word now, and confirm with query-status on the next tick
            # (a STOP may be a pause, a migration's last phase or an I/O error).
            s.run_state = {"STOP": RunState.PAUSED, "RESUME": RunState.RUNNING, "SHUTDOWN": RunState.SHUTTING_DOWN}.get(
                str(name), s.run_state
            )
            s.status_dirty = True
            self._emit(GuestEvent("lifecycle", s.uuid, s.name, str(name).lower()))

    def _emit(self, event: GuestEvent) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("event consumer failed on %s", event)

    # -- targets ------------------------------------------------------------------------

    def _session(self, name_or_uuid: str) -> _Session:
        for s in list(self._sessions.values()):
            if s.probed and name_or_uuid in (s.uuid, s.name):
                return s
        raise NoSuchGuest(f"no QMP guest named or with UUID {name_or_uuid!r}")

    async def _set_target(self, uuid: str, target_kib: int) -> None:
        s = self._session(uuid)
        seen = s.socket_id
        try:
            await self._ensure_session(s)
            if s.socket_id != seen or s.uuid != uuid:
                # The QEMU process the snapshot saw was replaced since: its target is not this one's.
                raise NoSuchGuest(f"guest {uuid}: its QEMU was replaced since the snapshot; target not set")
            await self._call(s, "balloon", {"value": qr.kib_to_bytes(target_kib)})
        except Unresponsive as e:
            await self._lost(s, str(e))
            raise
        finally:
            await self._end_operation(s)
        s.target = (target_kib, self.clock())

    async def _return_to_max(self) -> int:
        n = 0
        for s in list(self._sessions.values()):
            if not s.probed or s.balloon is None:
                continue
            try:
                await self._ensure_session(s)
                await self._call(s, "balloon", {"value": qr.kib_to_bytes(s.max_kib)})
                n += 1
            except HypervisorError as e:
                log.warning("guest %s not returned to its maximum: %s", s.name, e)
            finally:
                await self._end_operation(s)
        return n
