"""Oracle: the per-guest policy before it ran over columns (overcommitd 4773319), kept
verbatim for ``tests/test_batch_policies.py``; not used by the daemon.

``mom``: oVirt MOM's default balloon policy, reproduced as a baseline.

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

from pydantic import BaseModel, ConfigDict, Field

from overcommitd.model import GuestSnapshot, HostSnapshot
from policies.api import PolicyResult


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


@dataclass(frozen=True, slots=True)
class MomState:
    host_free_kib: tuple[int, ...] = ()
    guests: Mapping[str, MomGuestHistory] = field(default_factory=dict)


def _push(history: tuple[int, ...], value: int, length: int) -> tuple[int, ...]:
    return (history + (value,))[-length:]


def _mean(history: tuple[int, ...]) -> float:
    return sum(history) / len(history)


class MomPolicy:
    """oVirt MOM's default balloon rules (doc/balloon.rules)."""

    name = "mom"
    Params = MomParams

    def __init__(self, params: MomParams | None = None) -> None:
        self.params = params or MomParams()

    def initial_state(self) -> MomState:
        return MomState()

    def decide(self, host: HostSnapshot, guests: Sequence[GuestSnapshot], state: MomState) -> PolicyResult[MomState]:
        p = self.params
        host_history = _push(state.host_free_kib, host.available_kib(count_arc=p.count_arc), p.history_len)
        host_free = _mean(host_history) / host.mem_total_kib
        shrinking = host_free < p.pressure_threshold
        targets: dict[str, int] = {}
        present = {g.uuid for g in guests}
        histories = {uuid: h for uuid, h in state.guests.items() if uuid in present}
        for guest in guests:
            unused = guest.stats.mem_free_kib if guest.stats is not None else None
            if unused is None:
                continue  # vdsm's policy skips guests without mem_unused; history kept
            old = state.guests.get(guest.uuid, MomGuestHistory())
            h = MomGuestHistory(
                _push(old.balloon_cur_kib, guest.actual_kib, p.history_len),
                _push(old.mem_unused_kib, unused, p.history_len),
            )
            histories[guest.uuid] = h
            used = _mean(h.balloon_cur_kib) - _mean(h.mem_unused_kib)
            size = self.shrink(guest, used, host_free) if shrinking else self.grow(guest, used)
            if size is not None and self.big_enough(guest, size):
                targets[guest.uuid] = int(size)
        return PolicyResult(targets, MomState(host_history, histories))

    def guest_free_fraction(self, host_free: float) -> float:
        p = self.params
        if host_free <= p.pressure_critical:
            return host_free - 0.05  # "force guest to swap by making free memory negative"
        return p.min_guest_free_percent * host_free / p.pressure_threshold

    def shrink(self, guest: GuestSnapshot, used: float, host_free: float) -> float | None:
        cur = guest.actual_kib
        floor = max(guest.floor_kib, used + self.guest_free_fraction(host_free) * cur)
        size = max(cur * (1 - self.params.max_balloon_change_percent), floor)
        return size if size <= cur else None

    def grow(self, guest: GuestSnapshot, used: float) -> float | None:
        cur = guest.actual_kib
        if cur >= guest.max_kib:
            return None
        floor = max(guest.floor_kib, used + self.params.min_guest_free_percent * cur)
        size = max(cur * (1 + self.params.max_balloon_change_percent), floor)
        return min(size, guest.max_kib)

    def big_enough(self, guest: GuestSnapshot, size: float) -> bool:
        return abs(size - guest.actual_kib) > self.params.min_balloon_change_percent * guest.actual_kib
