"""``mom``: oVirt MOM's default balloon policy, reproduced as a baseline.

The algorithm and every constant are from oVirt/mom ``doc/balloon.rules`` (0.6.5,
3de1c8e); the rules are re-expressed here, not translated line by line. Per step:

1. ``host_free = mean(history of host free) / MemTotal``; MOM keeps the last
   ``history_len`` samples of every field (``sample-history-length`` 10, mom/Monitor.py)
   and its policy reads ``StatAvg``, their mean.
2. Below ``pressure_threshold`` (0.20) every guest is shrunk, otherwise every guest is
   grown.
3. Shrink: the guest may keep the same free fraction as the host,
   ``gfp = min_guest_free_pct x host_free / pressure_threshold``, or, at or below
   ``pressure_critical`` (0.05), ``gfp = host_free - 0.05`` (negative: force the guest to
   swap). ``used = mean(balloon_cur) - mean(mem_unused)``; the new size is
   ``max(balloon_cur x (1 - 0.05), balloon_min, used + gfp x balloon_cur)``, set only if
   it is not above ``balloon_cur``.
4. Grow (only if ``balloon_cur < balloon_max``): ``max(balloon_cur x 1.05, balloon_min,
   used + 0.20 x balloon_cur)``, at most ``balloon_max``.
5. A new size is set only if it differs from ``balloon_cur`` by more than
   ``min_balloon_change_pct`` (0.25 %) of it; targets are truncated to int (MOM 2019,
   "Convert rule outputs from float to int").

Same inputs as our policies, mapped to MOM's names: ``balloon_cur`` = ``actual_kib``,
``balloon_max`` = ``max_kib``, ``balloon_min`` = ``floor_kib`` (MOM reads libvirt's
``<min_guarantee>``, which QEMU rejects, so on plain libvirt it is 0; we give it the
same floor every policy sees), ``mem_unused`` = MemFree (libvirt's ``unused``: MOM
counts page cache as used, which is its documented weakness, kept on purpose). MOM's
host ``mem_free`` is MemFree + Buffers + Cached (mom/Collectors/HostMemory.py); the
host snapshot carries MemAvailable, the closest reading of the same idea (both count
reclaimable cache as free; neither counts ZFS's ARC, so ``count_arc`` is off by
default). Guests without MemFree are skipped, as vdsm's policy does, and keep their
history: MOM's ``Monitor.collect`` returns on incomplete data before it appends the
sample, so the deque of the last 10 samples stays as it was (oVirt/mom 3de1c8e,
mom/Monitor.py lines 111-114 then 120-123); a guest that left the host leaves its
history with it.
The plain MOM rules have no QoS rule (doc/balloon-qos.rules is separate); the guard
raises guests below their floor for every policy alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot
from overcommitd.table import BoolArray, FloatArray, GuestTable, IntArray
from policies.api import BatchResult, PolicyResult, result_of


class MomParams(BaseModel):
    """MOM's constants, defaults from oVirt/mom doc/balloon.rules."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    pressure_threshold: float = Field(0.20, gt=0, le=1, description="host free fraction below which guests shrink")
    pressure_critical: float = Field(0.05, ge=0, le=1, description="host free fraction of critical pressure")
    min_guest_free_percent: float = Field(0.20, ge=0, le=1, description="free fraction an unconstrained guest keeps")
    max_balloon_change_percent: float = Field(0.05, gt=0, le=1, description="change per step, fraction of current")
    min_balloon_change_percent: float = Field(0.0025, ge=0, le=1, description="smaller changes are not made")
    history_len: int = Field(10, ge=1, le=1000, description="samples averaged (MOM sample-history-length)")
    count_arc: bool = Field(False, description="not MOM: count the ZFS ARC above c_min as free host memory")


@dataclass(frozen=True, slots=True)
class MomGuestHistory:
    balloon_cur_kib: tuple[int, ...] = ()
    mem_unused_kib: tuple[int, ...] = ()


def _no_history() -> IntArray:
    return np.zeros((0, 1), dtype=np.int64)


@dataclass(frozen=True, slots=True, eq=False)
class MomState:
    """MOM's sample histories: the host's free memory, and per guest (rows with
    ``uuids``) the last ``count`` samples of ``balloon_cur`` and ``mem_unused``, oldest
    first, right-aligned in ``history_len`` columns."""

    host_free_kib: tuple[int, ...] = ()
    uuids: tuple[str, ...] = ()
    balloon_cur_kib: IntArray = field(default_factory=_no_history)
    mem_unused_kib: IntArray = field(default_factory=_no_history)
    count: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def guests(self) -> Mapping[str, MomGuestHistory]:
        """Each guest's history as tuples (a view, for logs and tests)."""
        out = {}
        for i, uuid in enumerate(self.uuids):
            n = int(self.count[i])
            if n == 0:
                continue  # never sampled: MOM keeps no history for it
            cur, unused = self.balloon_cur_kib[i], self.mem_unused_kib[i]
            width = cur.shape[0]
            out[uuid] = MomGuestHistory(tuple(cur[width - n :].tolist()), tuple(unused[width - n :].tolist()))
        return out

    def aligned(self, uuids: tuple[str, ...], length: int) -> MomState:
        """The histories of these guests in this order (empty for a guest not seen),
        ``length`` columns wide; guests that left are dropped."""
        if uuids == self.uuids and self.balloon_cur_kib.shape[1] == length:
            return self
        index = {u: i for i, u in enumerate(self.uuids)}
        cur = np.zeros((len(uuids), length), dtype=np.int64)
        unused = np.zeros_like(cur)
        count = np.zeros(len(uuids), dtype=np.int64)
        width = min(length, self.balloon_cur_kib.shape[1])
        for row, uuid in enumerate(uuids):
            i = index.get(uuid)
            if i is not None:
                cur[row, length - width :] = self.balloon_cur_kib[i, -width:]
                unused[row, length - width :] = self.mem_unused_kib[i, -width:]
                count[row] = min(int(self.count[i]), width)
        return MomState(self.host_free_kib, uuids, cur, unused, count)


def _push(history: tuple[int, ...], value: int, length: int) -> tuple[int, ...]:
    return (history + (value,))[-length:]


def _mean(history: tuple[int, ...]) -> float:
    return sum(history) / len(history)


def _push_rows(history: IntArray, values: FloatArray, where: BoolArray) -> IntArray:
    """Append ``values`` to the rows ``where``, dropping each row's oldest sample."""
    shifted = np.concatenate([history[:, 1:], values.astype(np.int64)[:, None]], axis=1)
    return np.where(where[:, None], shifted, history)


def _mean_rows(history: IntArray, count: IntArray) -> FloatArray:
    """Mean of each row's last ``count`` samples (NaN where none)."""
    width = history.shape[1]
    valid = np.arange(width)[None, :] >= (width - count)[:, None]
    total = np.where(valid, history, 0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


class MomPolicy:
    """oVirt MOM's default balloon rules (doc/balloon.rules), over columns
    (``decide_batch``); ``decide`` is the same on a table of the snapshots."""

    name = "mom"
    Params = MomParams

    def __init__(self, params: MomParams | None = None) -> None:
        self.params = params or MomParams()

    def initial_state(self) -> MomState:
        return MomState()

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: MomState) -> PolicyResult[MomState]:
        table = GuestTable.of(guests)
        return result_of(table, self.decide_batch(host, table, state))

    def decide_batch(self, host: HostSnapshot, guests: GuestTable, state: MomState) -> BatchResult[MomState]:
        p = self.params
        host_history = _push(state.host_free_kib, host.available_kib(count_arc=p.count_arc), p.history_len)
        host_free = _mean(host_history) / host.mem_total_kib
        old = state.aligned(guests.uuid, p.history_len)
        # vdsm's policy skips guests without mem_unused; their history is kept.
        unused = np.where(guests.stats.present, guests.stats["mem_free_kib"], np.nan)
        has = ~np.isnan(unused)
        cur = guests.actual_kib
        balloon_cur = _push_rows(old.balloon_cur_kib, cur.astype(np.float64), has)
        mem_unused = _push_rows(old.mem_unused_kib, np.where(has, unused, 0.0), has)
        count = np.where(has, np.minimum(old.count + 1, p.history_len), old.count)
        used = _mean_rows(balloon_cur, count) - _mean_rows(mem_unused, count)
        floor = guests.floor_kib.astype(np.float64)
        if host_free < p.pressure_threshold:  # shrink every guest
            size = np.maximum(
                cur * (1 - p.max_balloon_change_percent),
                np.maximum(floor, used + self.guest_free_fraction(host_free) * cur),
            )
            moves = size <= cur
        else:  # grow every guest below its maximum
            grown = np.maximum(
                cur * (1 + p.max_balloon_change_percent), np.maximum(floor, used + p.min_guest_free_percent * cur)
            )
            size = np.minimum(grown, guests.max_kib)
            moves = cur < guests.max_kib
        big_enough = np.abs(size - cur) > p.min_balloon_change_percent * cur
        targets = np.where(has & moves & big_enough, np.trunc(size), np.nan)
        return BatchResult(targets, MomState(host_history, guests.uuid, balloon_cur, mem_unused, count))

    def guest_free_fraction(self, host_free: float) -> float:
        p = self.params
        if host_free <= p.pressure_critical:
            return host_free - 0.05  # "force guest to swap by making free memory negative"
        return p.min_guest_free_percent * host_free / p.pressure_threshold
