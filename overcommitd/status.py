"""What the daemon is doing to each guest and why, for a person: ``overcommitd status``.

After every tick the daemon keeps one :class:`DaemonStatus` (a row per guest: actual,
target, floor, the policy's wish, and why the guest is held or moved) and serves it,
read-only, on a Unix socket (``[runner] status_socket``, default
``/run/overcommitd/status.sock``, mode 0660): a client connects and gets the JSON
document, then end of file. The server never reads from the socket, so a client cannot
change anything, and nothing listens on the network. A Unix socket rather than a path
beside ``/metrics``: the metrics endpoint is off by default and may face the network;
this one is on by default and only root (the socket's owner and group) can connect.

A reason is logged when its wording changes (numbers aside, so "warm-up: 41 min left"
following "warm-up: 42 min left" is not news), never on every tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from overcommitd.config import GuardConfig
from overcommitd.guard import GuardOutcome, floor_kib, implausible_codes
from overcommitd.model import ClampReason, Decision, GuestSnapshot, OvercommitdError
from overcommitd.shortfall import short_text
from overcommitd.table import BoolArray, GuestTable, IntArray

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
WRITE_TIMEOUT_S = 5.0  # how long a client may take to read the document
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024  # a client reads at most this much: far above any host's guests
_MIB = 1024


class StatusError(OvercommitdError):
    """The daemon's status cannot be read; the message says where and why."""


class GuestStatus(BaseModel):
    """One guest as the last tick saw it. ``target_kib`` is the balloon target it holds
    (set this tick, or earlier); ``state`` is ``set`` (moved this tick), ``held``, or
    ``not-applied`` (decided in dry-run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    uuid: str
    actual_kib: int
    target_kib: int | None
    floor_kib: int
    max_kib: int
    wish_kib: int | None
    state: Literal["set", "held", "not-applied"]
    why: str


class DaemonStatus(BaseModel):
    """The whole document served on the status socket."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    policy: str
    dry_run: bool
    ticks: int
    interval_s: float
    updated_at: str  # ISO 8601, UTC
    guests: tuple[GuestStatus, ...] = ()
    host_short_kib: int = Field(0, ge=0)  # what the host lacks even if every balloon took all it can (shortfall)


def explain(d: Decision, guest: GuestSnapshot | None) -> str:
    """Why a guest is where it is: the policy's reason, then every guard rule that
    changed or withheld its wish. A dead band of no change at all is no hold: left out."""
    parts = [d.policy_reason] if d.policy_reason else []
    for c in d.clamps:
        if c.reason is ClampReason.DEAD_BAND and guest is not None:
            reference = guest.last_target_kib if guest.last_target_kib is not None else guest.actual_kib
            if c.before_kib == reference:
                continue
        parts.append(f"{c.reason.value}: {c.detail}" if c.detail else c.reason.value)
    if not parts:
        parts.append("at the policy's wish" if d.held else "moving to the policy's wish")
    return "; ".join(parts)


def build(
    guests: Sequence[GuestSnapshot],
    decisions: Sequence[Decision],
    applied: frozenset[str],
    rules: GuardConfig,
    *,
    policy: str,
    dry_run: bool,
    ticks: int,
    interval_s: float,
    host_short_kib: int = 0,
    updated_at: str | None = None,
) -> DaemonStatus:
    """The status after a tick; ``guests`` carry the config's floors (``loop.with_overrides``).
    ``updated_at``: when the tick ran (default: now), for a document built later."""
    by_uuid = {g.uuid: g for g in guests}
    rows = []
    for d in decisions:
        g = by_uuid.get(d.uuid)
        if g is None:
            continue
        rows.append(guest_status(g, d, d.uuid in applied, floor_kib(g, rules)))
    now = updated_at or now_text()
    return DaemonStatus(
        policy=policy,
        dry_run=dry_run,
        ticks=ticks,
        interval_s=interval_s,
        updated_at=now,
        guests=tuple(rows),
        host_short_kib=host_short_kib,
    )


def now_text() -> str:
    """The ``updated_at`` of a document made now."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def guest_status(g: GuestSnapshot, d: Decision, applied: bool, floor: int) -> GuestStatus:
    """One guest's row: ``g`` carries the config's floor, ``floor`` is the guard's."""
    state: Literal["set", "held", "not-applied"]
    if d.target_kib is None:
        state, target = "held", g.last_target_kib
    else:
        state = "set" if applied else "not-applied"
        target = d.target_kib
    return GuestStatus(
        name=g.name,
        uuid=g.uuid,
        actual_kib=g.actual_kib,
        target_kib=target,
        floor_kib=floor,
        max_kib=g.max_kib,
        wish_kib=d.wish_kib,
        state=state,
        why=explain(d, g),
    )


def _size(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / _MIB:.0f}M"


def table(status: DaemonStatus) -> str:
    """One header line, then one line per guest; sizes in MiB."""
    head = (
        f"policy {status.policy}{' (dry-run)' if status.dry_run else ''}, tick {status.ticks}"
        f" at {status.updated_at}, every {status.interval_s:g} s"
    )
    if status.host_short_kib > 0:
        head += f"\n{short_text(status.host_short_kib)}: no balloon can help"
    rows = [("GUEST", "ACTUAL", "TARGET", "FLOOR", "MAX", "WISH", "STATE", "WHY")]
    for g in status.guests:
        rows.append(
            (
                g.name,
                _size(g.actual_kib),
                _size(g.target_kib),
                _size(g.floor_kib),
                _size(g.max_kib),
                _size(g.wish_kib),
                g.state,
                g.why,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:7], widths, strict=True)) + "  " + r[7] for r in rows]
    if not status.guests:
        lines.append("(no tick yet: the daemon is starting)" if status.ticks == 0 else "(no guests)")
    return "\n".join([head, *lines])


class ReasonLog:
    """Logs a guest's reason when its wording changes; numbers do not count as change."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    @staticmethod
    def _shape(why: str) -> str:
        return re.sub(r"[-+]?\d[\d.]*", "#", why)

    def update(self, status: DaemonStatus) -> list[GuestStatus]:
        """Log and return the guests whose reason changed; forget guests that left."""
        changed = []
        seen: dict[str, str] = {}
        for g in status.guests:
            shape = f"{g.state}|{self._shape(g.why)}"
            seen[g.uuid] = shape
            if self._last.get(g.uuid) != shape:
                changed.append(g)
                _log_reason(g)
        self._last = seen
        return changed


def _log_reason(g: GuestStatus) -> None:
    log.info(
        "guest %s %s: %s",
        g.name,
        g.state,
        g.why,
        extra={"event": "reason", "guest": g.name, "state": g.state, "reason": g.why},
    )


def _shape(why: str) -> str:
    return ReasonLog._shape(why)


class ReasonKinds:
    """``ReasonLog`` over columns: each guest's reason as a few integers that change
    exactly when its wording does (numbers aside): the state, every guard rule that shows
    in ``explain``, and the shape of the policy's reason and error. Only the guests whose
    kind changed are worded and logged, so a tick costs a few array operations, not a
    sentence per guest. The policy's reasons are shaped one per kind when they are
    ``policies.api.RowReasons`` (the batch policies), one per guest otherwise."""

    def __init__(self) -> None:
        self._uuids: tuple[str, ...] = ()
        self._kinds: npt.NDArray[np.int64] = np.zeros((0, 3), dtype=np.int64)
        self._shapes: dict[str, int] = {}  # shape text -> id, for the whole run

    def _id(self, text: str | None) -> int:
        if not text:
            return -1
        return self._shapes.setdefault(_shape(text), len(self._shapes))

    def _text_ids(self, n: int, texts: Mapping[int, str]) -> IntArray:
        ids = np.full(n, -1, dtype=np.int64)
        kind = getattr(texts, "kind", None)
        word = getattr(texts, "word", None)
        if isinstance(kind, np.ndarray) and word is not None:  # policies.api.RowReasons
            for k in np.unique(kind[kind >= 0]).tolist():
                rows = np.flatnonzero(kind == k)
                ids[rows] = self._id(word(int(rows[0])))
            return ids
        for i, text in texts.items():
            ids[i] = self._id(text)
        return ids

    def kinds(
        self,
        table: GuestTable,
        v: GuardOutcome,
        applied: BoolArray,
        errors: Mapping[int, str],
        reasons: Mapping[int, str],
    ) -> npt.NDArray[np.int64]:
        """Each row's kind: (state and guard rules, policy reason shape, error shape)."""
        state = np.where(v.has_target, np.where(applied, 0, 2), 1)
        shown_dead = v.dead_band & (v.stepped_kib != v.reference_kib)  # explain() leaves out "no change at all"
        implausible = np.where(v.inflate_block == 3, implausible_codes(table), 0)
        not_running = np.where(v.hold == 1, table.run_state.astype(np.int64), 0)
        guard = v.hold.astype(np.int64)
        for flag, size in (
            (v.restored, 2),
            (v.maxed, 2),
            (v.floored, 2),
            (v.inflate_block, 8),
            (v.deflate_stepped, 2),
            (shown_dead, 2),
            (implausible, 8),
            (not_running, 16),
            (state, 3),
        ):
            guard = guard * size + np.asarray(flag, dtype=np.int64)
        n = len(table)
        error_ids = np.where(v.hold == 3, self._text_ids(n, errors), -1)  # shown only when it holds the guest
        return np.stack([guard, self._text_ids(n, reasons), error_ids], axis=1)

    def update(
        self, uuids: tuple[str, ...], kinds: npt.NDArray[np.int64], status_of: Callable[[int], GuestStatus]
    ) -> list[GuestStatus]:
        """Log and return the rows whose kind changed (worded by ``status_of``); forget
        guests that left."""
        if uuids == self._uuids:
            changed = np.flatnonzero((kinds != self._kinds).any(axis=1))
        else:
            index = {u: i for i, u in enumerate(self._uuids)}
            at = np.array([index.get(u, -1) for u in uuids], dtype=np.int64)
            before = self._kinds[np.maximum(at, 0)] if len(self._kinds) else np.zeros_like(kinds)
            changed = np.flatnonzero((at < 0) | (kinds != before).any(axis=1))
        self._uuids, self._kinds = uuids, kinds
        rows = [status_of(i) for i in changed.tolist()]
        for g in rows:
            _log_reason(g)
        return rows


class StatusServer:
    """Serves the latest document, read-only, on a Unix socket."""

    def __init__(self, path: Path, document: Callable[[], bytes]) -> None:
        self.path = path
        self.document = document
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> bool:
        """Listen; False (and a warning) when the socket cannot be made or another
        daemon serves it already. The daemon runs on without it."""
        try:
            if _in_use(self.path):
                log.warning("status socket %s is served by another process: not serving status", self.path)
                return False
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(self.path.lstat().st_mode):
                    self.path.unlink()  # left by a daemon that died: nobody answered on it
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            os.chmod(self.path, SOCKET_MODE)
        except OSError as e:
            log.warning("status socket %s: %s; `overcommitd status` will not work", self.path, e)
            return False
        log.info("status on %s", self.path, extra={"event": "status-socket"})
        return True

    async def _serve(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.document())
            async with asyncio.timeout(WRITE_TIMEOUT_S):  # a client that never reads cannot hold shutdown
                await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client went away or stalled: nothing to do
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def _in_use(path: Path) -> bool:
    """Whether something answers on the socket at ``path``."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def read(path: Path, timeout_s: float = 5.0) -> DaemonStatus:
    """The running daemon's status, from its socket."""
    chunks: list[bytes] = []
    size = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(path))
            while chunk := s.recv(65536):
                size += len(chunk)
                if size > MAX_DOCUMENT_BYTES:
                    raise StatusError(f"{path}: status document larger than {MAX_DOCUMENT_BYTES} bytes")
                chunks.append(chunk)
    except FileNotFoundError as e:
        raise StatusError(f"{path}: no status socket: is the daemon running (`systemctl status overcommitd`)?") from e
    except OSError as e:
        raise StatusError(f"{path}: cannot read the daemon's status: {e.strerror or e}") from e
    try:
        return DaemonStatus.model_validate_json(b"".join(chunks))
    except ValidationError as e:
        raise StatusError(
            f"{path}: not a status document: {e.error_count()} errors, first: {e.errors()[0]['msg']}"
        ) from e


def encode(status: DaemonStatus) -> bytes:
    return status.model_dump_json().encode()
